"""The training noise schedule, inference timesteps and sigma helpers, as diffusers computes them.

diffusers builds its schedule with torch in float32, and every later step
multiplies latents by numbers derived from it. Over 1000 cumulative products a
one-ulp difference in a beta grows to ~1e-6 relative in ``alphas_cumprod``, the
size of the whole error budget, so this module reproduces torch's rounding where
it accumulates, not just the formulas:

- ``torch.linspace`` on an x86-64 CPU (AVX2/AVX-512 kernels) evaluates
  ``start + step * i`` as one fused multiply-add in float32 (``end - step * (n-1-i)``
  for the upper half). float64 holds ``step * i`` exactly, so one rounding of the
  float64 result to float32 reproduces it; a plain float32 or float64 linspace
  differs in a quarter of the entries. (torch's generic non-SIMD build rounds
  differently again, so "the" diffusers schedule is only defined up to the CPU.)
- ``torch.cumprod`` accumulates float32 in float64 and rounds each output.

torch's vectorised float32 ``sqrt`` is not always correctly rounded (one ulp
off for about a fifth of inputs on AVX-512), so sigmas agree with diffusers to
one ulp (1.2e-7 relative), not bitwise; that error does not accumulate.

The timestep spacings, Karras and sigma-to-timestep helpers are numpy in
diffusers too; they follow it operation for operation.
"""
from __future__ import annotations

import math

import numpy as np

from .config import SchedulerConfig

f32 = np.float32


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as torch's CPU kernel computes it."""
    start32, end32 = f32(start), f32(end)
    if steps == 1:
        return np.array([start32], dtype=f32)
    step = np.float64(f32((end32 - start32) / f32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    lower = np.float64(start32) + step * i
    upper = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, lower, upper).astype(f32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector: float64 accumulation, float32 outputs."""
    return np.cumprod(x.astype(np.float64)).astype(f32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The ``squaredcos_cap_v2`` (Glide cosine) betas, computed in Python floats as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64).astype(f32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32 as diffusers."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(f32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return f32(1.0) - alphas


def training_betas(config: SchedulerConfig) -> np.ndarray:
    """The per-training-step betas (float32) the config describes."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.array(config.trained_betas, dtype=np.float64).astype(f32)
    elif config.beta_schedule == "linear":
        betas = linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion (SD, SDXL) schedule.
        b = linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        betas = b * b
    else:  # "squaredcos_cap_v2", the config validated the name
        betas = cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def training_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha-bar_t for t = 0 .. num_train_timesteps-1, float32."""
    return cumprod_f32(f32(1.0) - training_betas(config))


def karras_sigmas(in_sigmas: np.ndarray, num_steps: int, config: SchedulerConfig) -> np.ndarray:
    """Karras et al. (arXiv 2206.00364) rho=7 sigmas between the ends of ``in_sigmas`` (descending), float64."""
    sigma_min = config.sigma_min if config.sigma_min is not None else in_sigmas[-1].item()
    sigma_max = config.sigma_max if config.sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep whose sigma is ``sigma`` (log-linear interpolation)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), the variance-exploding view of the schedule, float32."""
    return np.sqrt((f32(1.0) - alphas_cumprod) / alphas_cumprod)


def sigma_schedule_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha-bar_t as the sigma-based samplers (Euler, DPM-Solver) use it.

    With zero terminal SNR the last alpha-bar is 0 and its sigma infinite;
    those samplers replace it by 2**-24 (sigma 4096), as diffusers does.
    """
    alphas_cumprod = training_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = f32(2.0**-24)
    return alphas_cumprod


def final_sigma(config: SchedulerConfig, alphas_cumprod: np.ndarray) -> float:
    """The sigma after the last step: 0 (a clean sample) or the smallest training sigma."""
    if config.final_sigmas_type == "sigma_min":
        return float(sigmas_from_alphas_cumprod(alphas_cumprod[:1])[0])
    return 0.0


def spaced_timesteps(config: SchedulerConfig, num_steps: int, *, one_extra: bool = False,
                     round_linspace: bool = True) -> np.ndarray:
    """Descending inference timesteps (float64, integral unless ``round_linspace`` is off).

    ``timestep_spacing`` as in diffusers (arXiv 2305.08891, table 2):
    "leading" takes every (T // n)-th training step from 0 and adds
    ``steps_offset``; "trailing" counts down from T - 1 in steps of T / n;
    "linspace" spreads n points evenly over [0, T - 1].

    DPM-Solver spaces n + 1 points and drops the last (timestep 0) for
    "leading" and "linspace" (``one_extra``); Euler keeps "linspace" fractional
    (``round_linspace=False``).
    """
    T = config.num_train_timesteps
    points = num_steps + 1 if one_extra else num_steps
    if config.timestep_spacing == "leading":
        t = (np.arange(points) * (T // points)).round()[::-1] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / num_steps)) - 1
    else:  # "linspace"
        t = np.linspace(0, T - 1, points)
        t = (t.round() if round_linspace else t)[::-1]
    return t[:-1] if one_extra else t
