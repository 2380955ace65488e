"""Optimisation profiles from the manifest's shape ranges.

A TensorRT engine takes input shapes only inside its optimisation profile
(``min <= shape <= max`` per dimension) and is fastest at ``opt``. The bundle's
manifest declares, per input, the range its ONNX export supports
(:class:`infiniteid.bundle.TensorSpec` ``min``/``opt``/``max``). Two modes:

* ``dynamic``: the manifest's ranges as they are; one engine serves every
  resolution, batch and identity-token count the export declared;
* ``static`` (the default): the U-Net, the VAE decoder and the step graph, which
  run once per step or per image and dominate the time, get one fixed shape, by
  default the manifest's default resolution (1024x1024 for SDXL) with one image,
  classifier-free guidance on and one identity. Static engines are faster and
  let the runtime replay each step as a CUDA graph. The encoders keep the
  manifest's ranges even then: they run once per request, and how many prompts
  and faces they see varies with the batch (negative prompts, mixed identities).

Symbolic dimensions (:mod:`infiniteid.contract`) are resolved from the request:
``images``, ``batch`` (= 2 streams x 2 CFG halves x images), ``pairs``
(= batch / 2), ``latent_height``/``latent_width`` (pixels / 8), ``height``/``width``;
any other symbol (``id_tokens``) takes the manifest's ``opt``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..bundle import ComponentSpec, Manifest, TensorSpec
from ..contract import UNET, VAE_DECODER
from ..generation import VAE_SCALE_FACTOR, check_resolution, resolution_multiple
from ..layout import BatchLayout
from .names import Profile
from .step_graph import STEP_CFG, STEP_NOCFG

SHAPE_MODES = ("static", "dynamic")
#: Engines whose shapes are fixed in static mode (the per-step and per-image graphs).
STATIC_COMPONENTS = (UNET, VAE_DECODER, STEP_CFG, STEP_NOCFG)
Shape = Tuple[int, ...]


class ProfileError(ValueError):
    """A requested shape the bundle's export does not cover; the message says which and what to do."""


@dataclass(frozen=True)
class ShapePlan:
    """Which shapes the engines are built for. See the module docstring."""

    mode: str = "static"
    height: int = 1024
    width: int = 1024
    images: int = 1
    cfg: bool = True

    def validate(self, multiple: int = 8) -> None:
        if self.mode not in SHAPE_MODES:
            raise ProfileError(f"shapes must be one of {', '.join(SHAPE_MODES)}, got {self.mode!r}")
        check_resolution(self.height, self.width, multiple)
        if not isinstance(self.images, int) or self.images < 1:
            raise ProfileError(f"images must be a positive integer, got {self.images!r}")

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        mode: str = "static",
        height: Optional[int] = None,
        width: Optional[int] = None,
        images: int = 1,
        cfg: bool = True,
    ) -> "ShapePlan":
        """A plan at the manifest's default resolution unless ``height``/``width`` are given."""
        res = manifest.resolution or {}
        plan = cls(
            mode=mode,
            height=int(height if height is not None else res.get("default_height", 1024)),
            width=int(width if width is not None else res.get("default_width", 1024)),
            images=images,
            cfg=cfg,
        )
        plan.validate(int(res.get("multiple", resolution_multiple(3))))
        return plan

    def symbols(self) -> Dict[str, int]:
        """Values of the contract's symbolic dimensions for this plan."""
        layout = BatchLayout(images=self.images, cfg=self.cfg)
        return {
            "images": self.images,
            "batch": layout.batch,
            "pairs": layout.pairs,
            "latent_height": self.height // VAE_SCALE_FACTOR,
            "latent_width": self.width // VAE_SCALE_FACTOR,
            "height": self.height,
            "width": self.width,
        }

    def flags(self) -> Dict[str, object]:
        """For the sidecar and the rebuild command."""
        d: Dict[str, object] = {"shapes": self.mode}
        if self.mode == "static":
            d.update(height=self.height, width=self.width, images=self.images, cfg=self.cfg)
        return d


def resolve_shape(t: TensorSpec, symbols: Mapping[str, int], fallback: str = "opt") -> Shape:
    """A tensor's concrete shape: fixed dims as declared, symbols from ``symbols``, else the manifest's ``fallback``."""
    base = getattr(t, fallback)
    return tuple(
        d if isinstance(d, int) else int(symbols.get(d, base[i]))
        for i, d in enumerate(t.shape)
    )


def _check_inside(component: str, t: TensorSpec, shape: Shape) -> None:
    for i, (lo, v, hi) in enumerate(zip(t.min, shape, t.max)):
        if not lo <= v <= hi:
            raise ProfileError(
                f"{component} input {t.name!r}: shape {list(shape)} is outside the range the bundle's export "
                f"declares ({list(t.min)} .. {list(t.max)}; axis {i} = {t.shape[i]!r}); build for shapes inside "
                "it (--height/--width/--images) or re-export the bundle with a wider range"
            )


def manifest_profile(spec: ComponentSpec) -> Profile:
    """The manifest's ranges for every input, as they are."""
    return {t.name: (tuple(t.min), tuple(t.opt), tuple(t.max)) for t in spec.inputs}


def static_profile(spec: ComponentSpec, plan: ShapePlan) -> Profile:
    """One fixed shape per input (min = opt = max), checked against the manifest's ranges."""
    symbols = plan.symbols()
    out: Profile = {}
    for t in spec.inputs:
        shape = resolve_shape(t, symbols)
        _check_inside(spec.name, t, shape)
        out[t.name] = (shape, shape, shape)
    return out


def component_profiles(spec: ComponentSpec, plan: ShapePlan) -> List[Profile]:
    """The optimisation profiles to build ``spec`` with (one per declared shape range)."""
    if plan.mode == "static" and spec.name in STATIC_COMPONENTS:
        return [static_profile(spec, plan)]
    return [manifest_profile(spec)]


def is_static(profiles: Sequence[Profile]) -> bool:
    return all(r[0] == r[2] for p in profiles for r in p.values())


def in_profile(profile: Profile, shapes: Mapping[str, Sequence[int]]) -> List[str]:
    """Why ``shapes`` do not fit ``profile`` (empty when they do)."""
    why: List[str] = []
    for name, (lo, _, hi) in profile.items():
        if name not in shapes:
            why.append(f"{name}: no shape given")
            continue
        s = tuple(int(v) for v in shapes[name])
        if len(s) != len(lo) or any(not a <= v <= b for a, v, b in zip(lo, s, hi)):
            why.append(f"{name}: {list(s)} not in {list(lo)} .. {list(hi)}")
    return why
