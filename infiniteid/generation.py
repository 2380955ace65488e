"""What a generation asks for, and the small numeric facts every backend shares.

Torch-free on purpose: the PyTorch reference and the numpy runtime both build their
inputs from here, so the same request gives the same initial noise, the same SDXL
time ids and the same resolution checks on every backend.

The unit of work is a *batch*: requests that share resolution, step count,
scheduler and the ablation switches (:class:`BatchSettings`), each keeping its own
prompt, negative prompt, identity, ID scale, guidance and seed
(:class:`GenerationRequest`). Requests with different numbers of mixed faces run
as one sub-batch per face count (:func:`identity_groups`), results in request order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .arrays import concat, stack
from .layout import BatchLayout, both_streams, merge_guidance, split_streams

# SDXL's VAE maps 8x8 pixels to one latent; its latent has 4 channels.
VAE_SCALE_FACTOR = 8
LATENT_CHANNELS = 4

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0
DEFAULT_ID_SCALE = 1.0
DEFAULT_SCHEDULER = "ddim"
SCHEDULERS = ("ddim", "euler", "dpmpp_2m")


class InvalidRequest(ValueError):
    """A request or batch setting a user got wrong; the message says what and how to fix it."""


def resolution_multiple(num_down_blocks: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
    """Pixels a height/width must divide by: the VAE factor times the U-Net's downsampling.

    A U-Net with ``n`` down blocks halves the latent ``n - 1`` times (the last block
    does not downsample), so the latent side must divide by ``2 ** (n - 1)``.
    SDXL has 3 down blocks: heights and widths must divide by 32.
    """
    return vae_scale_factor * 2 ** max(num_down_blocks - 1, 0)


def check_resolution(height: int, width: int, multiple: int, min_size: int = 0, max_size: int = 0) -> None:
    """Refuse a resolution the U-Net cannot take, saying which ones it can."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise InvalidRequest(f"{name} must be a positive integer, got {v!r}")
        if v % multiple:
            lo, hi = (v // multiple) * multiple, (v // multiple + 1) * multiple
            near = f"{lo} or {hi}" if lo else f"{hi}"
            raise InvalidRequest(
                f"{name}={v} is not a multiple of {multiple} (the VAE and U-Net downsampling need it); try {near}"
            )
        if min_size and v < min_size or max_size and v > max_size:
            raise InvalidRequest(f"{name}={v} is outside the supported range [{min_size}, {max_size}]")


def latent_shape(images: int, height: int, width: int) -> Tuple[int, int, int, int]:
    return (images, LATENT_CHANNELS, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)


def initial_noise(seed: int, height: int, width: int) -> np.ndarray:
    """The initial latent noise of one image, float32 ``(4, H/8, W/8)``.

    Drawn with numpy's PCG64 generator so that every backend (PyTorch, onnxruntime,
    TensorRT) starts from bit-identical noise for the same seed. Both streams of
    one image start from this same noise.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidRequest(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    return rng.standard_normal((LATENT_CHANNELS, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR), dtype=np.float32)


def sdxl_time_ids(height: int, width: int) -> np.ndarray:
    """SDXL's micro-conditioning: (original size, crop top-left, target size), float32 (6,)."""
    return np.array([height, width, 0, 0, height, width], dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], ``(N, 3, H, W)`` -> uint8 ``(N, H, W, 3)``, as diffusers rounds it."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def image_fields(arrays: List[np.ndarray], text_arrays: Optional[List[np.ndarray]]) -> Dict[str, Any]:
    """The image fields of every generator's output (the reference's and the runtime's alike):
    PIL ``images`` and uint8 ``(H, W, 3)`` ``arrays`` of the ID stream, and of the text stream when asked for."""
    from PIL import Image

    def pil(xs):
        return None if xs is None else [Image.fromarray(a) for a in xs]

    return {"images": pil(arrays), "arrays": arrays, "text_images": pil(text_arrays), "text_arrays": text_arrays}


@dataclass
class IdentityMix:
    """How one request's identity is made from its face images.

    ``mode="mix"`` concatenates the identities' tokens (the U-Net sees all of them);
    ``mode="interpolate"`` blends two identities as ``a * id1 + (1 - a) * id2``.
    """

    mode: str = "mix"
    alpha: float = 0.5

    def validate(self, faces: int) -> None:
        if self.mode not in ("mix", "interpolate"):
            raise InvalidRequest(f"identity mode must be 'mix' or 'interpolate', got {self.mode!r}")
        if self.mode == "interpolate":
            if faces != 2:
                raise InvalidRequest(f"interpolation needs exactly 2 faces, got {faces}")
            if not 0.0 <= float(self.alpha) <= 1.0:
                raise InvalidRequest(f"interpolation weight must be in [0, 1], got {self.alpha}")


def mix_identities(c_ids: Sequence[Any]) -> Any:
    """Several identities at once: concatenate their ``(..., T, C)`` tokens."""
    if not len(c_ids):
        raise InvalidRequest("need at least one identity")
    return concat(list(c_ids), axis=-2)


def interpolate_identities(c_id1: Any, c_id2: Any, alpha: float) -> Any:
    """``alpha * c_id1 + (1 - alpha) * c_id2``: alpha 1 gives the first identity."""
    if tuple(c_id1.shape) != tuple(c_id2.shape):
        raise InvalidRequest(
            f"interpolated identities must share a shape, got {tuple(c_id1.shape)} and {tuple(c_id2.shape)}"
        )
    return alpha * c_id1 + (1 - alpha) * c_id2


def combine_identities(c_ids: Sequence[Any], uncond: Any, mix: IdentityMix) -> Tuple[Any, Any]:
    """One request's identity tokens and their unconditional counterpart.

    Mixing concatenates tokens, so the unconditional tokens are repeated to match
    (CFG rows of one batch must have equal token counts).
    """
    mix.validate(len(c_ids))
    if mix.mode == "interpolate":
        return interpolate_identities(c_ids[0], c_ids[1], mix.alpha), uncond
    return mix_identities(c_ids), mix_identities([uncond] * len(c_ids))


@dataclass
class GenerationRequest:
    """One image to make. ``faces`` are image paths, PIL images or arrays (one or more)."""

    prompt: str
    faces: Sequence[Any] = ()
    negative_prompt: str = ""
    id_scale: float = DEFAULT_ID_SCALE
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    identity: IdentityMix = field(default_factory=IdentityMix)

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise InvalidRequest(f"negative prompt must be a string, got {type(self.negative_prompt).__name__}")
        if not len(self.faces):
            raise InvalidRequest("a request needs at least one face image")
        if not np.isfinite(self.id_scale) or self.id_scale < 0:
            raise InvalidRequest(f"ID scale must be a finite number >= 0, got {self.id_scale}")
        if not np.isfinite(self.guidance) or self.guidance < 1.0:
            raise InvalidRequest(f"guidance must be a finite number >= 1 (1 turns guidance off), got {self.guidance}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InvalidRequest(f"seed must be a non-negative integer, got {self.seed!r}")
        self.identity.validate(len(self.faces))


@dataclass
class BatchSettings:
    """What all requests of one batch share (one U-Net call serves them all)."""

    height: int = 1024
    width: int = 1024
    steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER
    mixed_attention: bool = True
    adain: bool = True
    cfg: bool = True
    return_text_stream: bool = False

    def validate(self, multiple: int) -> None:
        check_resolution(self.height, self.width, multiple)
        if not isinstance(self.steps, (int, np.integer)) or not 1 <= self.steps <= 1000:
            raise InvalidRequest(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise InvalidRequest(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def guidance_array(requests: Sequence[GenerationRequest]) -> np.ndarray:
    """Per-image guidance scales, shaped to broadcast over one image's latents."""
    return np.array([r.guidance for r in requests], dtype=np.float32).reshape(-1, 1, 1, 1)


def id_scale_array(requests: Sequence[GenerationRequest], cfg: bool) -> np.ndarray:
    """Per-sample ID scales for the ID half of the batch (``[uncond..; cond..]`` with CFG)."""
    s = np.array([r.id_scale for r in requests], dtype=np.float32)
    return np.concatenate([s, s]) if cfg else s


def identity_count(request: "GenerationRequest") -> int:
    """How many identities' worth of ID tokens a request carries: its faces when mixed, 1 when interpolated."""
    return 1 if request.identity.mode == "interpolate" else len(request.faces)


def identity_groups(requests: Sequence["GenerationRequest"]) -> List[List[int]]:
    """Request indices grouped by :func:`identity_count`, groups in order of first appearance.

    One U-Net call needs one ID-token count for all its rows; a batch whose requests
    differ runs as one sub-batch per group, and results go back in request order
    (:func:`in_request_order`). Splitting keeps the graphs and engines unchanged
    (no padded tokens, no attention mask) and each result identical to a batch of
    its group alone.
    """
    groups: Dict[int, List[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(identity_count(r), []).append(i)
    return list(groups.values())


def in_request_order(groups: Sequence[Sequence[int]], parts: Sequence[Sequence[Any]]) -> List[Any]:
    """Per-group result lists back into request order (the inverse of :func:`identity_groups`)."""
    out: List[Any] = [None] * sum(len(g) for g in groups)
    for g, items in zip(groups, parts):
        for i, item in zip(g, items):
            out[i] = item
    return out


def merge_outputs(groups: Sequence[Sequence[int]], parts: Sequence[Any]) -> Any:
    """Sub-batch outputs (one per :func:`identity_groups` group) as one output of the same class, in
    request order: ``images``/``arrays``/``text_images``/``text_arrays`` lists, ``latents``
    ``[text; id]`` (numpy or torch), ``timings`` summed when present."""
    def ordered(name: str) -> Any:
        lists = [getattr(p, name) for p in parts]
        return None if any(x is None for x in lists) else in_request_order(groups, lists)

    halves = [split_streams(p.latents) for p in parts]
    text = in_request_order(groups, [list(t) for t, _ in halves])
    ident = in_request_order(groups, [list(i) for _, i in halves])
    fields = dict(images=ordered("images"), arrays=ordered("arrays"), text_images=ordered("text_images"),
                  text_arrays=ordered("text_arrays"), latents=concat([stack(text), stack(ident)]))
    if hasattr(parts[0], "timings"):
        timings: Dict[str, float] = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        fields["timings"] = timings
    return type(parts[0])(**fields)


def describe(request: GenerationRequest) -> dict:
    """A JSON-friendly record of a request (faces by their string form)."""
    d = asdict(request)
    d["faces"] = [f if isinstance(f, str) else type(f).__name__ for f in request.faces]
    return d



def unet_conditioning(
    requests: Sequence["GenerationRequest"],
    settings: "BatchSettings",
    prompt: Tuple[Any, Any],
    negative: Any,
    identities: Sequence[Tuple[Any, Any]],
) -> dict:
    """The U-Net inputs that stay fixed over the steps, in the batch layout.

    Shared by the PyTorch reference (tensors) and the runtime (numpy arrays), so the
    two cannot assemble a batch differently. ``prompt`` = (embeds, pooled) of the
    prompts; ``negative`` = the same for the negative prompts, or None without CFG;
    ``identities`` = one (c_id, uncond c_id) per request. ``time_ids`` and
    ``id_scale`` come back as float32 numpy arrays; the rest in the inputs' type.
    """
    layout = BatchLayout(images=len(requests), cfg=settings.cfg)
    embeds, pooled = prompt
    if settings.cfg:
        embeds, pooled = merge_guidance(negative[0], embeds), merge_guidance(negative[1], pooled)
    counts = {c.shape[0] for c, _ in identities}
    if len(counts) > 1:
        raise InvalidRequest(
            f"requests in one batch must have the same number of identity tokens, got {sorted(counts)}"
            " (mixing a different number of faces); batch them separately"
        )
    c_id = stack([c for c, _ in identities])
    id_embeds = merge_guidance(stack([u for _, u in identities]), c_id) if settings.cfg else c_id
    time_ids = np.broadcast_to(sdxl_time_ids(settings.height, settings.width), (layout.batch, 6))
    return {
        "encoder_hidden_states": both_streams(embeds),
        "text_embeds": both_streams(pooled),
        "time_ids": np.ascontiguousarray(time_ids, dtype=np.float32),
        "id_embeds": id_embeds,
        "id_scale": id_scale_array(requests, settings.cfg),
    }
