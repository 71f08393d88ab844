"""Run-directory checkpoints: atomic, pruned, and loadable without unpickling code.

Layout (the user-facing contract)::

    RUN/step_NNNNNN/model.safetensors   model weights (safetensors)
    RUN/step_NNNNNN/config.json         the resolved config (JSON, sorted keys)
    RUN/step_NNNNNN/train_state.pt      optimizer, scheduler, step, RNG states, caller's `extra`
    RUN/latest                          text file naming the newest step directory

A checkpoint is written into `RUN/.tmp-step_NNNNNN-<pid>/`, its files fsynced, the directory
renamed into place with `os.replace`, and only then is `latest` rewritten (also via a temporary
file and `os.replace`). A crash at any point therefore leaves `latest` naming a complete
checkpoint; leftover `.tmp-*` directories are never picked up (`remove_stale_temporaries`
deletes them). `train_state.pt` holds only tensors and plain Python containers/scalars, so it
loads with `torch.load(weights_only=True)`. Every load validates what it reads: a truncated,
corrupt or refused file is a one-line CheckpointFileError naming it (`load_newest_valid`
falls back to an older checkpoint).
"""

from ebt.checkpoint.layout import (
    CONFIG_FILE,
    LATEST_FILE,
    MODEL_FILE,
    STEP_PREFIX,
    TRAIN_STATE_FILE,
    latest_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    step_dir_name,
    step_dirs,
)
from ebt.checkpoint.read import (
    CheckpointFileError,
    LoadedCheckpoint,
    load_model_state,
    load_newest_valid,
    load_train_state,
    read_torch_file,
)
from ebt.checkpoint.write import (
    restore_rng,
    rng_state,
    save_checkpoint,
    write_run_config,
)

__all__ = [
    "CONFIG_FILE",
    "LATEST_FILE",
    "MODEL_FILE",
    "STEP_PREFIX",
    "TRAIN_STATE_FILE",
    "CheckpointFileError",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_model_state",
    "load_newest_valid",
    "load_train_state",
    "prune_checkpoints",
    "read_torch_file",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "step_dir_name",
    "step_dirs",
    "write_run_config",
]
