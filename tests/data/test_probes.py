"""Reasoning probes: generated Dyck and arithmetic problems, as data sources and as probes."""

from __future__ import annotations

import re

import pytest
import torch

from ebt.config import ConfigError, load_config
from ebt.data import DataError, iter_documents
from ebt.data import probes as probe_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _closes(prompt: str, answer: str) -> bool:
    """Whether `answer` is exactly the closing sequence that balances `prompt`."""
    pairs = dict(probe_data.BRACKETS)
    stack = []
    for char in prompt:
        if char in pairs:
            stack.append(pairs[char])
        elif not stack or stack.pop() != char:
            return False
    return bool(stack) and "".join(reversed(stack)) == answer


def test_dyck_problems_are_balanced_within_their_limits():
    spec = probe_data.parse_source("dyck:kinds=2,min_length=6,max_length=12,max_depth=3,count=300")
    for problem in probe_data.generate(spec):
        prefix, answer = problem.prompt[:-1], problem.answer[:-1]
        assert problem.prompt.endswith("=") and problem.answer.endswith("\n")
        assert _closes(prefix, answer)
        assert 6 <= len(prefix) + len(answer) <= 12 and (len(prefix) + len(answer)) % 2 == 0
        assert probe_data.peak_depth(prefix) <= 3 and set(prefix) <= set("()[]")


def test_dyck_ood_is_longer_and_deeper():
    spec = probe_data.parse_source("dyck:max_length=12,max_depth=3,ood_length=24,ood_depth=6,ood")
    for problem in probe_data.generate(probe_data.replace(spec, count=200)):
        prefix, answer = problem.prompt[:-1], problem.answer[:-1]
        assert _closes(prefix, answer)
        assert 14 <= len(prefix) + len(answer) <= 24
        assert 3 < probe_data.peak_depth(prefix) <= 6


def test_arithmetic_answers_are_right_and_ood_has_more_digits():
    spec = probe_data.parse_source("arithmetic:ops=+-*,digits=2,ood_digits=3,count=300")
    for ood in (False, True):
        for problem in probe_data.generate(probe_data.replace(spec, ood=ood)):
            question = problem.prompt[:-1]
            assert int(problem.answer) == eval(question)  # noqa: S307 (digits and + - * only)
            assert int(problem.answer) >= 0
            longest = max(len(operand) for operand in re.split(r"[-+*]", question))
            assert longest == 3 if ood else longest <= 2


def test_problems_are_deterministic_and_the_split_never_leaks():
    spec = probe_data.parse_source("arithmetic:digits=1,count=2000")
    first = [p.text for p in probe_data.generate(spec)]
    assert first == [p.text for p in probe_data.generate(spec)]
    other = probe_data.parse_source("arithmetic:digits=1,count=2000,seed=1")
    assert first != [p.text for p in probe_data.generate(other)]
    train = {p.text for p in probe_data.problems(spec, "train", 0.2)}
    val = {p.text for p in probe_data.problems(spec, "val", 0.2)}
    assert train and val and not train & val  # duplicates land in one split


def test_probe_sources_are_corpus_sources():
    documents = list(iter_documents("dyck:count=50", "all"))
    assert len(documents) == 50 and all(text.endswith("\n") for text in documents)
    assert list(iter_documents("dyck:count=50", "all")) == documents


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("dyck:depth=4", "unknown dyck parameter 'depth'; use kinds"),
        ("dyck:kinds=5", "kinds=5: must be in 1..4"),
        ("dyck:max_depth=x", "max_depth='x': must be an integer"),
        ("dyck:ood_depth=2,max_depth=4", "ood_depth=2: must be > max_depth=4"),
        ("arithmetic:ops=/", "ops='/': must be one or more of"),
        ("arithmetic:digits=3,ood_digits=3", "ood_digits=3: must be > digits"),
        ("arithmetic:ood=maybe", "ood='maybe': must be true or false"),
    ],
)
def test_bad_parameters_fail_in_one_line(source, message):
    with pytest.raises(DataError, match=message):
        probe_data.parse_source(source)
    with pytest.raises(ConfigError, match=f"data.ood_source: .*{message}"):
        load_config(None, [f"data.ood_source={source}"])


def test_source_string_round_trips():
    spec = probe_data.parse_source("dyck:kinds=2,max_depth=6,ood")
    assert probe_data.source_string(spec) == "dyck:kinds=2,max_depth=6,ood"
    assert probe_data.parse_source(probe_data.source_string(spec)) == spec
    assert probe_data.source_string(probe_data.parse_source("arithmetic")) == "arithmetic"


def test_only_the_answer_tokens_are_scored():
    """The answer mask covers exactly the answer's tokens (its newline included), and a model
    that is right on every answer token and wrong on every prompt token scores perfectly."""
    from ebt.data import ByteTokenizer
    from ebt.modalities.text.probe import encode_problems, score

    problems = [probe_data.Problem("([=", "])\n"), probe_data.Problem("12+7=", "19\n")]
    encoded = encode_problems(problems, ByteTokenizer(), 16, "in", "test")
    for row, problem in enumerate(problems):
        scored = encoded.targets[row][encoded.answer_mask[row]]
        assert ByteTokenizer().decode(scored) == problem.answer
        assert encoded.inputs[row, 0] == ByteTokenizer.pad_id  # the end id starts each row
    vocab = ByteTokenizer.vocab_size
    logits = torch.nn.functional.one_hot((encoded.targets + 1) % vocab, vocab).float() * 50
    right = torch.nn.functional.one_hot(encoded.targets, vocab).float() * 50
    logits = torch.where(encoded.answer_mask[..., None], right, logits)  # (P, L, V)
    losses, wrong, exact = score(logits, encoded.targets, encoded.answer_mask)
    assert losses.max() < 1e-6 and not wrong.any() and exact.all()
    assert len(losses) == len("])\n") + len("19\n")
    logits[1, encoded.answer_mask[1].nonzero()[-1]] = 0.0  # one answer token of problem 1
    _, wrong, exact = score(logits, encoded.targets, encoded.answer_mask)
    assert exact.tolist() == [True, False] and int(wrong.sum()) == 1


def test_probe_sets_are_held_out_and_ood_is_longer_and_deeper():
    from ebt.data import ByteTokenizer
    from ebt.modalities.text.probe import probe_sets

    spec = probe_data.parse_source("dyck:count=2000")
    sets = probe_sets(spec, ByteTokenizer(), 64, 50, 0.1)
    train = {p.text for p in probe_data.problems(spec, "train", 0.1)}
    inside = {ByteTokenizer().decode(row) for row in sets["in"].targets}  # prompt + answer
    assert len(inside) > 1 and all(text.endswith("\n") for text in inside)
    assert not train & inside
    assert sets["ood"].source == "dyck:count=2000,ood"
    in_lengths = (sets["in"].targets != 0).sum(-1) - 1  # bracket count + '=' - 1 newline
    ood_lengths = (sets["ood"].targets != 0).sum(-1) - 1
    assert in_lengths.max() <= spec.max_length + 1 < ood_lengths.min()


def test_a_problem_longer_than_the_model_fails_in_one_line():
    from ebt.data import ByteTokenizer
    from ebt.modalities.text.probe import probe_sets

    with pytest.raises(DataError, match=r"exceeds the run's data.seq_len=16"):
        probe_sets(probe_data.parse_source("dyck:count=200"), ByteTokenizer(), 16, 8, 0.1)


def _candidates(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64) * 3  # (B, N, S, V)
    energies = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)  # (B, N, S)
    return logits, energies


def test_selection_lowest_is_the_papers_rule_and_sequence_picks_one_index_per_row():
    from ebt.thinking.selection import Selection, select, select_lowest

    logits, energies = _candidates()
    chosen, lowest = select(logits, energies, Selection())
    expected, expected_energy = select_lowest(logits, energies, dim=1)
    assert torch.equal(chosen, expected) and torch.equal(lowest, expected_energy)
    chosen, picked = select(logits, energies, Selection("sequence"))
    for row in range(2):
        best = min(range(3), key=lambda n: float(energies[row, n].sum()))
        assert torch.equal(chosen[row], logits[row, best])
        assert torch.equal(picked[row], energies[row, best])


def test_selection_weighted_is_the_energy_weighted_mixture():
    """Against a float64 loop: p = sum_n softmax(-E/T)_n softmax(y_n); T -> 0 gives the lowest
    candidate's distribution, T -> inf the plain average, whose loss never exceeds the mean."""
    from ebt.thinking.selection import Selection, select

    logits, energies = _candidates()
    temperature = 0.7
    mixture, energy = select(logits, energies, Selection("weighted", temperature))
    for b, s in ((0, 0), (1, 4)):
        weights = torch.softmax(-energies[b, :, s] / temperature, dim=0)  # (N,)
        expected = sum(weights[n] * torch.softmax(logits[b, n, s], -1) for n in range(3))
        assert torch.allclose(mixture[b, s].exp().double(), expected, atol=1e-6)
        assert torch.allclose(energy[b, s].double(), (weights * energies[b, :, s]).sum())
    sharp, _ = select(logits, energies, Selection("weighted", 1e-6))
    lowest, _ = select(logits, energies, Selection())
    assert torch.allclose(sharp.exp().double(), lowest.softmax(-1), atol=1e-6)
    flat, _ = select(logits, energies, Selection("weighted", 1e9))
    average = logits.softmax(-1).mean(1)  # (B, S, V)
    assert torch.allclose(flat.exp().double(), average, atol=1e-6)
    targets = torch.randint(0, 7, (2, 5))
    mixed_loss = -flat.double().gather(-1, targets[..., None])  # (B, S, 1)
    each = -logits.log_softmax(-1).gather(-1, targets[:, None, :, None].expand(-1, 3, -1, 1))
    assert (mixed_loss.squeeze(-1) <= each.squeeze(-1).mean(1) + 1e-9).all()


@pytest.mark.parametrize(("rule", "temperature"), [("best", 1.0), ("weighted", 0.0)])
def test_bad_selection_fails_in_one_line(rule, temperature):
    from ebt.thinking.selection import Selection

    with pytest.raises(ValueError, match="selection"):
        Selection(rule, temperature)
