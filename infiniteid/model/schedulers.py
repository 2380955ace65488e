"""diffusers schedulers by our scheduler names (the runtime has numpy twins of these)."""
from __future__ import annotations

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ..generation import SCHEDULERS, InvalidRequest


def make_torch_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler (fresh state: Euler and DPM++ count their steps)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise InvalidRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
