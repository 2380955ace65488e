"""`SchedulerConfig`: the typed form of a diffusers ``scheduler_config.json``.

The bundle manifest carries the scheduler config exactly as diffusers wrote it
(``pipe.scheduler.config``). One dataclass holds the union of the keys that
DDIM, Euler and DPM-Solver++ read, so that any of the three can be built from
the same dict, as ``DDIMScheduler.from_config(euler_config)`` does in diffusers.

Missing keys take the values of SDXL base 1.0's scheduler_config.json (the
model this runtime serves) rather than diffusers' per-class constructor
defaults, which disagree between classes (DDIM defaults to ``clip_sample=True``
and ``set_alpha_to_one=True``, Euler and DPM to ``timestep_spacing="linspace"``);
a config exported from a pipeline always carries these keys, so the choice only
matters for hand-written dicts, and ``SchedulerConfig()`` is then SDXL's schedule.

Unknown keys (``_class_name``, ``skip_prk_steps``...) are ignored. Values that
change the maths in a way this runtime does not implement raise
`SchedulerConfigError` instead of being silently ignored: a sampler that runs
but differs from the reference is worse than one that refuses. The checks that
only concern one scheduler (e.g. ``algorithm_type`` for DPM) run when that
scheduler is built, so an Euler-only option does not stop a DDIM run, exactly as
diffusers ignores keys a class does not take.

The error is a :class:`~infiniteid.bundle.BundleError`: the config normally
comes from a bundle manifest, and the command line prints such errors as one
line.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ...bundle import BundleError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class SchedulerConfigError(BundleError):
    """A scheduler config value this runtime does not support (or a malformed one)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule and sampler options, named as in diffusers' scheduler configs."""

    # The training noise schedule (shared by every scheduler).
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    # How inference timesteps are picked from the training ones.
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    # DDIM.
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    thresholding: bool = False
    # Euler and DPM-Solver sigma schedules.
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    # DPM-Solver.
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Build from a diffusers scheduler config dict, ignoring keys no scheduler here reads."""
        if not isinstance(d, Mapping):
            raise SchedulerConfigError(f"scheduler config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (diffusers key names), e.g. for a bundle manifest."""
        d = asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        if self.num_train_timesteps < 1:
            raise SchedulerConfigError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise SchedulerConfigError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise SchedulerConfigError(
                    f"trained_betas has {len(self.trained_betas)} values but "
                    f"num_train_timesteps is {self.num_train_timesteps}"
                )
        else:
            _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SchedulerConfigError(
            f"unsupported {name} {value!r}; supported: {', '.join(repr(a) for a in allowed)}"
        )


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check one field against its annotation; JSON gives lists for tuples and ints for floats."""
    optional = annotation.endswith("| None")
    if value is None:
        if optional:
            return None
        raise SchedulerConfigError(f"{name} must not be null")
    base = annotation.removesuffix("| None").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base == "tuple[float, ...]":
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return tuple(float(v) for v in value)
    raise SchedulerConfigError(f"{name} must be {annotation}, got {value!r}")
