"""ebt: Energy-Based Transformers in PyTorch.

import ebt
model = ebt.load("runs/tiny")            # a trained run directory
trajectory = model.think(tokens)         # states[k], energies[k] for every thinking step
"""

from ebt.api import LoadedRun, load, load_run
from ebt.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "LoadedRun", "load", "load_config", "load_run"]
__version__ = "0.1.0"
