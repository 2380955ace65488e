"""DDIM (arXiv 2010.02502), deterministic (eta = 0), as diffusers' ``DDIMScheduler``.

Each step estimates x0, then moves to the previous timestep along the same
noise direction: ``x' = sqrt(a') x0 + sqrt(1 - a') eps_hat`` with
``eps_hat = (x - sqrt(a) x0) / sqrt(1 - a)`` (a = alpha-bar).
"""
from __future__ import annotations

import math

import numpy as np

from .base import Scheduler, StepCoefficients, denoise_coefficients
from .config import SchedulerConfig, SchedulerConfigError
from .noise_schedule import spaced_timesteps


class DDIM(Scheduler):
    name = "ddim"

    def _check_config(self, config: SchedulerConfig) -> None:
        super()._check_config(config)
        if config.clip_sample:
            raise SchedulerConfigError("ddim: clip_sample=True is not supported (it is not an affine step)")

    def _plan(self, num_steps: int) -> tuple[np.ndarray, list[StepCoefficients]]:
        T = self.config.num_train_timesteps
        timesteps = spaced_timesteps(self.config, num_steps).astype(np.int64)
        ac = self.alphas_cumprod.astype(np.float64)
        final = 1.0 if self.config.set_alpha_to_one else ac[0]
        # diffusers steps back by T // n whatever the spacing, not to the next listed timestep.
        stride = T // num_steps
        coefficients = []
        for t in timesteps:
            a, a_prev = ac[t], (ac[t - stride] if t - stride >= 0 else final)
            keep_noise = math.sqrt(1.0 - a_prev) / math.sqrt(1.0 - a)
            coefficients.append(StepCoefficients.from_denoised_update(
                input_scale=1.0,
                denoise=_denoise(self.config.prediction_type, a),
                sample=keep_noise,
                denoised=math.sqrt(a_prev) - keep_noise * math.sqrt(a),
            ))
        return timesteps, coefficients


def _denoise(prediction_type: str, alpha_bar: float) -> tuple[float, float]:
    with np.errstate(divide="ignore"):  # alpha-bar 0 (zero terminal SNR) is reported by set_timesteps
        alpha = np.float64(math.sqrt(alpha_bar))
        return denoise_coefficients(prediction_type, alpha, math.sqrt(1.0 - alpha_bar))
