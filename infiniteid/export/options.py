"""``ExportOptions``: what an export bakes into the graphs and declares in the manifest.

Three kinds of settings live here:

* *graph structure*: precision, the ablation switches of the U-Net
  (``mixed_attention``, ``adain``), the ONNX opset, the optional attention plugin.
  They are compile-time choices (see :mod:`infiniteid.export.graphs` for why the
  switches are not graph inputs) and are recorded per component in the manifest's
  ``options``;
* *shape ranges*: the optimal resolution (``height``/``width``), the legal
  resolution range (``min_resolution``..``max_resolution``), how many images one
  batch may hold (``opt_batch``/``max_batch``) and how many identities one request
  may mix (``max_identities``). ONNX graphs take any shape; these ranges become the
  manifest's ``min``/``opt``/``max`` per tensor, which the TensorRT build turns into
  optimisation profiles;
* *the sampler a bundle declares*: ``scheduler_override``, keys set over the model's
  scheduler config in the manifest (``{"timestep_spacing": "trailing"}`` for
  few-step bases such as SDXL-Lightning and Hyper-SD); the graphs do not change.

Resolution fields left ``None`` are filled from the model (:meth:`ExportOptions.resolve`):
the default is the U-Net's native size (1024 for SDXL), the range half to one and a
half times it. Every height and width must divide by the model's resolution multiple
(32 for SDXL: the VAE's 8x times the U-Net's two 2x downsamplings); others are refused
with :class:`~infiniteid.generation.InvalidRequest`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional

from ..generation import InvalidRequest, check_resolution

PRECISIONS = ("fp32", "fp16")
MIN_OPSET, MAX_OPSET = 17, 20  # 17: LayerNormalization; 20: the TorchScript exporter's newest
DEFAULT_OPSET = 17
TWO_GIB = 2 * 1024**3  # protobuf's hard limit for one serialised message


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _round_down(v: int, m: int) -> int:
    return max(m, (v // m) * m)


@dataclass
class ExportOptions:
    """Options of one export. ``None`` resolution fields come from the model.

    ``on_component`` is called with each finished component's name (after its file
    is written); a progress hook for callers, and the place a test can interrupt an
    export half-way.
    """

    precision: str = "fp32"  # text encoders, ID encoder and U-Net
    vae_precision: str = "fp32"  # SDXL's VAE overflows in fp16: only on request
    height: Optional[int] = None  # optimal ("opt") resolution of the profiles
    width: Optional[int] = None
    min_resolution: Optional[int] = None  # smallest legal height and width
    max_resolution: Optional[int] = None  # largest legal height and width
    max_batch: int = 4  # images (requests) per batch
    opt_batch: int = 1
    max_identities: int = 2  # faces one request may mix (the U-Net's ID tokens grow with it)
    mixed_attention: bool = True
    adain: bool = True
    opset: int = DEFAULT_OPSET
    slim: bool = True  # onnxslim: constant folding, dead-node removal, shape inference
    check: bool = True  # onnx.checker on every written graph
    external_data_threshold: int = TWO_GIB  # weights past this go to <component>.onnx.data
    attention_plugin: bool = False  # mixed attention as one custom ONNX node (infiniteid.kernels.onnx_op)
    scheduler_override: Optional[Dict[str, Any]] = None  # keys set over the model's scheduler config (few-step bases)
    on_component: Optional[Callable[[str], None]] = None

    def validate(self) -> None:
        """Checks that need no model (the resolution multiple is checked by :meth:`resolve`)."""
        for key in ("precision", "vae_precision"):
            v = getattr(self, key)
            if v not in PRECISIONS:
                raise InvalidRequest(f"{key} must be one of {', '.join(PRECISIONS)}, got {v!r}")
        for key in ("max_batch", "opt_batch", "max_identities"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidRequest(f"{key.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.opt_batch > self.max_batch:
            raise InvalidRequest(f"opt batch {self.opt_batch} is larger than max batch {self.max_batch}")
        if not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InvalidRequest(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset!r}")
        for key in ("height", "width", "min_resolution", "max_resolution"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise InvalidRequest(f"{key.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.min_resolution and self.max_resolution and self.min_resolution > self.max_resolution:
            raise InvalidRequest(f"min resolution {self.min_resolution} is larger than max resolution {self.max_resolution}")
        if self.external_data_threshold < 0:
            raise InvalidRequest("external_data_threshold must be >= 0")
        if self.scheduler_override is not None and not isinstance(self.scheduler_override, dict):
            raise InvalidRequest(f"scheduler_override must be a dict, got {type(self.scheduler_override).__name__}")

    def resolve(self, multiple: int, default_size: int) -> "ExportOptions":
        """A copy with every resolution field set and checked against the model.

        ``multiple``: pixels a side must divide by; ``default_size``: the model's
        native side (U-Net sample size times the VAE factor).
        """
        self.validate()
        h = self.height if self.height is not None else default_size
        w = self.width if self.width is not None else default_size
        check_resolution(h, w, multiple)
        lo = self.min_resolution
        hi = self.max_resolution
        if lo is None:
            lo = min(h, w, max(multiple, _round_up(default_size // 2, multiple)))
        if hi is None:
            hi = max(h, w, _round_down(default_size * 3 // 2, multiple))
        for name, v in (("min resolution", lo), ("max resolution", hi)):
            if v % multiple:
                raise InvalidRequest(
                    f"{name} {v} is not a multiple of {multiple} (the VAE and U-Net downsampling need it)"
                )
        if lo > hi:
            raise InvalidRequest(f"min resolution {lo} is larger than max resolution {hi}")
        check_resolution(h, w, multiple, lo, hi)
        return replace(self, height=h, width=w, min_resolution=lo, max_resolution=hi)

    def graph_options(self, component: str) -> Dict[str, Any]:
        """What is baked into ``component``'s graph, for the manifest's ``options``."""
        d: Dict[str, Any] = {"opset": self.opset, "slim": self.slim}
        if component == "unet":
            d.update(
                mixed_attention=self.mixed_attention,
                adain=self.adain,
                attention_plugin=self.attention_plugin,
                max_identities=self.max_identities,
            )
        if component == "vae_decoder":
            # The graph takes the raw final latent and divides by the scaling factor itself.
            d.update(scaling_in_graph=True)
        return d

    def precision_of(self, component: str) -> str:
        return self.vae_precision if component == "vae_decoder" else self.precision
