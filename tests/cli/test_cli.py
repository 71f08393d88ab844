"""The `ebt` command line, called in-process: train, eval, generate, bench, tokenizer, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.text import tiny_overrides as text_overrides
from support.tolerances import relative

import ebt
from ebt.cli.main import main
from ebt.data import iter_eval_batches, load_tokenizer
from ebt.modalities import modality_for
from ebt.training.tracking import read_metrics

TINY = ROOT / "configs" / "text" / "tiny.toml"
TEXT = "\n\n".join(
    f"the {animal} sat on the {thing} and looked at the {other}."
    for animal in ("cat", "dog", "fox", "owl")
    for thing in ("mat", "log", "hill")
    for other in ("sun", "moon", "sky")
)
OOD = "\n\n".join(f"Return value {n}: the function returns a list of {n} items." for n in range(30))


def tiny_overrides(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    """support.text's tiny run as a pred_step EBT of 4 steps, evaluated and saved every 2."""
    cli = ["model.variant=pred_step", "train.max_steps=4", "train.warmup_steps=1"]
    cli += ["train.eval_every=2", "train.log_every=2", "train.save_every=2"]
    return [*text_overrides(run_dir, corpus), *cli, *extra]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A tmp dir holding corpus.txt and ood.txt, with EBT_CACHE_DIR pointing inside it."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "ood.txt").write_text(OOD, encoding="utf-8")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EBT_CACHE_DIR", str(root / "cache"))
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(workspace: Path) -> Path:
    """`ebt train` of a 4-step tiny EBT (evaluated and saved every 2 steps)."""
    run = workspace / "run"
    assert main(["train", str(TINY), *tiny_overrides(run, workspace / "corpus.txt")]) == 0
    return run


def json_output(capsys: pytest.CaptureFixture) -> dict:
    """stdout must be exactly one JSON object."""
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def test_train_writes_the_run_directory(run_dir):
    """config.json, metrics.jsonl, step_NNNNNN/{weights, config, train state} and latest."""
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["train"]["max_steps"] == 4
    assert (run_dir / "latest").read_text().strip() == "step_000004"
    for step in ("step_000002", "step_000004"):
        for name in ("model.safetensors", "config.json", "train_state.pt"):
            assert (run_dir / step / name).is_file()


def test_train_json_with_progress_keeps_stdout_one_json_object(workspace, capsys):
    """With the progress bar on, evaluation rows go to stderr beside it: stdout stays the final
    evaluation only (scripts parse it)."""
    run = workspace / "run-progress"
    extra = ["train.progress=true", "train.max_steps=2"]  # evaluates at step 2 via the bar
    overrides = tiny_overrides(run, workspace / "corpus.txt", *extra)
    assert main(["train", str(TINY), *overrides, "--json"]) == 0
    assert json_output(capsys)["step"] == 2


def test_train_metrics_rows(run_dir):
    """Training rows carry step and loss; evaluation rows carry a split name."""
    rows = read_metrics(run_dir)
    training = [row for row in rows if "split" not in row]
    evaluation = [row for row in rows if "split" in row]
    assert [row["step"] for row in training] == [2, 4]
    assert all(isinstance(row["loss"], float) for row in training)
    assert [(row["step"], row["split"]) for row in evaluation] == [(2, "val"), (4, "val")]


def reference_evaluation(run_path: Path, split: str, overrides: list[str]) -> dict:
    """What `ebt eval` should report on all of a split, computed another way: the same examples
    thought through by model.think from the same seeded noise, per-token cross-entropy from
    log-softmax, means weighted by each batch's non-pad targets, summed in float64."""
    run = ebt.load_run(run_path, overrides)
    train, think = run.config.train, run.config.think
    dataset = modality_for(run.config, run.tokenizer).dataset(split)
    losses, energies, tokens = 0.0, 0.0, 0
    torch.manual_seed(train.seed)
    for batch in iter_eval_batches(dataset, train.batch_size):
        context, targets = batch[:, :-1], batch[:, 1:]  # (B, S) each
        init = torch.randn(*targets.shape, run.tokenizer.vocab_size) * think.init_scale
        trajectory = run.model.think(context, init, langevin_noise=0.0)  # states (B, S, V)
        keep = targets != run.tokenizer.pad_id  # (B, S)
        count = int(keep.sum())
        log_p = [state.double().log_softmax(-1) for state in trajectory.states]  # (B, S, V)
        picked = [-lp.gather(-1, targets[..., None])[..., 0][keep].sum() for lp in log_p]
        losses = losses + torch.stack(picked)  # (steps,) summed token losses
        energies = energies + torch.stack([e.double().mean() for e in trajectory.energies]) * count
        tokens += count
    return {
        "loss_per_step": losses / tokens,
        "energy_per_step": energies / tokens,
        "tokens": tokens,
    }


@pytest.mark.parametrize("split", ["val", "ood"])
def test_eval_json_reports_the_loss_its_perplexity_and_energies(run_dir, workspace, split, capsys):
    """`ebt eval RUN --json` (ood: data.ood_source, a local file) on all of a split: every field
    against reference_evaluation. The last batch is smaller, so a mean over batches instead of
    tokens shows. float32 model, float64 sums: 1e-5 relative. ppl = exp(the final step's loss)."""
    overrides = [f"data.ood_source={workspace / 'ood.txt'}"]
    argv = ["eval", str(run_dir), *overrides, "--split", split, "--batches", "1000", "--json"]
    assert main(argv) == 0
    result = json_output(capsys)
    expected = reference_evaluation(run_dir, split, overrides)
    assert result["split"] == split and result["tokens"] == expected["tokens"]
    assert expected["tokens"] % (4 * 16) != 0  # a partial last batch (batch 4 x seq_len 16)
    losses = expected["loss_per_step"]  # (steps,)
    assert relative(torch.tensor(result["loss_per_step"]), losses) < 1e-5
    assert relative(torch.tensor(result["energy_per_step"]), expected["energy_per_step"]) < 1e-5
    assert result["loss"] == result["loss_per_step"][-1]
    assert result["ppl"] == pytest.approx(math.exp(losses[-1].item()), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    gap = result["energy_per_step"][0] - result["energy_per_step"][-1]
    assert result["energy_gap"] == pytest.approx(gap, rel=1e-12)
    assert result["forward_passes"] == len(result["loss_per_step"]) == 2


def test_generate_prints_prompt_then_text(run_dir, capsys):
    """`ebt generate` streams the prompt followed by the new text."""
    prompt = "the cat"
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    assert len(out) > len(prompt) + 1  # some generated text (bytes of an untrained model)


def test_bench_train_vs_baseline(workspace, capsys, monkeypatch):
    """`ebt bench train ... --vs-baseline --json`: timings and memory for both models."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU peak-memory child processes
    overrides = tiny_overrides(workspace / "bench", workspace / "corpus.txt")
    args = [
        "bench",
        "train",
        str(TINY),
        *overrides,
        "--vs-baseline",
        "--json",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    assert main(args) == 0
    result = json_output(capsys)
    for key in (
        "ms_per_step",
        "peak_mem_mb",
        "baseline_ms_per_step",
        "baseline_peak_mem_mb",
        "ratio_vs_baseline",
        "ratio_vs_baseline_paired",
    ):
        assert result[key] > 0, key
    assert result["ratio_vs_baseline_paired"] == pytest.approx(
        result["ms_per_step"] / result["baseline_ms_per_step"]
    )  # one round: the two ratios agree
    # counted work: the EBT's second-order step does more than the Transformer++'s
    assert result["gflop_per_step"] > result["baseline_gflop_per_step"] > 0
    assert result["gflops"] == pytest.approx(result["gflop_per_step"] / result["ms_per_step"] * 1e3)


def test_tokenizer_train_then_train_with_it(workspace, capsys):
    """`ebt tokenizer train` writes tokenizer.json; a run with data.tokenizer=DIR trains."""
    out = workspace / "bpe"
    args = [
        "tokenizer",
        "train",
        "--source",
        str(workspace / "corpus.txt"),
        "--vocab-size",
        "300",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert (out / "tokenizer.json").is_file()
    run = workspace / "bpe_run"
    overrides = tiny_overrides(
        run,
        workspace / "corpus.txt",
        f"data.tokenizer={out}",
        "train.max_steps=2",
        "data.seq_len=8",
        "train.batch_size=2",
    )
    assert main(["train", str(TINY), *overrides]) == 0
    vocab = load_tokenizer(str(out)).vocab_size
    assert 257 < vocab <= 300  # the byte alphabet, the end token, and merges up to 300
    assert ebt.load(run).vocab_size == vocab
    assert (run / "step_000002" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.dimm=8", ["model.dimm", "Did you mean 'dim'", "layers"]),
        ("modle.dim=8", ["modle", "Did you mean 'model'", "think"]),
    ],
    ids=["key", "section"],
)
def test_misspelled_config_names_exit_2(override, expected, capsys):
    """A typo exits with code 2 and names the valid choices, suggesting the closest."""
    assert main(["train", str(TINY), override]) == 2
    error = capsys.readouterr().err
    for text in expected:
        assert text in error


def test_eval_honours_a_langevin_noise_override(run_dir, capsys):
    """`ebt eval RUN think.langevin_noise=1`: noisy thinking, so two seeds give two losses."""
    losses = []
    for seed in (1, 2):
        args = [
            "eval",
            str(run_dir),
            "think.init=zeros",
            "think.langevin_noise=1",
            f"train.seed={seed}",
            "--json",
        ]
        assert main(args) == 0
        losses.append(json_output(capsys)["loss"])
    assert abs(losses[0] - losses[1]) > 1e-3


def test_missing_data_source_exits_2(tmp_path, capsys, monkeypatch):
    """A data.source that matches nothing is a user error: exit 2 with a one-line message."""
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "train",
        str(TINY),
        f"data.source={tmp_path / 'missing.txt'}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.progress=false",
    ]
    assert main(args) == 2
    assert "matches nothing" in capsys.readouterr().err


def test_python_m_ebt_help():
    """`python -m ebt --help` lists the subcommands."""
    result = subprocess.run(
        [sys.executable, "-m", "ebt", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    for command in ("train", "eval", "generate", "bench", "tokenizer"):
        assert command in result.stdout


def test_think_prints_curves_and_writes_a_plot(run_dir, tmp_path, capsys):
    """`think RUN --steps --samples --json --plot`: one curve point per pair, and a PNG."""
    plot = tmp_path / "think.png"
    args = ["think", str(run_dir), "--steps", "1,2", "--samples", "1,2", "--batches", "1"]
    assert main(args + ["--json", "--plot", str(plot)]) == 0
    result = json_output(capsys)
    assert [(c["steps"], c["samples"]) for c in result["curves"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    assert "energy_auroc_wrong" in result["uncertainty"]
    assert plot.stat().st_size > 1000


def test_think_and_generate_take_the_inference_thinking_options(run_dir, capsys):
    """--step-size, --langevin-noise 0 and --accept-lower-energies reach the thinking, are
    reported, and accepting costs one extra energy evaluation per step."""
    args = ["think", str(run_dir), "--steps", "2", "--samples", "1", "--batches", "1", "--json"]
    assert main(args) == 0
    plain = json_output(capsys)["curves"][0]["forward_passes_per_token"]
    knobs = ["--step-size", "0.5", "--langevin-noise", "0", "--accept-lower-energies"]
    assert main(args + knobs) == 0
    result = json_output(capsys)
    assert result["options"] == {
        "step_size": 0.5,
        "langevin_noise": 0.0,
        "accept_lower_energies": True,
    }
    assert result["curves"][0]["forward_passes_per_token"] == 2 * plain
    prompt = ["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "3"]
    assert main(prompt + knobs) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(args + ["--accept-lower-energies", "--halt-tolerance", "0.1"]) == 2


def test_generate_graphs_gives_the_eager_tokens(run_dir, capsys, monkeypatch):
    """`generate --graphs`: the one-graph decoding step (compiled through aot_eager here) gives
    the eager cached path's tokens; it does not combine with --halt-tolerance (one line)."""
    from ebt.modalities.text import graph_decoding

    torch._dynamo.reset()  # a fresh recompile budget (see test_graph_decoding)
    real = torch.compile
    aot_eager = {"backend": "aot_eager"}
    monkeypatch.setattr(
        graph_decoding.torch,
        "compile",
        lambda function, mode, **kw: real(function, **kw | aot_eager),
    )
    args = ["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "4", "--json"]
    assert main(args + ["--langevin-noise", "0"]) == 0
    eager = json_output(capsys)["tokens"]
    assert main(args + ["--langevin-noise", "0", "--graphs"]) == 0
    graphs = json_output(capsys)["tokens"]
    assert [t["id"] for t in graphs] == [t["id"] for t in eager]
    assert main(args + ["--graphs", "--halt-tolerance", "0.1"]) == 2
    assert "--graphs does not combine" in capsys.readouterr().err


def test_generate_json_and_think_tokens_expose_per_token_uncertainty(run_dir, tmp_path, capsys):
    """`generate --json`: text and, per token, id / text / energy; `think --tokens FILE`: one
    JSON line per token with loss, wrong, energy and (adaptive) steps taken."""
    args = ["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    result = json_output(capsys)
    assert len(result["tokens"]) == 4
    assert all(isinstance(token["energy"], float) for token in result["tokens"])
    assert main(args + ["--steps", "2", "--halt-tolerance", "1e9"]) == 0  # halts after 1 step
    assert [token["steps"] for token in json_output(capsys)["tokens"]] == [1] * 4
    assert "".join(token["text"] for token in result["tokens"]) == result["text"]
    records = tmp_path / "tokens.jsonl"
    think = ["think", str(run_dir), "--steps", "2", "--samples", "1", "--batches", "1"]
    assert main(think + ["--halt-tolerance", "0.5", "--tokens", str(records), "--json"]) == 0
    assert "steps_auroc_wrong" in json_output(capsys)["uncertainty"]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert lines and set(lines[0]) == {
        "loss",
        "wrong",
        "energy",
        "adaptive_energy",
        "adaptive_steps",
    }
    assert all(1 <= line["adaptive_steps"] <= 4 for line in lines)  # 2 landscapes x 2 steps


def test_bench_generate_reports_cached_and_recompute_times(workspace, capsys):
    """`ebt bench generate ... --json`: both paths timed token by token, and their speedups."""
    overrides = tiny_overrides(workspace / "bench", workspace / "corpus.txt")
    args = ["bench", "generate", str(TINY), *overrides, "--new-tokens", "3", "--repeats", "1"]
    assert main(args + ["--json"]) == 0
    result = json_output(capsys)
    for key in ("ms_per_token", "naive_ms_per_token", "speedup", "speedup_paired"):
        assert result[key] > 0, key
    assert result["context_length"] == 16 and result["new_tokens"] == 3
    assert "graphs_ms_per_token" not in result


def test_bench_generate_graphs_also_times_the_one_graph_step(workspace, capsys, monkeypatch):
    """`ebt bench generate --graphs`: the one-graph decoding step timed too (aot_eager here);
    its warm-up tokens must fit in the window with the timed ones (one line otherwise)."""
    from ebt.modalities.text import graph_decoding

    torch._dynamo.reset()  # a fresh recompile budget (see test_graph_decoding)
    real = torch.compile
    monkeypatch.setattr(
        graph_decoding.torch,
        "compile",
        lambda function, mode, **kw: real(function, **kw | {"backend": "aot_eager"}),
    )
    overrides = tiny_overrides(workspace / "bench", workspace / "corpus.txt")
    args = ["bench", "generate", str(TINY), *overrides, "--repeats", "1", "--graphs", "--json"]
    assert main(args + ["--new-tokens", "3"]) == 0
    result = json_output(capsys)
    assert result["graphs_ms_per_token"] > 0 and result["graphs_speedup_vs_cached"] > 0
    assert main(args + ["--new-tokens", "13"]) == 2
    assert "minus 3 with --graphs" in capsys.readouterr().err
