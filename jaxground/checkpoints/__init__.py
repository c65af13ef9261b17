"""Checkpoints in and out: converted dirs, training workdirs, HF dirs.

`restore_model` is the one way to rebuild a model from stored parameters.
"""

from jaxground.checkpoints.converted import CheckpointError, read_config, save_params
from jaxground.checkpoints.processor import load_processor
from jaxground.checkpoints.restore import load, restore_model
from jaxground.checkpoints.workdir import is_workdir, latest_step

__all__ = ["CheckpointError", "is_workdir", "latest_step", "load", "load_processor",
           "read_config", "restore_model", "save_params"]
