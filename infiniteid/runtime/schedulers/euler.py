"""Euler (Karras et al., arXiv 2206.00364, Algorithm 2 without churn), as diffusers' ``EulerDiscreteScheduler``.

Works on the variance-exploding latents ``x = x0 + sigma * noise``: the U-Net
sees ``x / sqrt(sigma^2 + 1)``, and a step follows the ODE direction
``(x - x0) / sigma`` from sigma to the next sigma.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Scheduler, StepCoefficients, denoise_coefficients
from .config import SchedulerConfig, SchedulerConfigError
from .noise_schedule import (final_sigma, karras_sigmas, sigma_schedule_alphas_cumprod, sigma_to_t,
                             sigmas_from_alphas_cumprod, spaced_timesteps)


class EulerDiscrete(Scheduler):
    name = "euler"

    def _check_config(self, config: SchedulerConfig) -> None:
        super()._check_config(config)
        for option in ("use_exponential_sigmas", "use_beta_sigmas"):
            if getattr(config, option):
                raise SchedulerConfigError(f"euler: {option}=True is not supported")
        if config.interpolation_type != "linear":
            raise SchedulerConfigError(
                f"euler: interpolation_type {config.interpolation_type!r} is not supported; use 'linear'")
        if config.timestep_type != "discrete":
            raise SchedulerConfigError(
                f"euler: timestep_type {config.timestep_type!r} is not supported; use 'discrete'")

    def _plan(self, num_steps: int) -> tuple[np.ndarray, list[StepCoefficients]]:
        ac = sigma_schedule_alphas_cumprod(self.config)
        train_sigmas = sigmas_from_alphas_cumprod(ac)  # float32, ascending in t
        timesteps = spaced_timesteps(self.config, num_steps, round_linspace=False).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_steps, self.config)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
        self.sigmas = np.append(sigmas, final_sigma(self.config, ac)).astype(np.float32)

        coefficients = []
        for sigma, sigma_next in zip(self.sigmas[:-1].astype(np.float64), self.sigmas[1:].astype(np.float64)):
            alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)  # the VE latents are the VP ones divided by alpha
            ds, dm = denoise_coefficients(self.config.prediction_type, alpha, sigma * alpha)
            ratio = sigma_next / sigma  # x' = x + (sigma' - sigma) (x - x0) / sigma
            coefficients.append(StepCoefficients.from_denoised_update(
                input_scale=alpha, denoise=(ds * alpha, dm), sample=ratio, denoised=1.0 - ratio))
        return timesteps, coefficients

    def _init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + np.float32(1.0)))
