"""The batch layout of one U-Net call: the single place that defines it.

Infinite-ID denoises two streams side by side from the same initial noise:

* the *text stream* (plain SDXL with the prompt), and
* the *ID stream* (the one that makes the image).

One U-Net call carries both. The batch is

    [text_uncond.., text_cond.., id_uncond.., id_cond..]

i.e. the first half is the text stream and the second half the ID stream, in the
same order inside each half, so ID sample ``k`` pairs with text sample ``k``.
With classifier-free guidance each half holds ``2 * images`` samples
(unconditional first), without it ``images`` samples.

This module is deliberately free of torch: the PyTorch reference, the ONNX export,
the Triton kernel and the numpy runtime all use it, and the runtime must not
import torch. Its helpers take numpy arrays or torch tensors alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, TypeVar

from .arrays import concat

T = TypeVar("T")

TEXT_STREAM = "text"
ID_STREAM = "id"


@dataclass(frozen=True)
class BatchLayout:
    """How ``images`` images (with or without CFG) map onto U-Net batch rows.

    ``pairs`` is the number of (text sample, ID sample) pairs; ``batch`` the U-Net
    batch size. The same layout holds for every tensor whose first axis is the
    U-Net batch (latents, prompt embeddings, pooled embeddings, time ids).
    """

    images: int
    cfg: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < 1:
            raise ValueError(f"images must be a positive int, got {self.images!r}")

    @property
    def guidance_copies(self) -> int:
        """Samples per image in one stream: 2 (uncond, cond) with CFG, else 1."""
        return 2 if self.cfg else 1

    @property
    def pairs(self) -> int:
        """Samples per stream = number of text/ID pairs."""
        return self.images * self.guidance_copies

    @property
    def batch(self) -> int:
        """U-Net batch size: both streams."""
        return 2 * self.pairs

    @classmethod
    def from_batch(cls, batch: int, cfg: bool = True) -> "BatchLayout":
        """Recover the layout from a U-Net batch size (raises if it cannot hold one)."""
        per = 4 if cfg else 2
        if batch < per or batch % per:
            raise ValueError(
                f"a two-stream U-Net batch with cfg={cfg} must be a positive multiple of {per}, got {batch}"
            )
        return cls(images=batch // per, cfg=cfg)

    @classmethod
    def from_pairs(cls, pairs: int, cfg: bool = True) -> "BatchLayout":
        """Recover the layout from the number of text/ID pairs (the ID-stream batch)."""
        return cls.from_batch(2 * pairs, cfg)

    # -- row indices ---------------------------------------------------------
    def row(self, stream: str, image: int, cond: bool = True) -> int:
        """U-Net batch row of one sample."""
        if stream not in (TEXT_STREAM, ID_STREAM):
            raise ValueError(f"stream must be {TEXT_STREAM!r} or {ID_STREAM!r}, got {stream!r}")
        if not 0 <= image < self.images:
            raise IndexError(f"image {image} out of range for {self.images} images")
        if not self.cfg and not cond:
            raise ValueError("there is no unconditional sample without CFG")
        within = (self.images if (self.cfg and cond) else 0) + image
        return within + (self.pairs if stream == ID_STREAM else 0)

    def partner(self, row: int) -> int:
        """Row of the sample paired with ``row`` in the other stream."""
        if not 0 <= row < self.batch:
            raise IndexError(f"row {row} out of range for batch {self.batch}")
        return row + self.pairs if row < self.pairs else row - self.pairs


def split_streams(x: T) -> Tuple[T, T]:
    """Split a U-Net batch into (text half, ID half) along axis 0."""
    n = x.shape[0]  # type: ignore[attr-defined]
    if n % 2:
        raise ValueError(f"a two-stream batch has an even size, got {n}")
    h = n // 2
    return x[:h], x[h:]  # type: ignore[index]


def merge_streams(text: T, ident: T) -> T:
    """Inverse of :func:`split_streams`: ``[text; id]`` along axis 0."""
    if text.shape[0] != ident.shape[0]:  # type: ignore[attr-defined]
        raise ValueError(
            f"stream halves differ in size: text {text.shape[0]} vs id {ident.shape[0]}"  # type: ignore[attr-defined]
        )
    return concat([text, ident])


def split_guidance(x: T) -> Tuple[T, T]:
    """Split one stream's samples into (uncond, cond) along axis 0."""
    n = x.shape[0]  # type: ignore[attr-defined]
    if n % 2:
        raise ValueError(f"a CFG batch has an even size, got {n}")
    h = n // 2
    return x[:h], x[h:]  # type: ignore[index]


def both_streams(per_pair: T) -> T:
    """Repeat per-pair conditioning (prompt embeds, time ids) for both streams.

    Both streams see the same prompt, so the U-Net inputs hold it twice.
    """
    return concat([per_pair, per_pair])


def merge_guidance(uncond: T, cond: T) -> T:
    """Inverse of :func:`split_guidance`: ``[uncond; cond]`` along axis 0."""
    return concat([uncond, cond])


def unet_batch(latents: T, layout: BatchLayout) -> T:
    """U-Net input rows from the stacked latents ``[text images; id images]``.

    The latents carry one row per image and stream (``2 * images`` rows); with CFG
    each stream's rows are repeated for its unconditional and conditional samples.
    """
    if latents.shape[0] != 2 * layout.images:  # type: ignore[attr-defined]
        raise ValueError(
            f"expected {2 * layout.images} latent rows ([text; id] x {layout.images} images), got {latents.shape[0]}"  # type: ignore[attr-defined]
        )
    text, ident = split_streams(latents)
    if layout.cfg:
        text, ident = merge_guidance(text, text), merge_guidance(ident, ident)
    return merge_streams(text, ident)


def guide(noise_pred: T, layout: BatchLayout, guidance: T) -> T:
    """Classifier-free guidance per stream: U-Net output rows -> one row per image and stream.

    ``guidance`` broadcasts against one image's prediction, e.g. shape
    ``(images, 1, 1, 1)``, so every request keeps its own scale. The result is
    ``[text images; id images]``, the same rows as the latents.
    """
    text, ident = split_streams(noise_pred)
    if layout.cfg:
        out = []
        for half in (text, ident):
            uncond, cond = split_guidance(half)
            out.append(uncond + guidance * (cond - uncond))
        text, ident = out
    return merge_streams(text, ident)
