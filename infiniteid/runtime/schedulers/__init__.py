"""Torch-free numpy samplers that reproduce diffusers' DDIM, Euler and DPM-Solver++(2M).

Usage (``i`` is the step index, not the timestep)::

    sched = make_scheduler("euler", manifest.scheduler_config)
    sched.set_timesteps(30)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(x, i), t, ...)
        x = sched.step(eps, i, x)

Every step is affine in (x, eps, previous denoised estimate);
``sched.step_coefficients(i)`` gives the numbers, for loops that run on a
device (see :mod:`.base`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from ...generation import SCHEDULERS, InvalidRequest
from .base import Scheduler, StepCoefficients
from .config import SchedulerConfig, SchedulerConfigError
from .ddim import DDIM
from .dpm_solver import DPMSolverMultistep
from .euler import EulerDiscrete

__all__ = ["DDIM", "DPMSolverMultistep", "EulerDiscrete", "Scheduler", "SchedulerConfig",
           "SchedulerConfigError", "StepCoefficients", "make_scheduler"]

_CLASSES = {"ddim": DDIM, "euler": EulerDiscrete, "dpmpp_2m": DPMSolverMultistep}


def make_scheduler(name: str, config: SchedulerConfig | Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler ``name`` ("ddim", "euler" or "dpmpp_2m") for a config (dataclass or diffusers dict).

    As in the PyTorch reference, "dpmpp_2m" means DPM-Solver++ of order 2 whatever
    the config's ``algorithm_type`` and ``solver_order`` say.
    """
    if name not in _CLASSES:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(config, SchedulerConfig):
        config = SchedulerConfig.from_dict(config)
    if name == "dpmpp_2m":
        config = replace(config, algorithm_type="dpmsolver++", solver_order=2)
    return _CLASSES[name](config)
