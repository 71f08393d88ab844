"""What importing and exporting checkpoints of the paper's code share for every modality: the
weights must fit the model the config builds, a run directory is written the same way, and
exported weights keep the model's own parameter order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ebt.checkpoint import save_checkpoint, write_run_config
from ebt.config import Config
from ebt.errors import InteropError
from ebt.models import build_model

_PLAIN = (int, float, str, bool, type(None))


def check_loads(config: Config, state: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Fail now, naming the mismatch, if the weights do not fit the model the config builds."""
    with torch.device("meta"):  # shapes only, no memory or init cost
        model = build_model(config, vocab_size)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise InteropError(
            "the weights do not fit the model the hyper-parameters describe: "
            f"missing {missing}, unexpected {extra}, other shapes {shapes}"
        )


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(item) for item in value)
    return isinstance(value, dict) and all(
        isinstance(key, str) and _plain(item) for key, item in value.items()
    )


def write_imported_run(
    out: Path, config: Config, state: dict[str, torch.Tensor], loaded: dict, checkpoint: Any
) -> Path:
    """The run directory of an imported checkpoint (text, image or video): its config, the
    weights as step `global_step`, and the paper's flags kept for a later export."""
    hparams = loaded["hyper_parameters"]
    out.mkdir(parents=True, exist_ok=True)
    config.train.out_dir = str(out)
    write_run_config(out, config.to_dict())
    extra = {
        "reference_checkpoint": str(Path(checkpoint).resolve()),
        "reference_hyper_parameters": {k: v for k, v in hparams.items() if _plain(v)},
    }
    step = int(loaded.get("global_step") or 0)
    return save_checkpoint(out, step, state, config.to_dict(), None, None, extra=extra)


def keeps_ffn_width(original: dict[str, Any], derived: dict[str, Any]) -> bool:
    """Whether an imported run's own ffn_dim_multiplier spells the exported width (None: the
    model width, as in the paper's text and video transformers)."""
    if "ffn_dim_multiplier" not in original:
        return False
    dim = derived["embedding_dim"]

    def width(multiplier: Any) -> int:
        return dim if multiplier is None else int(dim * multiplier)

    return width(original["ffn_dim_multiplier"]) == width(derived["ffn_dim_multiplier"])


def model_order(
    config: Config, state: dict[str, torch.Tensor], vocab_size: int
) -> dict[str, torch.Tensor]:
    """state in the model's own parameter order (not safetensors' sorted one)."""
    with torch.device("meta"):
        order = build_model(config, vocab_size).state_dict()
    return {name: state[name] for name in order if name in state} | state
