"""ebt: Energy-Based Transformers in PyTorch.

import ebt
model = ebt.load("runs/tiny")            # a trained run directory
trajectory = model.think(tokens)         # states[k], energies[k] for every thinking step
ebt.save_pretrained("runs/tiny", "export/tiny")   # safetensors + config + tokenizer + card
model = ebt.from_pretrained("export/tiny")        # a directory or a Hugging Face Hub id
"""

from ebt.api import LoadedRun, load, load_run
from ebt.config import Config, ConfigError, load_config
from ebt.interop.hub import from_pretrained, push_to_hub, save_pretrained

__all__ = [
    "Config",
    "ConfigError",
    "LoadedRun",
    "from_pretrained",
    "load",
    "load_config",
    "load_run",
    "push_to_hub",
    "save_pretrained",
]
__version__ = "0.1.0"
