"""What an export needs to know about the model: widths, token counts, shape ranges.

:class:`ModelInfo` is read once from a pipeline's components; it fills in the
graph contract (:func:`infiniteid.contract.contracts`), the manifest's ``model``
section, and the concrete ``min``/``opt``/``max`` of every symbolic dimension.

Shape ranges, per symbol (``B`` = ``max_batch`` images, ``b`` = ``opt_batch``,
``I`` = ``max_identities``, ``T`` = ID tokens of one identity)::

    text encoders  images          1 .. 2b .. 2B   (prompts and negative prompts in one call)
    id_encoder     images          1 .. b  .. B*I  (every face of a batch in one call)
                   id_tokens       T .. T  .. T    (fixed by the model)
    unet           batch           2 .. 4b .. 4B   (two streams x CFG; 2 = one image without CFG)
                   pairs           1 .. 2b .. 2B
                   id_tokens       T .. T  .. T*I  (mixing identities concatenates tokens)
    unet, vae      latent_h/w      min/8 .. opt/8 .. max/8
    vae_decoder    images          1 .. b  .. B
                   height/width    min .. opt .. max
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import torch

from .. import contract as C
from ..bundle import TensorSpec
from ..generation import LATENT_CHANNELS, VAE_SCALE_FACTOR
from .options import ExportOptions

Range = Tuple[int, int, int]


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # "sdxl", "tiny" (the tiny test model) or "custom", by architecture
    text_hidden: int
    text_hidden_2: int
    pooled_dim: int
    cross_attention_dim: int
    clip_image_size: int
    face_embed_dim: int
    max_length: int
    latent_channels: int
    id_tokens: int  # tokens of one identity's c_id
    resolution_multiple: int
    default_size: int  # the U-Net's native side in pixels
    vae_scale_factor: int  # pixels per latent side
    vae_scaling_factor: float

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> "ModelInfo":
        c = pipeline.c
        vision = c.id_encoder.image_encoder.config
        mapper = c.id_encoder.mapper
        clip_tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
        vae_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
        if vae_factor != VAE_SCALE_FACTOR:
            raise ValueError(f"the VAE downsamples {vae_factor}x; this project supports SDXL's {VAE_SCALE_FACTOR}x")
        if c.unet.config.in_channels != LATENT_CHANNELS:
            raise ValueError(f"the U-Net takes {c.unet.config.in_channels} channels; SDXL has {LATENT_CHANNELS}")
        if c.clip_image.size != vision.image_size:
            raise ValueError(
                f"CLIP preprocessing size {c.clip_image.size} differs from the image encoder's {vision.image_size}"
            )
        kind = _kind(c.unet.config.cross_attention_dim, c.text_encoder_2.config.projection_dim)
        return cls(
            kind=kind,
            text_hidden=c.text_encoder.config.hidden_size,
            text_hidden_2=c.text_encoder_2.config.hidden_size,
            pooled_dim=c.text_encoder_2.config.projection_dim,
            cross_attention_dim=c.unet.config.cross_attention_dim,
            clip_image_size=vision.image_size,
            face_embed_dim=mapper.config.face_embed_dim,
            max_length=c.tokenizer.max_length,
            latent_channels=c.unet.config.in_channels,
            id_tokens=mapper.num_tokens(clip_tokens),
            resolution_multiple=pipeline.resolution_multiple,
            default_size=int(c.unet.config.sample_size) * vae_factor,
            vae_scale_factor=vae_factor,
            vae_scaling_factor=float(c.vae.config.scaling_factor),
        )

    def contracts(self) -> Dict[str, C.ComponentContract]:
        return C.contracts(
            text_hidden=self.text_hidden,
            text_hidden_2=self.text_hidden_2,
            pooled_dim=self.pooled_dim,
            cross_attention_dim=self.cross_attention_dim,
            clip_image_size=self.clip_image_size,
            face_embed_dim=self.face_embed_dim,
            max_length=self.max_length,
            latent_channels=self.latent_channels,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _kind(cross_attention_dim: int, pooled_dim: int) -> str:
    """"sdxl" for SDXL's widths, "tiny" for the tiny test model's, else "custom" (by
    architecture, not by where the weights came from)."""
    from ..model.tiny import TinySizes

    if (cross_attention_dim, pooled_dim) == (2048, 1280):
        return "sdxl"
    tiny = TinySizes()
    if (cross_attention_dim, pooled_dim) == (tiny.cross_attention_dim, tiny.pooled):
        return "tiny"
    return "custom"


def symbol_ranges(component: str, info: ModelInfo, opts: ExportOptions) -> Dict[str, Range]:
    """``min``/``opt``/``max`` of each symbolic dimension of ``component`` (see the module docstring).

    ``opts`` must be resolved (:meth:`ExportOptions.resolve`).
    """
    b, B, I, T = opts.opt_batch, opts.max_batch, opts.max_identities, info.id_tokens
    f = info.vae_scale_factor
    assert opts.height and opts.width and opts.min_resolution and opts.max_resolution, "resolve the options first"
    lo, hi = opts.min_resolution, opts.max_resolution
    spatial = {
        "latent_height": (lo // f, opts.height // f, hi // f),
        "latent_width": (lo // f, opts.width // f, hi // f),
        "height": (lo, opts.height, hi),
        "width": (lo, opts.width, hi),
    }
    if component in (C.TEXT_ENCODER, C.TEXT_ENCODER_2):
        return {"images": (1, 2 * b, 2 * B)}
    if component == C.ID_ENCODER:
        return {"images": (1, b, B * I), "id_tokens": (T, T, T)}
    if component == C.UNET:
        return {"batch": (2, 4 * b, 4 * B), "pairs": (1, 2 * b, 2 * B), "id_tokens": (T, T, T * I), **spatial}
    if component == C.VAE_DECODER:
        return {"images": (1, b, B), **spatial}
    raise KeyError(f"unknown component {component!r}")


def tensor_specs(component: str, info: ModelInfo, opts: ExportOptions) -> Tuple[List[TensorSpec], List[TensorSpec]]:
    """The manifest's input and output specs of ``component``: contract names and
    shapes, the precision's dtypes, and the shape ranges."""
    contract = info.contracts()[component]
    ranges = symbol_ranges(component, info, opts)
    half = opts.precision_of(component) == "fp16"

    def spec(t: C.TensorContract) -> TensorSpec:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in t.shape]
        dtype = "float16" if (half and t.dtype == "float32") else t.dtype
        return TensorSpec(
            name=t.name,
            dtype=dtype,
            shape=list(t.shape),
            min=[d[0] for d in dims],
            opt=[d[1] for d in dims],
            max=[d[2] for d in dims],
        )

    return [spec(t) for t in contract.inputs], [spec(t) for t in contract.outputs]


def trace_symbols(component: str, info: ModelInfo, opts: ExportOptions) -> Dict[str, int]:
    """Symbol values of the sample inputs the exporter traces with.

    Small (the minimum resolution, two images) so that tracing the real SDXL U-Net
    on a CPU stays quick, and every symbol differs from every fixed size and from
    the others where it can, so nothing can be mistaken for a constant.
    """
    f, m = info.vae_scale_factor, info.resolution_multiple
    lo, hi = opts.min_resolution, opts.max_resolution
    assert lo and hi
    h = lo
    w = lo + m if lo + m <= hi else lo
    return {
        "images": 2,
        "batch": 4,
        "pairs": 2,
        "id_tokens": info.id_tokens,
        "latent_height": h // f,
        "latent_width": w // f,
        "height": h,
        "width": w,
    }


def sample_inputs(
    component: str, info: ModelInfo, opts: ExportOptions, symbols: Dict[str, int], seed: int = 0
) -> Dict[str, torch.Tensor]:
    """Random inputs of the contract's shapes for ``symbols`` (plausible value ranges:
    token ids below the vocabulary, timesteps in [0, 1000), SDXL-like time ids)."""
    contract = info.contracts()[component]
    dtype = torch.float16 if opts.precision_of(component) == "fp16" else torch.float32
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for t in contract.inputs:
        shape = tuple(symbols[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "int64":
            x = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
        elif t.name == "timestep":
            x = torch.randint(0, 1000, shape, generator=g).float()
        elif t.name == "time_ids":
            x = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).expand(shape).contiguous()
        elif t.name == "id_scale":
            x = torch.rand(shape, generator=g) + 0.5
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x if t.dtype == "int64" else x.to(dtype)
    return out
