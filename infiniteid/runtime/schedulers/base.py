"""What the three samplers share: steps as affine maps, and the bookkeeping around them.

With deterministic settings (no churn, eta = 0, no clipping or thresholding),
DDIM, Euler and DPM-Solver++(2M) all move the latents by a linear combination
of the current sample ``x``, the (guided) model output ``eps`` and, for the
multistep solver, the previous step's denoised estimate. Each scheduler
therefore only tabulates six numbers per step (:class:`StepCoefficients`),
and one piece of code applies them. The same table drives a loop that runs
entirely on an accelerator (an ONNX graph of the step takes the six numbers
as inputs), so host and device loops cannot drift apart.

Numerics: coefficients are float64; :meth:`Scheduler.step` takes and returns
float32 arrays, computes in float64 and keeps the denoised estimate for the
next step in float32 (as diffusers keeps its model outputs, and as a device
loop would). diffusers computes in float32, so the two differ by float32
rounding (about 1e-7 of the sample's scale per step).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import numpy as np

from .config import SchedulerConfig, SchedulerConfigError
from .noise_schedule import training_alphas_cumprod


@dataclass(frozen=True)
class StepCoefficients:
    """One step as affine maps; ``prev`` is the previous step's ``denoised`` (0 on the first step).

    - U-Net input: ``input_scale * x``
    - ``denoised = denoised_sample * x + denoised_model_output * eps``
      (the model's estimate of the clean latents, "x0")
    - ``x_next = sample * x + model_output * eps + prev_denoised * prev``
    """

    input_scale: float
    sample: float
    model_output: float
    prev_denoised: float
    denoised_sample: float
    denoised_model_output: float

    NAMES: ClassVar[tuple[str, ...]]  # field order, e.g. for an ONNX graph input

    @classmethod
    def from_denoised_update(cls, *, input_scale: float, denoise: tuple[float, float],
                             sample: float, denoised: float, prev_denoised: float = 0.0) -> "StepCoefficients":
        """Build from a step written as ``x_next = sample*x + denoised*D + prev_denoised*prev``.

        ``denoise`` is (``denoised_sample``, ``denoised_model_output``); substituting
        ``D`` gives the coefficients on ``x`` and ``eps``.
        """
        ds, dm = denoise
        return cls(
            input_scale=float(input_scale),
            sample=float(sample + denoised * ds),
            model_output=float(denoised * dm),
            prev_denoised=float(prev_denoised),
            denoised_sample=float(ds),
            denoised_model_output=float(dm),
        )

    def as_array(self, dtype=np.float32) -> np.ndarray:
        """The six numbers in field order (:attr:`NAMES`)."""
        return np.array(astuple(self), dtype=dtype)


StepCoefficients.NAMES = tuple(f.name for f in fields(StepCoefficients))


def denoise_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(a, b) with ``x0 = a * x + b * model_output`` for a variance-preserving ``x = alpha*x0 + sigma*noise``."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":  # v = alpha*noise - sigma*x0
        return alpha, -sigma
    return 0.0, 1.0  # "sample": the model predicts x0 itself


class Scheduler:
    """Base class: call :meth:`set_timesteps`, then per step ``i`` :meth:`scale_model_input` and :meth:`step`.

    Subclasses implement :meth:`_plan` (timesteps and coefficients for n steps)
    and may reject config options in :meth:`_check_config`.
    """

    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig):
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        self._check_config(config)
        self.config = config
        self.alphas_cumprod = training_alphas_cumprod(config)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self._coefficients: list[StepCoefficients] = []
        self.reset()

    # -- subclass hooks ---------------------------------------------------
    def _check_config(self, config: SchedulerConfig) -> None:
        if config.thresholding:
            raise SchedulerConfigError(f"{self.name}: thresholding=True is not supported (it is not an affine step)")

    def _plan(self, num_steps: int) -> tuple[np.ndarray, list[StepCoefficients]]:
        raise NotImplementedError

    def _init_noise_sigma(self) -> float:
        return 1.0

    # -- public API -------------------------------------------------------
    def set_timesteps(self, num_steps: int) -> None:
        """Choose ``num_steps`` inference steps; also starts a new trajectory (:meth:`reset`)."""
        T = self.config.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise ValueError(f"number of steps must be an integer in [1, {T}], got {num_steps!r}")
        self.timesteps, self._coefficients = np.zeros(0, dtype=np.int64), []  # unusable until this succeeds
        timesteps, coefficients = self._plan(int(num_steps))
        for i, c in enumerate(coefficients):
            if not np.all(np.isfinite(c.as_array(np.float64))):
                raise SchedulerConfigError(
                    f"{self.name}: the schedule is degenerate for {num_steps} steps: step {i} (timestep "
                    f"{timesteps[i]}) has non-finite coefficients (repeated sigmas, or alpha-bar 0 with "
                    f"prediction_type {self.config.prediction_type!r}; zero terminal SNR needs 'v_prediction')"
                )
        self.timesteps, self._coefficients = timesteps, coefficients
        self.reset()

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the initial latents (multiply unit Gaussian noise by it)."""
        self._require_timesteps()
        return self._init_noise_sigma()

    def step_coefficients(self, i: int) -> StepCoefficients:
        """The affine form of step ``i`` (see :class:`StepCoefficients`)."""
        self._require_timesteps()
        if not 0 <= i < len(self._coefficients):
            raise IndexError(f"step index {i} out of range for {len(self._coefficients)} steps")
        return self._coefficients[i]

    def reset(self) -> None:
        """Forget the trajectory (the previous denoised estimate); the next step must be step 0."""
        self._prev_denoised: np.ndarray | None = None
        self._next_step = 0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The U-Net input for step ``i`` (Euler divides by sqrt(sigma^2 + 1); the others pass through)."""
        scale = self.step_coefficients(i).input_scale
        if scale == 1.0:
            return np.asarray(sample, dtype=np.float32)
        return (np.asarray(sample, dtype=np.float64) * scale).astype(np.float32)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """Step ``i``: the latents for step ``i + 1`` (float32).

        Steps run in order; step 0 starts a new trajectory, so a scheduler can
        be reused for the next batch without :meth:`reset`.
        """
        c = self.step_coefficients(i)
        if i == 0:
            self.reset()
        elif i != self._next_step:
            raise ValueError(f"{self.name}: step {i} requested but the next step is {self._next_step}; "
                             f"steps run in order from 0")
        sample, model_output = np.asarray(sample), np.asarray(model_output)
        if sample.shape != model_output.shape:
            raise ValueError(f"sample shape {sample.shape} != model_output shape {model_output.shape}")
        x = sample.astype(np.float64)
        eps = model_output.astype(np.float64)
        x_next = c.sample * x + c.model_output * eps
        if c.prev_denoised != 0.0:
            x_next += c.prev_denoised * self._prev_denoised
        self._prev_denoised = (c.denoised_sample * x + c.denoised_model_output * eps).astype(np.float32)
        self._next_step = i + 1
        return x_next.astype(np.float32)

    def _require_timesteps(self) -> None:
        if not self._coefficients:
            raise RuntimeError(f"{self.name}: call set_timesteps(num_steps) first")
