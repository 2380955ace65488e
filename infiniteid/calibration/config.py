"""Typed settings of calibration: what to capture, how to quantize, and the prompt set.

``CaptureConfig`` fixes the calibration data (prompts x faces x steps, seeded);
``QuantConfig`` fixes the quantization (precision, SmoothQuant alpha, activation
calibrator, layers kept in high precision). Both ``validate()`` before any work and
raise :class:`CalibrationError` (printed as one line by the CLI).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

PRECISIONS = ("int8", "fp8")
CALIBRATORS = ("max", "percentile")

#: What NVIDIA's diffusers quantization example keeps in high precision (input and output
#: convolutions, the time and added-condition embeddings and the per-block time projections,
#: shortcut convolutions), as modelopt quantizer-name patterns.
KEEP_HIGH_PRECISION: Tuple[str, ...] = (
    "*conv_in*",
    "*conv_out*",
    "*time_embedding*",
    "*add_embedding*",
    "*time_emb_proj*",
    "*conv_shortcut*",
)
#: The projections that make the mixed attention's ID-side keys and values (``attn2``'s
#: ``to_k_ip``/``to_v_ip``); kept in high precision with ``QuantConfig(keep_id_projections=True)``.
ID_PROJECTIONS: Tuple[str, ...] = ("*to_k_ip*", "*to_v_ip*")

DEFAULT_PROMPTS_FILE = "calibration_prompts.txt"


class CalibrationError(ValueError):
    """Calibration that cannot go ahead as asked; the message says why (one line)."""


@dataclass
class CaptureConfig:
    """Which reference runs feed the calibration data.

    ``samples`` generations, sample ``i`` takes prompt ``spread(i, samples, len(prompts))``,
    face ``i % len(faces)`` and seed ``seed + i``; each runs ``steps`` denoising steps at
    ``guidance`` (CFG on when > 1, so both halves of the batch are captured).
    ``height``/``width`` ``None``: the model's native size.
    """

    prompts: List[str]
    steps: int = 20
    samples: int = 32
    seed: int = 0
    guidance: float = 5.0
    height: Optional[int] = None
    width: Optional[int] = None
    scheduler: str = "ddim"

    def validate(self) -> "CaptureConfig":
        if not self.prompts or not any(p.strip() for p in self.prompts):
            raise CalibrationError("the prompt set is empty; give at least one prompt")
        for key in ("steps", "samples"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CalibrationError(f"{key} must be a positive integer, got {v!r}")
        if not self.guidance >= 1.0:
            raise CalibrationError(f"guidance must be >= 1, got {self.guidance!r}")
        return self

    def key(self) -> Dict[str, Any]:
        """What makes two captures the same (a resumed capture must match it)."""
        return asdict(self)


@dataclass
class QuantConfig:
    """How the U-Net is quantized with nvidia-modelopt.

    * ``precision``: ``int8`` (per-channel weights, per-tensor activations, SmoothQuant
      with ``alpha``) or ``fp8`` (E4M3, per-tensor);
    * ``calibrator``: activation ranges from the ``max`` seen, or the ``percentile``
      of a histogram (clips rare outliers);
    * ``keep``: quantizer-name patterns left in high precision (default: NVIDIA's list,
      :data:`KEEP_HIGH_PRECISION`); ``keep_id_projections`` adds :data:`ID_PROJECTIONS`;
    * ``calib_steps``: at most this many captured U-Net calls feed the calibration
      (``None``: all).
    """

    precision: str = "int8"
    alpha: float = 0.8
    calibrator: str = "max"
    percentile: float = 99.99
    keep: Tuple[str, ...] = KEEP_HIGH_PRECISION
    keep_id_projections: bool = False
    calib_steps: Optional[int] = None

    def validate(self) -> "QuantConfig":
        if self.precision not in PRECISIONS:
            raise CalibrationError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.calibrator not in CALIBRATORS:
            raise CalibrationError(f"unknown calibrator {self.calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise CalibrationError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.calib_steps is not None and (not isinstance(self.calib_steps, int) or self.calib_steps < 1):
            raise CalibrationError(f"calib_steps must be a positive integer, got {self.calib_steps!r}")
        return self

    def disabled_patterns(self) -> Tuple[str, ...]:
        return tuple(self.keep) + (ID_PROJECTIONS if self.keep_id_projections else ())

    def to_dict(self) -> Dict[str, Any]:
        """The record written into the bundle manifest (the U-Net's ``options.quantization``)."""
        d = asdict(self)
        d["keep"] = list(self.disabled_patterns())
        d.pop("keep_id_projections")
        if self.precision != "int8":
            d.pop("alpha")  # SmoothQuant is INT8's
        if self.calibrator != "percentile":
            d.pop("percentile")
        d["tool"] = "nvidia-modelopt"
        return d


@dataclass
class PromptSet:
    """Prompts read from a file; ``source`` says where they came from."""

    prompts: List[str]
    source: str = field(default="")


def read_prompts(path: Optional[Union[str, Path]] = None) -> PromptSet:
    """Prompts, one a line (blank lines and ``#`` comments skipped); the shipped default set
    when ``path`` is ``None``. An empty or missing file is a :class:`CalibrationError`."""
    if path is None:
        text = resources.files("infiniteid").joinpath("data", DEFAULT_PROMPTS_FILE).read_text(encoding="utf-8")
        source = f"infiniteid default ({DEFAULT_PROMPTS_FILE})"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CalibrationError(f"prompt file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CalibrationError(f"{p}: not a UTF-8 text file of prompts") from None
        source = str(p)
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise CalibrationError(f"{source}: no prompts in it (one prompt a line; '#' lines are comments)")
    return PromptSet(prompts, source)


def spread(i: int, count: int, n: int) -> int:
    """Which of ``n`` items run ``i`` of ``count`` takes: every item in turn when there are
    runs enough, else items evenly spread over the list (so a short calibration still sees
    portraits, scenes and styles, not only the first prompts)."""
    return i % n if count >= n else (i * n) // count


def split_held_out(prompts: Sequence[str], every: int = 8) -> Tuple[List[str], List[str]]:
    """(calibration, held-out): every ``every``-th prompt is held out for the accuracy report,
    so the report never measures on what calibration saw. With fewer than two prompts
    both sides get the same prompts."""
    if len(prompts) < 2:
        return list(prompts), list(prompts)
    held = [p for i, p in enumerate(prompts) if i % every == every - 1] or [prompts[-1]]
    calib = [p for p in prompts if p not in held]
    return calib, held
