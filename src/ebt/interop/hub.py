"""Sharing models the Hugging Face way: save_pretrained / from_pretrained / push_to_hub.

A pretrained directory holds `model.safetensors`, `config.json` (the resolved ebt config),
`tokenizer/` and a generated model card `README.md`. It is also an ebt step directory, so
`ebt.load`, `ebt eval`, `ebt generate` accept it as they accept a run.

    ebt.save_pretrained("runs/tiny", "export/tiny")
    model = ebt.from_pretrained("export/tiny")        # or a hub id, "user/ebt-tiny"

`huggingface_hub` is imported only when a hub id is loaded or a model pushed; pushing reads the
token from the HF_TOKEN environment variable only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ebt.api import LoadedRun, load_run
from ebt.checkpoint import CONFIG_FILE, MODEL_FILE, load_train_state
from ebt.config import Config, config_from_dict
from ebt.data import ByteTokenizer, Tokenizer
from ebt.interop.reference import InteropError
from ebt.models import EnergyTransformer, TransformerPP
from ebt.nn.wrappers import unwrap
from ebt.outputs import atomic_path, write_text
from ebt.training.tracking import read_metrics

CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"
_HUB_PATTERNS = ["*.safetensors", "*.json", f"{TOKENIZER_DIR}/*", CARD_FILE]


def config_from_model(model: nn.Module) -> Config:
    """The config that builds `model` (an EnergyTransformer or TransformerPP) as it is."""
    model = unwrap(model)
    if not isinstance(model, EnergyTransformer | TransformerPP):
        raise InteropError(f"cannot describe a {type(model).__name__}; pass config=")
    args = model.args
    values: dict[str, Any] = {
        "model": {
            "kind": "ebt" if isinstance(model, EnergyTransformer) else "transformer_pp",
            "dim": args.dim,
            "layers": args.layers,
            "heads": args.heads,
            "ffn_dim": args.ffn_dim,
            "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
        },
        "data": {"seq_len": args.max_seq_len},
    }
    if isinstance(model, EnergyTransformer):
        values["model"]["variant"] = args.variant
        values["think"] = {
            "landscapes": args.landscapes,
            "steps": args.inference_steps,
            "step_size": args.step_size,
            "step_size_learnable": args.step_size_learnable,
            "langevin_noise": args.langevin_noise,
        }
    return config_from_dict(values)


def _run_dir(checkpoint: Path) -> Path:
    """The run directory of a step directory (the directory itself otherwise)."""
    return checkpoint.parent if checkpoint.name.startswith("step_") else checkpoint


def _last_evaluations(checkpoint: Path | None) -> list[dict[str, Any]]:
    """The last metrics.jsonl row of every evaluated split, in order of first appearance."""
    if checkpoint is None:
        return []
    rows = read_metrics(_run_dir(checkpoint))
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "split" in row:
            last[str(row["split"])] = row
    return list(last.values())


def _trained_steps(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    try:
        return int(load_train_state(checkpoint).get("step", 0))
    except FileNotFoundError:
        return None


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No evaluation was recorded (no metrics.jsonl rows with a `split`).\n"
    keys = [k for row in rows for k, v in row.items() if isinstance(v, int | float)]
    columns = ["split"] + list(dict.fromkeys(k for k in keys if k != "split"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_number(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _summary_table(
    model: nn.Module, config: Config, tokenizer: Tokenizer | None, steps: int | None
) -> str:
    m = config.model
    kind = f"EBT ({m.variant})" if m.kind == "ebt" else "Transformer++"
    rows = [
        ("model", kind),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("layers / heads / dim / FFN", f"{m.layers} / {m.heads} / {m.dim} / {m.ffn_dim or m.dim}"),
        ("context", str(config.data.seq_len)),
        ("vocabulary", f"{tokenizer.vocab_size if tokenizer else '?'} ({config.data.tokenizer})"),
    ]
    if isinstance(model, EnergyTransformer):
        alpha = float(model.step_size.detach().float())
        thinking = f"{config.think.landscapes} landscapes x {config.think.steps} step(s)"
        rows.append(("thinking", f"{thinking}, step size {alpha:.4g}"))
    if steps is not None:
        rows.append(("trained steps", str(steps)))
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


_CARD = """---
library_name: ebt
tags:
- ebt
- energy-based-transformer
- text-generation
pipeline_tag: text-generation
---

# {name}

{what} (Gladstone et al. 2025, arXiv:2507.02092) for next-token prediction, saved with ebt
{version}. An EBT scores (context, candidate) pairs with one energy per position and predicts by
gradient descent on the candidate ("thinking").

{summary}
## Evaluation (last recorded evaluation of each split)

{metrics}
## How to load

```python
import ebt

model = ebt.from_pretrained("{location}")  # an nn.Module in eval mode
trajectory = model.think(tokens)  # EBTs: states and energies at every thinking step
```

A downloaded copy of this directory is also an ebt checkpoint:
`ebt generate DIR --prompt "..."`, `ebt eval DIR --json`.

## Training config

```json
{config}
```
"""


def model_card(
    model: nn.Module,
    config: Config,
    tokenizer: Tokenizer | None = None,
    checkpoint: Path | None = None,
    name: str = "ebt model",
    location: str = "THIS_REPO_OR_DIRECTORY",
) -> str:
    """A Hugging Face model card (Markdown with YAML front matter) for a model and its run.

    checkpoint: the run's step directory (for trained steps and metrics.jsonl), if any;
    location: what the loading example passes to from_pretrained (a hub id or a directory).
    """
    import ebt

    kind = config.model.kind
    return _CARD.format(
        name=name,
        what="An Energy-Based Transformer" if kind == "ebt" else "A Transformer++ baseline",
        version=ebt.__version__,
        summary=_summary_table(model, config, tokenizer, _trained_steps(checkpoint)),
        metrics=_metrics_table(_last_evaluations(checkpoint)),
        location=location,
        config=json.dumps(config.to_dict(), indent=2, sort_keys=True),
    )


def _resolve(
    model_or_run: nn.Module | LoadedRun | str | Path,
    config: Config | None,
    tokenizer: Tokenizer | None,
) -> tuple[nn.Module, Config, Tokenizer | None, Path | None]:
    if isinstance(model_or_run, str | Path):
        model_or_run = load_run(model_or_run)
    if isinstance(model_or_run, LoadedRun):
        run = model_or_run
        return run.model, config or run.config, tokenizer or run.tokenizer, run.checkpoint
    model = unwrap(model_or_run)
    config = config or config_from_model(model)
    if tokenizer is None and getattr(model, "vocab_size", None) == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
    return model, config, tokenizer, None


def save_pretrained(
    model_or_run: nn.Module | LoadedRun | str | Path,
    directory: str | Path,
    *,
    config: Config | None = None,
    tokenizer: Tokenizer | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write safetensors weights, config.json, tokenizer/ and a model card README.md.

    model_or_run: a run directory (or step dir), a LoadedRun, or a model; for a bare model the
    config is read off the model and the tokenizer is the byte one when the vocabulary is 257
    (pass `tokenizer=` otherwise). Metrics come from the run's metrics.jsonl when there is one.
    repo_id names the model in the card (its title and loading example) when it goes to the hub.
    """
    model, config, tokenizer, checkpoint = _resolve(model_or_run, config, tokenizer)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    import ebt

    metadata = {"format": "pt", "library": "ebt", "ebt_version": ebt.__version__}
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
    }
    with atomic_path(out / MODEL_FILE) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    write_text(out / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_DIR)
    name = repo_id or (_run_dir(checkpoint) if checkpoint is not None else out.resolve()).name
    card = model_card(model, config, tokenizer, checkpoint, name, repo_id or str(out))
    write_text(out / CARD_FILE, card)
    return out


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise InteropError(
            "the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub "
            "(or pip install 'ebt[hf]')"
        ) from None
    return huggingface_hub


def resolve_pretrained(dir_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is, or a hub id ("user/name") downloaded to the local cache."""
    path = Path(dir_or_hub_id).expanduser()
    if path.exists():
        return path
    text = str(dir_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no directory '{text}' (and it is not a hub id like user/name)")
    hub = _import_hub()
    try:
        local = hub.snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as error:  # offline, unknown repository, no access
        raise InteropError(
            f"'{text}' is not a local directory, and downloading it from the Hugging Face Hub "
            f"failed: {error}"
        ) from error
    return Path(local)


def from_pretrained(
    dir_or_hub_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> nn.Module:
    """The model (eval mode) of a save_pretrained directory, a run directory, or a hub id.

    For the tokenizer and config too, `ebt.load_run(resolve_pretrained(id))`.
    """
    return load_run(resolve_pretrained(dir_or_hub_id, revision), device=device).model


def push_to_hub(
    model_or_run: nn.Module | LoadedRun | str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload ebt model",
) -> str:
    """save_pretrained into a temporary directory and upload it to `repo_id`; returns its URL.

    The token is read from the HF_TOKEN environment variable only.
    """
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise InteropError(
            "pushing needs a Hugging Face token with write access in the HF_TOKEN environment "
            "variable (https://huggingface.co/settings/tokens)"
        )
    hub = _import_hub()
    with tempfile.TemporaryDirectory(prefix="ebt-push-") as folder:
        save_pretrained(model_or_run, folder, repo_id=repo_id)
        try:
            api = hub.HfApi(token=token)
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
            )
        except Exception as error:  # network, auth, permissions: report, never a traceback
            raise InteropError(f"pushing to '{repo_id}' failed: {error}") from error
    return str(url)
