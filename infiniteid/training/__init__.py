"""Identity-enhanced training of the ID module (the paper's objective), with Accelerate.

Map of the subpackage (imports only :mod:`infiniteid.model`, the face front end,
accelerate and diffusers' training utilities):

* :mod:`.config` - :class:`TrainConfig`, the typed JSON config (every field documented);
* :mod:`.data` - one folder per identity -> face front end + VAE latents, run once and
  cached; skipped photos reported;
* :mod:`.objective` - :class:`IdentityTrainingModel` (attn2 in training mode, noise MSE,
  ``c_id`` dropout) and the seeded batches;
* :mod:`.trainer` - :func:`train`: AdamW, accumulation, mixed precision, gradient
  checkpointing, EMA, checkpoints with exact resume, progress bar and JSON log,
  one process or ``accelerate launch``.

``infiniteid train CONFIG`` (:mod:`infiniteid.commands.train`) is the command line.
"""
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig"]
