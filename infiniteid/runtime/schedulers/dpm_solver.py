"""DPM-Solver++(2M) (arXiv 2211.01095), as diffusers' ``DPMSolverMultistepScheduler``
with ``algorithm_type="dpmsolver++"`` and ``solver_order=2``.

A data-prediction exponential integrator in ``lambda = log(alpha / sigma)``.
With VE sigma ``s`` (``x_vp = alpha * (x0 + s * noise)``) it is ``lambda = -log s``,
so ``exp(-h) = s' / s`` and the step stays finite when the last sigma is 0.
A first-order step is

    x' = (sigma' / sigma) x + alpha' (1 - exp(-h)) D0

and the second-order (multistep) one adds a correction with the previous
step's denoised estimate ``D1 = (D0 - D_prev) / r`` where ``r = h_prev / h``.
The first step, and the last when the final sigma is 0 (or
``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps), is
first order.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Scheduler, StepCoefficients, denoise_coefficients
from .config import SchedulerConfig, SchedulerConfigError
from .noise_schedule import (final_sigma, karras_sigmas, sigma_schedule_alphas_cumprod, sigma_to_t,
                             sigmas_from_alphas_cumprod, spaced_timesteps)

SOLVER_TYPES = ("midpoint", "heun")


class DPMSolverMultistep(Scheduler):
    name = "dpmpp_2m"

    def _check_config(self, config: SchedulerConfig) -> None:
        super()._check_config(config)
        if config.algorithm_type != "dpmsolver++" or config.solver_order != 2:
            raise SchedulerConfigError(
                f"dpmpp_2m: needs algorithm_type 'dpmsolver++' and solver_order 2, got "
                f"{config.algorithm_type!r} and {config.solver_order}")
        if config.solver_type not in SOLVER_TYPES:
            raise SchedulerConfigError(
                f"dpmpp_2m: unsupported solver_type {config.solver_type!r}; supported: 'midpoint', 'heun'")
        for option in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                       "use_dynamic_shifting"):
            if getattr(config, option):
                raise SchedulerConfigError(f"dpmpp_2m: {option}=True is not supported")
        if config.variance_type is not None:
            raise SchedulerConfigError(f"dpmpp_2m: variance_type {config.variance_type!r} is not supported")
        if config.lambda_min_clipped != -math.inf:
            raise SchedulerConfigError("dpmpp_2m: lambda_min_clipped is not supported (leave it at -inf)")

    def _plan(self, num_steps: int) -> tuple[np.ndarray, list[StepCoefficients]]:
        cfg = self.config
        ac = sigma_schedule_alphas_cumprod(cfg)
        train_sigmas = sigmas_from_alphas_cumprod(ac)  # float32, ascending in t
        timesteps = spaced_timesteps(cfg, num_steps, one_extra=True)
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[::-1], num_steps, cfg)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        timesteps = timesteps.astype(np.int64)
        self.sigmas = np.append(sigmas, final_sigma(cfg, ac)).astype(np.float32)

        n = len(timesteps)
        s = self.sigmas.astype(np.float64)
        coefficients = []
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate schedules are reported by set_timesteps
            for i in range(n):
                coefficients.append(self._coefficients_at(i, n, s))
        return timesteps, coefficients

    def _coefficients_at(self, i: int, n: int, s: np.ndarray) -> StepCoefficients:
        """Step ``i`` of ``n``, from the float64 sigmas ``s`` (n + 1 of them)."""
        cfg = self.config
        alpha, alpha_next = _alpha(s[i]), _alpha(s[i + 1])
        exp_neg_h = s[i + 1] / s[i]
        d0 = alpha_next * (1.0 - exp_neg_h)
        denoised, prev = d0, 0.0
        last = i == n - 1
        first_order = i == 0 or (last and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.final_sigmas_type == "zero"))
        if not first_order:
            h = np.log(s[i] / s[i + 1])
            r = np.log(s[i - 1] / s[i]) / h
            # x' = (sigma'/sigma) x + d0 D0 + d1 (D0 - D_prev) / r
            d1 = 0.5 * d0 if cfg.solver_type == "midpoint" else alpha_next * ((exp_neg_h - 1.0) / h + 1.0)
            denoised, prev = d0 + d1 / r, -d1 / r
        return StepCoefficients.from_denoised_update(
            input_scale=1.0,
            denoise=denoise_coefficients(cfg.prediction_type, alpha, s[i] * alpha),
            sample=s[i + 1] * alpha_next / (s[i] * alpha),  # sigma'/sigma of the VP latents
            denoised=denoised, prev_denoised=prev,
        )

def _alpha(sigma: float) -> float:
    """VP alpha for VE sigma: 1 / sqrt(sigma^2 + 1)."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)
