"""The ID encoder: face embedding + CLIP image states -> identity tokens ``c_id``.

Infinite-ID's own mapper (:class:`InfiniteIDMapper`) concatenates

* CLIP tokens: a per-token ``Linear(clip_dim -> C) + LayerNorm`` over the CLIP image
  encoder's penultimate hidden states (or a Perceiver resampler to a fixed count),
* face tokens: ``MLP(512 -> 1024 -> C * n)`` on the L2-normalised ArcFace embedding,
  reshaped to ``n`` tokens, then ``LayerNorm``.

A mapper kind is one small class behind one interface, ``forward(face_embeds,
clip_states) -> tokens``, registered in :data:`MAPPERS`; the two-stream inference
runs on every kind unchanged. Kinds:

* ``infiniteid``: ours (above), ``T_id = 257 + 4`` for CLIP ViT-H at 224 px;
* ``ip-adapter-plus-face``: IP-Adapter plus-face, a Perceiver resampler with
  learned latents over the CLIP states, 16 tokens (the face embedding is unused);
* ``ip-adapter-faceid-plus`` / ``ip-adapter-faceid-plusv2``: IP-Adapter
  FaceID-Plus, ``MLP(512 -> 1024 -> C * 4)`` + LayerNorm on the ArcFace embedding
  gives 4 tokens that a Perceiver (no learned latents) refines over the CLIP
  states; v2 adds the MLP tokens back, ``x + shortcut_scale * perceiver(x)``;
* ``ip-adapter-faceid``: IP-Adapter FaceID, the MLP + LayerNorm alone, 4 tokens
  (the CLIP states are unused).

The public kinds compute what diffusers' ``IPAdapterPlusImageProjection``,
``IPAdapterFaceIDPlusImageProjection`` and ``IPAdapterFaceIDImageProjection`` do
(tests hold them to diffusers' pipeline); their module names follow the published
files' ``image_proj`` keys (see :mod:`infiniteid.model.public_adapter`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Type

import torch
import torch.nn as nn

from .kinds import FACEID, FACEID_PLUS, FACEID_PLUSV2, INFINITEID, PLUS_FACE

FACE_EMBED_DIM = 512  # ArcFace


@dataclass
class ResamplerConfig:
    """A Perceiver resampler (IP-Adapter style) mapping CLIP states to ``num_queries`` tokens."""

    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    num_queries: int = 16
    ff_mult: int = 4

    def validate(self) -> None:
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"resampler {k} must be a positive int, got {v!r}")


@dataclass
class IDEncoderConfig:
    """Shapes of the identity mapper. Defaults are SDXL's (C = 2048, CLIP ViT-H 1280)."""

    kind: str = INFINITEID
    cross_attention_dim: int = 2048
    clip_dim: int = 1280
    face_embed_dim: int = FACE_EMBED_DIM
    face_hidden_dim: int = 1024
    face_tokens: int = 4
    clip_mapper: str = "linear"  # or "resampler" (kind infiniteid)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    shortcut_scale: float = 1.0  # kind ip-adapter-faceid-plusv2: tokens = x + shortcut_scale * perceiver(x)

    def validate(self) -> None:
        if self.kind not in MAPPERS:
            raise ValueError(f"unknown ID mapper kind {self.kind!r}; known: {', '.join(sorted(MAPPERS))}")
        if self.clip_mapper not in ("linear", "resampler"):
            raise ValueError(f"clip_mapper must be 'linear' or 'resampler', got {self.clip_mapper!r}")
        for k in ("cross_attention_dim", "clip_dim", "face_embed_dim", "face_hidden_dim", "face_tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if not isinstance(self.shortcut_scale, (int, float)) or not math.isfinite(self.shortcut_scale):
            raise ValueError(f"shortcut_scale must be a finite number, got {self.shortcut_scale!r}")
        self.resampler.validate()

    @property
    def uses_face(self) -> bool:
        """Whether the kind reads the ArcFace embedding (plus-face does not)."""
        return self.kind != PLUS_FACE

    @property
    def uses_clip(self) -> bool:
        """Whether the kind reads the CLIP image states (FaceID does not)."""
        return self.kind != FACEID

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IDEncoderConfig":
        d = dict(d)
        res = ResamplerConfig(**d.pop("resampler", {}))
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ID encoder config keys: {', '.join(sorted(unknown))}")
        cfg = cls(resampler=res, **d)
        cfg.validate()
        return cfg


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latent queries attend to the inputs and to themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_x(x), self.norm_latents(latents)
        b, n, _ = latents.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = nn.functional.scaled_dot_product_attention(q, split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Perceiver(nn.Module):
    """The Perceiver stack without learned latents: ``(x (B, T, in_dim), latents (B, n, dim)) -> (B, n, out_dim)``.

    FaceID-Plus feeds it the face tokens as latents; :class:`Resampler` adds learned ones.
    """

    def __init__(self, cfg: ResamplerConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), FeedForward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.proj_out = nn.Linear(cfg.dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def resample(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(Perceiver):
    """Perceiver resampler: ``(B, T, in_dim) -> (B, num_queries, out_dim)`` from learned latents."""

    def __init__(self, cfg: ResamplerConfig, in_dim: int, out_dim: int):
        latents = torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim**0.5  # drawn first, as before the split
        super().__init__(cfg, in_dim, out_dim)
        self.latents = nn.Parameter(latents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x, self.latents.expand(x.shape[0], -1, -1))


class IDMapper(nn.Module):
    """Interface of every mapper kind: ``(face_embeds (B, 512), clip_states (B, Tc, Dc)) -> (B, T_id, C)``.

    ``clip_states`` is None for a kind whose config says ``uses_clip`` is False.
    """

    config: IDEncoderConfig

    def num_tokens(self, clip_tokens: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def _face_mlp(cfg: IDEncoderConfig) -> nn.Sequential:
    """``Linear(512 -> hidden) -> GELU -> Linear(hidden -> C * n)`` (published keys ``proj.0`` / ``proj.2``)."""
    return nn.Sequential(
        nn.Linear(cfg.face_embed_dim, cfg.face_hidden_dim),
        nn.GELU(),
        nn.Linear(cfg.face_hidden_dim, cfg.cross_attention_dim * cfg.face_tokens),
    )


class InfiniteIDMapper(IDMapper):
    """Infinite-ID's mapper: ``concat(clip_tokens, face_tokens)``, ``T_id = Tc + n`` (linear CLIP mapper)."""

    def __init__(self, cfg: IDEncoderConfig):
        super().__init__()
        self.config = cfg
        c = cfg.cross_attention_dim
        self.face_mapper = _face_mlp(cfg)
        self.face_norm = nn.LayerNorm(c)
        if cfg.clip_mapper == "linear":
            self.clip_mapper: nn.Module = nn.Sequential(nn.Linear(cfg.clip_dim, c), nn.LayerNorm(c))
        else:
            self.clip_mapper = Resampler(cfg.resampler, cfg.clip_dim, c)

    def num_tokens(self, clip_tokens: int) -> int:
        clip = clip_tokens if self.config.clip_mapper == "linear" else self.config.resampler.num_queries
        return clip + self.config.face_tokens

    def forward(self, face_embeds: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        b = face_embeds.shape[0]
        face = self.face_norm(self.face_mapper(face_embeds).view(b, self.config.face_tokens, -1))
        return torch.cat([self.clip_mapper(clip_states), face], dim=1)


class PlusFaceMapper(IDMapper):
    """IP-Adapter plus-face: ``resampler(clip_states)``, ``num_queries`` tokens; the face embedding is unused."""

    def __init__(self, cfg: IDEncoderConfig):
        super().__init__()
        self.config = cfg
        self.resampler = Resampler(cfg.resampler, cfg.clip_dim, cfg.cross_attention_dim)

    def num_tokens(self, clip_tokens: int) -> int:
        return self.config.resampler.num_queries

    def forward(self, face_embeds: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        return self.resampler(clip_states)


class FaceIDMapper(IDMapper):
    """IP-Adapter FaceID: ``LayerNorm(MLP(face))`` as ``face_tokens`` tokens; the CLIP states are unused."""

    def __init__(self, cfg: IDEncoderConfig):
        super().__init__()
        self.config = cfg
        self.proj = _face_mlp(cfg)
        self.norm = nn.LayerNorm(cfg.cross_attention_dim)

    def num_tokens(self, clip_tokens: int) -> int:
        return self.config.face_tokens

    def face_tokens(self, face_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face_embeds).view(face_embeds.shape[0], self.config.face_tokens, -1))

    def forward(self, face_embeds: torch.Tensor, clip_states: Optional[torch.Tensor]) -> torch.Tensor:
        return self.face_tokens(face_embeds)


class FaceIDPlusMapper(FaceIDMapper):
    """IP-Adapter FaceID-Plus(V2): the FaceID tokens refined by a Perceiver over the CLIP states.

    ``out = perceiver(x, clip_states)``; V2 (kind ``ip-adapter-faceid-plusv2``) adds
    the shortcut ``x + shortcut_scale * out``.
    """

    def __init__(self, cfg: IDEncoderConfig):
        super().__init__(cfg)
        self.perceiver_resampler = Perceiver(cfg.resampler, cfg.clip_dim, cfg.cross_attention_dim)

    def forward(self, face_embeds: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        x = self.face_tokens(face_embeds)
        out = self.perceiver_resampler.resample(clip_states, x)
        if self.config.kind == FACEID_PLUSV2:
            out = x + self.config.shortcut_scale * out
        return out


MAPPERS: Dict[str, Type[IDMapper]] = {
    INFINITEID: InfiniteIDMapper,
    PLUS_FACE: PlusFaceMapper,
    FACEID_PLUS: FaceIDPlusMapper,
    FACEID_PLUSV2: FaceIDPlusMapper,
    FACEID: FaceIDMapper,
}


def build_mapper(cfg: IDEncoderConfig) -> IDMapper:
    cfg.validate()
    return MAPPERS[cfg.kind](cfg)


class IDEncoder(nn.Module):
    """CLIP image encoder + mapper: ``(face_embeds, clip_pixels) -> c_id``.

    ``image_encoder`` is a transformers CLIP vision model; its penultimate hidden
    states feed the mapper (as IP-Adapter plus does). This whole module is what the
    ``id_encoder`` ONNX graph holds.
    """

    def __init__(self, image_encoder: nn.Module, mapper: IDMapper):
        super().__init__()
        self.image_encoder = image_encoder
        self.mapper = mapper

    def clip_states(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        out = self.image_encoder(pixel_values=clip_pixels, output_hidden_states=True)
        return out.hidden_states[-2]

    def forward(self, face_embeds: torch.Tensor, clip_pixels: torch.Tensor) -> torch.Tensor:
        # FaceID reads no CLIP states: the image encoder is not run for it.
        states = self.clip_states(clip_pixels) if self.mapper.config.uses_clip else None
        return self.mapper(face_embeds, states)

    def unconditional(self, batch: int = 1) -> torch.Tensor:
        """The unconditional ``c_id``: the mapper on a zero face embedding and on the
        CLIP states of an all-zero (after normalisation) image, as IP-Adapter does."""
        p = next(self.parameters())
        size = self.image_encoder.config.image_size
        face = torch.zeros(batch, self.mapper.config.face_embed_dim, dtype=p.dtype, device=p.device)
        pixels = torch.zeros(batch, 3, size, size, dtype=p.dtype, device=p.device)
        return self(face, pixels)

