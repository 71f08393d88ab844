"""Thinking parity of imported and exported checkpoints: our `ebt` vs the paper's own code.

How to run (CPU; the paper's code is imported at run time, never vendored here):

    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference
    EBT_REFERENCE_DIR=/tmp/ebt-reference python benchmarks/reference_parity.py [--json]

Cases, each for the variants time_embed, default and adaln (and Transformer++ logits):

- vectors: the parity vectors' `ref.ckpt` (tests/vectors, or EBT_VECTORS) imported with
  `ebt.interop.import_reference`; the paper's `EBT_NLP` is built from the same checkpoint.
- random: the paper's `EBT_NLP` (and Transformer++) built with its own random initialisation at
  the size given by --dim/--layers/--heads/--vocab/--context (System-1 flags, 2 landscapes, step
  size --step-size), saved as a `.ckpt` in the paper's layout and imported; thinking takes
  --steps steps per landscape.
- export: a randomly initialised model of ours at that size, written with
  `ebt.interop.export_reference` and loaded into the paper's `EBT_NLP` from the exported
  hyper-parameters and state_dict alone.

Both sides think at inference from the same initial candidate (the paper's
`ebt_advanced_inference` with its noise draw replaced by that tensor; ours `model.think(tokens,
init=...)`). Reported per step: the worst relative difference max|ours - paper| / max|paper| of
the energies (of the state each step starts from; "final": of the last state, the paper's extra
forward) and of the states after each step; Transformer++ rows compare logits. The exit status
is 1 when any exceeds --tolerance (1e-4).

Columns ours_fp32 / paper_fp32 give each side's own float32 error against our float64 run of the
same trajectory: what float32 rounding alone does, hence how closely any two float32
implementations can agree. Untrained random weights make large steps ill-conditioned (at the
paper's System-1 step size 500 their candidates reach |logits| ~ 1e5 and the softmax saturates),
so the default --step-size for random models is 0.05; larger ones show differences that track
those two columns.

The paper's modules import pytorch_lightning, torchmetrics, torchvision, diffusers and
transformers at module level; absent ones are replaced by inert stand-ins (see
reference_speed.py) and its Hugging Face tokenizer by a stand-in of the checkpoint's vocabulary
size, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_speed import REFERENCE_HPARAMS, reference_dir  # noqa: E402
from reference_speed import import_reference as import_paper_modules  # noqa: E402

import ebt  # noqa: E402
from ebt.checkpoint import save_checkpoint, write_run_config  # noqa: E402
from ebt.config import Config, finalize  # noqa: E402
from ebt.data import ByteTokenizer  # noqa: E402
from ebt.interop.convert import (  # noqa: E402
    export_reference,
    import_reference,
    read_reference_checkpoint,
)
from ebt.interop.reference import INFERENCE_DEFAULTS  # noqa: E402
from ebt.models import build_model  # noqa: E402

VARIANTS = ("time_embed", "default", "adaln")
VECTORS = Path(
    os.environ.get("EBT_VECTORS", Path(__file__).resolve().parents[1] / "tests" / "vectors")
)


def sized_tokenizer(vocab: int) -> type:
    """A stand-in for transformers.AutoTokenizer whose tokenizers have `vocab` entries."""

    class Tokenizer:
        eos_token_id = pad_token_id = 0

        def __len__(self) -> int:
            return vocab

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Tokenizer:
            return cls()

    return Tokenizer


def paper_model(
    modules: dict,
    hparams: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    vocab: int | None = None,
) -> nn.Module:
    """The paper's EBT_NLP / Baseline_Transformer_NLP from hyper-parameters and weights (or
    its own random initialisation when state is None; vocab then sizes the vocabulary)."""
    if state is not None:
        vocab = int(state["model.embeddings.weight"].shape[0])
    for name in ("model.nlp.ebt", "model.nlp.baseline_transformer"):
        modules[name].AutoTokenizer = sized_tokenizer(vocab)
    if hparams.get("model_name", "ebt") == "ebt":
        model = modules["model.nlp.ebt"].EBT_NLP(hparams)
    else:
        model = modules["model.nlp.baseline_transformer"].Baseline_Transformer_NLP(hparams)
    if state is not None:
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return model.eval()


def paper_think(model: nn.Module, tokens: torch.Tensor, init: torch.Tensor, steps: int) -> tuple:
    """(states after each step, energies per step + final) of the paper's inference thinking."""
    landscapes = model.hparams["mcmc_num_steps"]
    default = model.hparams["ebt_type"] == "default"
    model.hparams["infer_ebt_num_steps"] = steps * landscapes if default else steps
    model.corrupt_embeddings = lambda embeddings: init.clone()  # the same initial candidate
    _, energies, states = model.ebt_advanced_inference(tokens, learning=False)
    return states[1:], energies


def our_think(model: nn.Module, tokens: torch.Tensor, init: torch.Tensor, steps: int) -> tuple:
    """(states after each step, energies per step + final) of our `think`."""
    trajectory = model.think(tokens, init=init, steps=steps)
    with torch.no_grad():
        cache = model.encode_context(tokens, landscape=model.args.landscapes - 1)
        final = model.energies(cache, trajectory.states[-1].softmax(-1))
    return trajectory.states, [*trajectory.energies, final]


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.reshape(ours.shape)
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12)).item()


def worst(ours: list, reference: list, step: int) -> float | None:
    """relative(ours[step], reference[step]) when both have that step."""
    if step >= len(ours):
        return None
    return relative(ours[step].double(), reference[step].double())


def compare(case: str, variant: str, ours: nn.Module, theirs: nn.Module, batch: dict) -> list:
    """Rows {case, variant, step, energy, state, ours_fp32, paper_fp32} (state None for the
    final energy). ours_fp32 / paper_fp32: each side's own float32 error against our float64
    run, i.e. what float32 rounding alone does to this trajectory."""
    tokens, init, steps = batch["tokens"], batch["init"], batch["steps"]
    our_states, our_energies = our_think(ours, tokens, init, steps)
    paper_states, paper_energies = paper_think(theirs, tokens, init, steps)
    exact_states, exact_energies = our_think(
        copy.deepcopy(ours).double(), tokens, init.double(), steps
    )
    assert len(our_states) == len(paper_states) and len(our_energies) == len(paper_energies)
    rows = []
    for step in range(len(our_energies)):
        label = step + 1 if step < len(our_states) else "final"
        row = {"case": case, "variant": variant, "step": label}
        row["energy"] = worst(our_energies, paper_energies, step)
        row["state"] = worst(our_states, paper_states, step)
        for side, states, energies in (
            ("ours_fp32", our_states, our_energies),
            ("paper_fp32", paper_states, paper_energies),
        ):
            errors = (worst(states, exact_states, step), worst(energies, exact_energies, step))
            row[side] = max(error for error in errors if error is not None)
        rows.append(row)
    return rows


def compare_logits(case: str, ours: nn.Module, theirs: nn.Module, tokens: torch.Tensor) -> dict:
    with torch.no_grad():
        paper = theirs(tokens, learning=False, return_raw_logits=True)
        mine = ours(tokens)
    row = {"case": case, "variant": "transformer_pp", "step": "logits", "energy": None}
    return row | {"state": relative(mine, paper), "ours_fp32": None, "paper_fp32": None}


def word_tokenizer(path: Path, vocab: int) -> str:
    """A word-level tokenizer.json with `vocab` entries (id 0 = "<|endoftext|>")."""
    from tokenizers import Tokenizer, models

    words = {"<|endoftext|>": 0} | {f"w{i}": i for i in range(1, vocab)}
    Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>")).save(str(path))
    return str(path)


def vectors_case(modules: dict, work: Path) -> list:
    rows = []
    for variant in (*VARIANTS, "transformer_pp"):
        name = variant if variant == "transformer_pp" else f"ebt_{variant}"
        source = VECTORS / name / "ref.ckpt"
        checkpoint = read_reference_checkpoint(source)
        vocab = checkpoint["state_dict"]["model.embeddings.weight"].shape[0]
        tokenizer = word_tokenizer(work / f"{name}-tokenizer.json", vocab)
        import_reference(source, work / f"vectors-{name}", tokenizer)
        ours = ebt.load(work / f"vectors-{name}")
        hparams = checkpoint["hyper_parameters"]  # it names no model_name; the weights tell
        hparams["model_name"] = "baseline_transformer" if variant == "transformer_pp" else "ebt"
        theirs = paper_model(modules, hparams, checkpoint["state_dict"])
        expected = torch.load(VECTORS / name / "expected.pt", weights_only=True)
        tokens = expected["tokens_with_target"][:, :-1]
        if variant == "transformer_pp":
            rows.append(compare_logits("vectors", ours, theirs, tokens))
            continue
        batch = {"tokens": tokens, "init": expected["init"], "steps": 1}
        rows += compare("vectors", variant, ours, theirs, batch)
    return rows


def random_batch(args: argparse.Namespace, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, args.vocab, (args.batch, args.context), generator=generator)
    init = torch.randn(args.batch, args.context, args.vocab, generator=generator)
    return {"tokens": tokens, "init": init, "steps": args.steps}


def paper_hparams(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    values = (
        REFERENCE_HPARAMS
        | INFERENCE_DEFAULTS
        | {
            "context_length": args.context,
            "embedding_dim": args.dim,
            "num_transformer_blocks": args.layers,
            "mcmc_step_size": args.step_size,
            "multiheaded_attention_heads": args.heads,
            "batch_size_per_device": args.batch,
        }
    )
    if variant == "transformer_pp":
        return values | {"model_name": "baseline_transformer"}
    return values | {"model_name": "ebt", "ebt_type": variant}


def random_case(modules: dict, work: Path, args: argparse.Namespace) -> list:
    rows = []
    for index, variant in enumerate((*VARIANTS, "transformer_pp")):
        torch.manual_seed(args.seed + index)
        theirs = paper_model(modules, paper_hparams(args, variant), vocab=args.vocab)
        hparams = dict(theirs.hparams)
        state = {f"model.{key}": value for key, value in theirs.state_dict().items()}
        source = work / f"random-{variant}.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": hparams}, source)
        tokenizer = "byte" if args.vocab == 257 else word_tokenizer(work / "t.json", args.vocab)
        import_reference(source, work / f"random-{variant}", tokenizer)
        ours = ebt.load(work / f"random-{variant}")
        batch = random_batch(args, args.seed + index)
        if variant == "transformer_pp":
            rows.append(compare_logits("random", ours, theirs, batch["tokens"]))
        else:
            rows += compare("random", variant, ours, theirs, batch)
    return rows


def our_run(work: Path, args: argparse.Namespace, variant: str, seed: int) -> Path:
    """A randomly initialised run of ours at the benchmark size (byte vocabulary)."""
    config = finalize(Config())
    config.model.kind = "transformer_pp" if variant == "transformer_pp" else "ebt"
    config.model.variant = "default" if variant == "transformer_pp" else variant
    config.model.dim, config.model.layers, config.model.heads = args.dim, args.layers, args.heads
    config.data.seq_len, config.think.step_size = args.context, args.step_size
    torch.manual_seed(seed)
    run = work / f"ours-{variant}"
    save_checkpoint(run, 0, build_model(config, 257), config.to_dict(), None, None)
    write_run_config(run, config.to_dict())
    ByteTokenizer().save(run / "tokenizer")
    return run


def export_case(modules: dict, work: Path, args: argparse.Namespace) -> list:
    rows, byte_args = [], argparse.Namespace(**{**vars(args), "vocab": 257})
    for index, variant in enumerate((*VARIANTS, "transformer_pp")):
        run = our_run(work, args, variant, args.seed + 10 + index)
        exported = read_reference_checkpoint(export_reference(run, work / f"{variant}.ckpt"))
        theirs = paper_model(modules, exported["hyper_parameters"], exported["state_dict"])
        ours = ebt.load(run)
        batch = random_batch(byte_args, args.seed + 10 + index)
        if variant == "transformer_pp":
            rows.append(compare_logits("export", ours, theirs, batch["tokens"]))
        else:
            rows += compare("export", variant, ours, theirs, batch)
    return rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def report(rows: list[dict[str, Any]], tolerance: float) -> bool:
    """Print the table and the worst differences; True when all are within tolerance."""
    columns = ("energy", "state", "ours_fp32", "paper_fp32")
    print(f"{'case':8} {'variant':15} {'step':>6} " + " ".join(f"{c:>10}" for c in columns))
    for row in rows:
        cells = " ".join(f"{_cell(row[c]):>10}" for c in columns)
        print(f"{row['case']:8} {row['variant']:15} {row['step']!s:>6} {cells}")
    worst_energy = max(row["energy"] or 0.0 for row in rows)
    worst_state = max(row["state"] or 0.0 for row in rows)
    ok = max(worst_energy, worst_state) <= tolerance
    verdict = "PASS" if ok else "FAIL"
    print(
        f"worst ours vs paper: energies {worst_energy:.2e}, states/logits {worst_state:.2e} "
        f"({verdict} at {tolerance:g})"
    )
    above = [row for row in rows if max(row["energy"] or 0.0, row["state"] or 0.0) > tolerance]
    floor = [
        row
        for row in above
        if max(row["energy"] or 0.0, row["state"] or 0.0)
        <= 2 * max(row["ours_fp32"] or 0.0, row["paper_fp32"] or 0.0)
    ]
    if above:
        print(f"{len(above)} row(s) above tolerance, {len(floor)} within 2x the float32 error")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="steps per landscape (random cases)")
    parser.add_argument("--step-size", type=float, default=0.05, help="alpha of random models")
    parser.add_argument("--seed", type=int, default=33)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args()
    modules = import_paper_modules(reference_dir())
    with tempfile.TemporaryDirectory(prefix="ebt-parity-") as folder:
        work = Path(folder)
        rows = vectors_case(modules, work) if VECTORS.is_dir() else []
        rows += random_case(modules, work, args) + export_case(modules, work, args)
    if args.json:
        print(json.dumps(rows))
        ok = all(max(r["energy"] or 0.0, r["state"] or 0.0) <= args.tolerance for r in rows)
    else:
        ok = report(rows, args.tolerance)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
