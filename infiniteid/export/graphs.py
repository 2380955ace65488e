"""One thin ``nn.Module`` per exported component: the contract's tensors in, the contract's out.

Each wrapper computes exactly what :class:`~infiniteid.model.pipeline.InfiniteIDPipeline`
computes for that step, with positional tensor arguments named as in
:mod:`infiniteid.contract`, so ``torch.onnx.export`` sees a plain function of tensors.

Why the U-Net's ablation switches are *compile-time* graph structure and not graph
inputs: the pipeline passes ``mixed_attention`` and ``adain`` as Python booleans
inside :class:`~infiniteid.model.processors.IDConditioning`. Traced with fixed
values, each ``attn1`` becomes the one attention the switches select; the other
branch never enters the graph. Exposing them as boolean inputs would need ``If``
nodes (or select-by-multiplication) in every transformer block: both branches stay
in the graph, constant folding cannot remove them, and TensorRT either cannot fuse
attention across an ``If`` or computes the dead branch. An ablation study exports a
second bundle instead; the switches are recorded in the U-Net's manifest
``options`` and the runtime refuses a batch that asks for the other setting.

We never call ``set_default_attn_processor`` (a common export recipe): it would
replace Infinite-ID's processors and silently export plain SDXL.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from .. import contract as C
from ..model.processors import INFERENCE, KWARG, IDConditioning, IDCrossAttnProcessor, MixedSelfAttnProcessor


class ExportGraphError(RuntimeError):
    """A component that cannot be exported as it is (e.g. a U-Net without our processors)."""


class TextEncoderGraph(nn.Module):
    """``input_ids (N, 77) -> hidden_states (N, 77, C1)``: the penultimate hidden states."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class TextEncoder2Graph(nn.Module):
    """``input_ids -> (hidden_states (N, 77, C2), text_embeds (N, P))``: penultimate
    hidden states and the projected pooled output (SDXL's ``text_embeds``)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class IDEncoderGraph(nn.Module):
    """``(face_embeds (N, 512), clip_pixels (N, 3, S, S)) -> id_embeds (N, T_id, C)``:
    the CLIP image encoder and both mappers (the face detector and ArcFace are the
    user's own ONNX files and stay outside)."""

    def __init__(self, id_encoder: nn.Module):
        super().__init__()
        self.id_encoder = id_encoder

    def forward(self, face_embeds: torch.Tensor, clip_pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.id_encoder(face_embeds, clip_pixels)
        # Every kind's graph takes both inputs, so the runtime and the engines feed all
        # kinds alike. A kind that ignores one (plus-face the face embedding, FaceID the
        # CLIP pixels) still consumes one element of it times zero: the exporter drops
        # an unused input from the graph, and TensorRT would drop its binding.
        cfg = self.id_encoder.mapper.config
        if not cfg.uses_face:
            tokens = tokens + 0.0 * face_embeds[:, :1, None]
        if not cfg.uses_clip:
            tokens = tokens + 0.0 * clip_pixels[:, 0, 0, :1, None]
        return tokens


class UNetGraph(nn.Module):
    """Both streams and Infinite-ID's processors in one call (batch layout: :mod:`infiniteid.layout`).

    ``mixed_attention`` and ``adain`` are fixed at construction (see the module docstring).
    """

    def __init__(self, unet: nn.Module, mixed_attention: bool = True, adain: bool = True):
        super().__init__()
        procs = list(unet.attn_processors.values())
        if not any(isinstance(p, MixedSelfAttnProcessor) for p in procs) or not any(
            isinstance(p, IDCrossAttnProcessor) for p in procs
        ):
            raise ExportGraphError(
                "the U-Net does not carry Infinite-ID's processors (install_processors + load_adapter); "
                "exporting it would give plain SDXL"
            )
        self.unet = unet
        self.mixed_attention = bool(mixed_attention)
        self.adain = bool(adain)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        id_embeds: torch.Tensor,
        id_scale: torch.Tensor,
    ) -> torch.Tensor:
        cond = IDConditioning(
            id_embeds=id_embeds,
            id_scale=id_scale,
            mixed_attention=self.mixed_attention,
            adain=self.adain,
            mode=INFERENCE,
        )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            cross_attention_kwargs={KWARG: cond},
            return_dict=False,
        )[0]


class VAEDecoderGraph(nn.Module):
    """``latent (N, 4, h, w) -> images (N, 3, 8h, 8w)`` in [-1, 1] (unclipped, as ``vae.decode``).

    The input is the raw final latent: the graph divides by the VAE's scaling
    factor itself, so no backend can forget it.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


def component_modules(pipeline) -> Dict[str, nn.Module]:
    """The pipeline's module behind each component (what gets cast for fp16)."""
    c = pipeline.c
    return {
        C.TEXT_ENCODER: c.text_encoder,
        C.TEXT_ENCODER_2: c.text_encoder_2,
        C.ID_ENCODER: c.id_encoder,
        C.UNET: c.unet,
        C.VAE_DECODER: c.vae,
    }


def wrap(name: str, module: nn.Module, *, mixed_attention: bool = True, adain: bool = True) -> nn.Module:
    """The export wrapper of component ``name`` around ``module``."""
    if name == C.TEXT_ENCODER:
        return TextEncoderGraph(module)
    if name == C.TEXT_ENCODER_2:
        return TextEncoder2Graph(module)
    if name == C.ID_ENCODER:
        return IDEncoderGraph(module)
    if name == C.UNET:
        return UNetGraph(module, mixed_attention=mixed_attention, adain=adain)
    if name == C.VAE_DECODER:
        return VAEDecoderGraph(module)
    raise KeyError(f"unknown component {name!r}; components are {', '.join(C.COMPONENTS)}")
