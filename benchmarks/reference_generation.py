"""Per-token generation time: our cached generator vs the paper's generator (alexiglad/EBT).

How to run (CPU; the paper's code is imported at run time, never vendored here):

    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference
    EBT_REFERENCE_DIR=/tmp/ebt-reference python benchmarks/reference_generation.py --threads 1

Setting (the issue's): dim 256, 4 layers, 4 heads, context 256, byte vocabulary (257), EBT
time_embed with 2 landscapes x 1 step (the paper's `mcmc_num_steps=2`), batch 1, float32,
greedy. A prompt of `context - tokens` random ids is continued by `tokens` tokens, so every
measured token sees a prefix near the full context.

Entries, timed token by token in one process and interleaved (so machine noise hits all alike):
- reference: the paper's per-token step in `inference/nlp/generate_text.py`: its `EBT_NLP`
  forward (`learning=False, return_raw_logits=True`) over the whole prefix, re-optimising every
  position, then the last position's argmax.
- ours_cached: `ebt.modalities.text.generate.generate_ids` (KV cache, newest position only).
- ours_recompute: the same with `cached=False` (whole prefix re-run and re-optimised, but with
  our split streams), the `naive_ms_per_token` of `ebt bench generate`.
Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_speed as shared  # noqa: E402  (the paper's-code loader and stand-ins)

from ebt.config import load_config  # noqa: E402
from ebt.modalities.text.generate import generate_ids  # noqa: E402
from ebt.models import build_model  # noqa: E402

CONTEXT = 256


def _reference_tokens(path: str, prompt: list[int], count: int) -> Iterator[int]:
    """The paper's generator loop (no KV cache), one token per iteration."""
    modules = shared.import_reference(path)
    hparams = dict(shared.REFERENCE_HPARAMS, context_length=CONTEXT, batch_size_per_device=1)
    torch.manual_seed(shared.SEED)
    model = modules["model.nlp.ebt"].EBT_NLP(hparams).eval()
    tokens = torch.tensor([prompt])  # (1, P)
    for _ in range(count):
        with torch.no_grad():
            outputs = model.forward(tokens, start_pos=0, learning=False, return_raw_logits=True)
        next_token = outputs[0][-1][:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens = torch.cat((tokens, next_token), dim=1)
        yield int(next_token)


def _our_tokens(prompt: list[int], count: int, cached: bool) -> Iterator[int]:
    overrides = ["model.variant=time_embed", "model.dim=256", "model.layers=4"]
    overrides += ["model.heads=4", f"data.seq_len={CONTEXT}", "think.landscapes=2"]
    torch.manual_seed(shared.SEED)
    model = build_model(load_config(None, overrides + ["think.steps=1"]), shared.VOCAB).eval()
    yield from generate_ids(model, prompt, count, CONTEXT, cached=cached)


def measure(path: str, tokens: int) -> dict[str, list[float]]:
    """Seconds per token of each entry, one token of each in turn; the first token (which
    also pays the prompt's prefill) is dropped."""
    prompt = torch.randint(1, shared.VOCAB, (CONTEXT - tokens - 1,)).tolist()
    streams = {
        "reference": _reference_tokens(path, prompt, tokens + 1),
        "ours_cached": _our_tokens(prompt, tokens + 1, cached=True),
        "ours_recompute": _our_tokens(prompt, tokens + 1, cached=False),
    }
    times: dict[str, list[float]] = {name: [] for name in streams}
    for _ in range(tokens + 1):
        for name, stream in streams.items():
            start = time.perf_counter()
            next(stream)
            times[name].append(time.perf_counter() - start)
    return {name: seconds[1:] for name, seconds in times.items()}


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    ms = {name: 1000 * statistics.median(seconds) for name, seconds in times.items()}
    paired = [
        theirs / mine for theirs, mine in zip(times["reference"], times["ours_cached"], strict=True)
    ]
    return {
        "ms_per_token": {name: round(value, 2) for name, value in ms.items()},
        "speedup_cached_vs_reference": round(ms["reference"] / ms["ours_cached"], 2),
        "speedup_cached_vs_reference_paired": round(statistics.median(paired), 2),
        "speedup_cached_vs_recompute": round(ms["ours_recompute"] / ms["ours_cached"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="timed tokens per entry")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    path = shared.reference_dir()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = {"context": CONTEXT, "tokens": args.tokens, "threads": torch.get_num_threads()}
    result |= summarise(measure(path, args.tokens))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
