"""Checkpoints of the paper's code (Lightning `.ckpt`) to ebt run directories, and back.

    import_reference("epoch=0-step=1000.ckpt", "runs/imported", tokenizer="neox/tokenizer.json")
    export_reference("runs/imported", "back.ckpt")

Reading never unpickles code: `torch.load(weights_only=True)`, with only Lightning's
`AttributeDict` (read as a plain dict) and the standard library's `Namespace` (read as a
`types.SimpleNamespace`) allowed beyond torch's own list of tensors and plain containers.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from ebt.checkpoint import (
    CheckpointFileError,
    load_model_state,
    load_train_state,
    read_torch_file,
    resolve_checkpoint,
)
from ebt.config import Config, config_from_dict
from ebt.data import ByteTokenizer, Tokenizer, load_tokenizer
from ebt.interop.image_config import (
    image_config_from_hparams,
    image_export_defaults,
    image_hparams_from_config,
    is_image_reference,
    same_ffn_width,
)
from ebt.interop.image_reference import convert_image_state_dict, image_reference_state_dict
from ebt.interop.imported import (
    check_loads,
    keeps_ffn_width,
    model_order,
    write_imported_run,
)
from ebt.interop.reference import (
    InteropError,
    config_from_hparams,
    convert_state_dict,
    hparams_from_config,
    reference_state_dict,
)
from ebt.interop.video_reference import video_reference_checkpoint
from ebt.outputs import atomic_path

# Where Lightning versions define AttributeDict (a dict with attribute access).
_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)
# The paper's hyper-parameters may be pickled as its command line's parsed flags: a plain
# attribute container, rebuilt here as a SimpleNamespace (this library never parses them).
_PARSED_FLAGS = "argparse.Namespace"


def _safe_globals() -> list[Any]:
    """Lightning's AttributeDict is rebuilt as a plain dict, parsed flags as a SimpleNamespace."""
    return [(dict, name) for name in _ATTRIBUTE_DICTS] + [(types.SimpleNamespace, _PARSED_FLAGS)]


def _unsafe_message(path: Path, refused: str) -> str:
    return (
        f"cannot read {path} safely: it holds {refused}. ebt reads checkpoints with "
        "torch.load(weights_only=True), allowing only tensors and plain containers; re-save "
        "its 'state_dict' and 'hyper_parameters' (as a dict) with torch.save and import that"
    )


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a `.ckpt` of the paper's code; `hyper_parameters` a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:  # a truncated or corrupt file: CheckpointFileError, one line naming it
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = read_torch_file(path)
    except CheckpointFileError as error:
        if error.refused is None:
            raise
        raise InteropError(_unsafe_message(path, error.refused)) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InteropError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' dict")
    hparams = checkpoint.get("hyper_parameters") or {}
    if isinstance(hparams, types.SimpleNamespace):
        hparams = vars(hparams)
    if not isinstance(hparams, dict):
        raise InteropError(f"{path}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict")
    checkpoint["hyper_parameters"] = dict(hparams)
    return checkpoint


def resolve_tokenizer(
    spec: str | None, vocab_size: int, reference_name: str | None = None
) -> tuple[Tokenizer, str]:
    """(tokenizer, its `data.tokenizer` spec) for a checkpoint whose vocabulary has vocab_size.

    Without a spec only the byte vocabulary (257) is known; anything else must be given.
    """
    if spec is None:
        if vocab_size == ByteTokenizer.vocab_size:
            return ByteTokenizer(), "byte"
        used = f" (its run used '{reference_name}')" if reference_name else ""
        raise InteropError(
            f"the checkpoint's vocabulary has {vocab_size} tokens{used}; pass --tokenizer SPEC "
            "with that tokenizer: a tokenizer.json, a directory holding one, or hf:NAME where "
            "the Hugging Face Hub is reachable (the paper's runs use EleutherAI/gpt-neox-20b)"
        )
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size != vocab_size:
        raise InteropError(
            f"tokenizer '{spec}' has {tokenizer.vocab_size} tokens but the checkpoint's "
            f"vocabulary has {vocab_size} (the paper's code sizes it as len(tokenizer), "
            "added tokens included: 50277 for EleutherAI/gpt-neox-20b)"
        )
    return tokenizer, "byte" if isinstance(tokenizer, ByteTokenizer) else spec


def _converted(reference: dict[str, torch.Tensor], image: bool = False) -> dict[str, torch.Tensor]:
    try:
        return convert_image_state_dict(reference) if image else convert_state_dict(reference)
    except KeyError as error:
        what = "a denoising EBT or DiT" if image else "a text EBT or Transformer++"
        raise InteropError(f"{error.args[0]} (not {what} of the paper)") from None
    except ValueError as error:  # the stored position table is not the fixed sin-cos one
        raise InteropError(str(error)) from None


def _text_run(
    raw_state: dict[str, torch.Tensor], hparams: dict[str, Any], tokenizer: str | None, out: Path
) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, our state) of a text checkpoint; its tokenizer is saved under out/tokenizer."""
    config = config_from_hparams(hparams, raw_state)
    state = _converted(raw_state)
    vocab_size = int(state["token_embedding.weight"].shape[0])
    chosen, spec = resolve_tokenizer(tokenizer, vocab_size, hparams.get("tokenizer"))
    check_loads(config, state, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    chosen.save(out / "tokenizer")
    config.data.tokenizer = (
        spec if spec == "byte" or spec.startswith("hf:") else str((out / "tokenizer").resolve())
    )
    return config, state


def _image_run(
    raw_state: dict[str, torch.Tensor], hparams: dict[str, Any], tokenizer: str | None
) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, our state) of an image checkpoint (the denoising EBT or the DiT)."""
    if tokenizer is not None:
        raise InteropError("--tokenizer is for text checkpoints; this one holds an image model")
    config = image_config_from_hparams(hparams, raw_state)
    state = _converted(raw_state, image=True)
    check_loads(config, state, 0)
    return config, state


def import_reference(
    checkpoint: str | Path, out_dir: str | Path, tokenizer: str | None = None
) -> Path:
    """Write an ebt run directory from a `.ckpt` of the paper's code; returns its step dir.

    Text models: tokenizer is "byte", "hf:NAME", a tokenizer.json or a directory holding one;
    needed unless the vocabulary is the byte one (257). Image models (the denoising EBT, the
    DiT) take none. The run's step is the checkpoint's global_step (else 0).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} exists and is not an empty directory; choose a new OUT_DIR")
    loaded = read_reference_checkpoint(checkpoint)
    raw_state, hparams = loaded["state_dict"], loaded["hyper_parameters"]
    if is_image_reference(hparams, raw_state):
        config, state = _image_run(raw_state, hparams, tokenizer)
    else:
        config, state = _text_run(raw_state, hparams, tokenizer, out)
    return write_imported_run(out, config, state, loaded, checkpoint)


def _tokenizer_name(config: Config, original: dict[str, Any]) -> str:
    """What the paper's code should load with AutoTokenizer.from_pretrained."""
    if original.get("tokenizer"):
        return str(original["tokenizer"])
    return config.data.tokenizer.removeprefix("hf:")


def _text_export(
    config: Config, state: dict[str, torch.Tensor], original: dict[str, Any], tokenizer: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyper_parameters, state_dict) of a text run in the paper's layout."""
    derived = hparams_from_config(config)
    hparams = {**original, **derived}
    if keeps_ffn_width(original, derived):  # keep the run's own spelling (e.g. 1 for None)
        hparams["ffn_dim_multiplier"] = original["ffn_dim_multiplier"]
    hparams["tokenizer"] = tokenizer or _tokenizer_name(config, original)
    state = model_order(config, state, int(state["token_embedding.weight"].shape[0]))
    return hparams, reference_state_dict(state, config.model.variant)


def _image_export(
    config: Config, state: dict[str, torch.Tensor], original: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyper_parameters, state_dict) of an image run in the paper's layout; flags ebt does
    not model keep an imported run's values, else the paper's defaults."""
    derived = image_hparams_from_config(config)
    hparams = image_export_defaults(config.model.kind) | original | derived
    if same_ffn_width(original, derived):  # keep the run's own spelling (e.g. 1 for 1.0)
        hparams["ffn_dim_multiplier"] = original["ffn_dim_multiplier"]
    patches = (config.data.image_size // config.model.patch_size) ** 2
    state = model_order(config, state, 0)
    return hparams, image_reference_state_dict(state, config.model.kind == "dit", patches)


def export_reference(
    run: str | Path, out_file: str | Path, tokenizer_name: str | None = None
) -> Path:
    """Write a `.ckpt` the paper's code loads (state_dict under `model.`, hyper_parameters).

    Text, image and video runs. The hyper-parameters of an imported run are restored, then every
    flag ebt models is set from the run's config. tokenizer_name (text) overrides what the
    paper's code will load.
    """
    step_dir = resolve_checkpoint(run)
    state, config_dict = load_model_state(step_dir)
    config = config_from_dict(config_dict)
    try:
        train_state = load_train_state(step_dir)
    except FileNotFoundError:
        train_state = {}
    original = (train_state.get("extra") or {}).get("reference_hyper_parameters") or {}
    if config.model.modality == "image":
        hparams, reference = _image_export(config, state, original)
    elif config.model.modality == "video":  # its frozen VAE is not in it: the paper loads its own
        hparams, reference = video_reference_checkpoint(config, state, original)
    else:
        hparams, reference = _text_export(config, state, original, tokenizer_name)
    checkpoint = {
        "state_dict": reference,
        "hyper_parameters": hparams,
        "global_step": int(train_state.get("step", 0)),
        "epoch": 0,
    }
    out = Path(out_file)
    with atomic_path(out) as temporary:
        torch.save(checkpoint, temporary)
    return out
