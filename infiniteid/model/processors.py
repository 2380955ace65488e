"""Infinite-ID's attention processors for diffusers' SDXL U-Net.

* ``attn1`` (self-attention) becomes :class:`MixedSelfAttnProcessor`: the ID stream
  attends to its own keys (AdaIN-mean shifted towards the text stream's) and to the
  text stream's keys; the text stream's attention is unchanged.
* ``attn2`` (cross-attention) becomes :class:`IDCrossAttnProcessor`, which owns the
  trainable ``to_k_ip``/``to_v_ip`` projections of the identity tokens ``c_id``.

Both are ``nn.Module``s so their weights are part of the U-Net's state dict. Their
per-call inputs (identity tokens, ID scale, switches) arrive in one explicit keyword,
``infinite_id`` (an :class:`IDConditioning`), passed as
``unet(..., cross_attention_kwargs={"infinite_id": cond})``: diffusers forwards a
keyword only to processors whose ``__call__`` names it, and warns about any other.

Which rows of the batch are which stream is :mod:`infiniteid.layout`'s business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..kernels.dispatch import mixed_attention
from ..layout import merge_streams, split_streams

INFERENCE = "inference"
TRAINING = "training"

# The keyword the processors take; the pipeline and the export use this name.
KWARG = "infinite_id"


@dataclass
class IDConditioning:
    """Everything the processors need beyond diffusers' own arguments.

    ``id_embeds``: identity tokens, ``(P, T_id, C)``. In inference mode P is the
    ID-stream half of the batch (``[id_uncond..; id_cond..]``); in training mode
    the whole batch (there is no text stream).
    ``id_scale``: ``(P,)`` per-sample weight ``s`` of the ID cross-attention.
    ``mixed_attention`` / ``adain``: the ablation switches of ``attn1``.
    """

    id_embeds: torch.Tensor
    id_scale: Optional[torch.Tensor] = None
    mixed_attention: bool = True
    adain: bool = True
    mode: str = INFERENCE

    def __post_init__(self) -> None:
        if self.mode not in (INFERENCE, TRAINING):
            raise ValueError(f"mode must be {INFERENCE!r} or {TRAINING!r}, got {self.mode!r}")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H*D) -> (B, H, N, D)``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _unheads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D) -> (B, N, H*D)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _Frame:
    """diffusers' processor scaffolding around the attention proper.

    Mirrors ``AttnProcessor2_0``: spatial norm, 4-D to tokens, group norm on the way
    in; output projection, back to 4-D, residual and rescale on the way out. None of
    these are active in SDXL's transformer blocks, but honouring them keeps the
    processors correct on any ``Attention`` they are installed on.
    """

    def __init__(self, attn: Attention, hidden_states: torch.Tensor, temb: Optional[torch.Tensor]):
        self.attn = attn
        self.residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        self.shape4d = hidden_states.shape if hidden_states.ndim == 4 else None
        if self.shape4d is not None:
            b, c, h, w = self.shape4d
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.hidden_states = hidden_states

    def query(self) -> torch.Tensor:
        q = _heads(self.attn.to_q(self.hidden_states), self.attn.heads)
        return self.attn.norm_q(q) if self.attn.norm_q is not None else q

    def keys_values(self, context: torch.Tensor, to_k: nn.Module, to_v: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        k = _heads(to_k(context), self.attn.heads)
        v = _heads(to_v(context), self.attn.heads)
        return (self.attn.norm_k(k) if self.attn.norm_k is not None else k), v

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        out = attn.to_out[1](attn.to_out[0](_unheads(out).to(self.hidden_states.dtype)))
        if self.shape4d is not None:
            out = out.transpose(-1, -2).reshape(self.shape4d)
        if attn.residual_connection:
            out = out + self.residual
        return out / attn.rescale_output_factor


def _no_mask(attention_mask: Optional[torch.Tensor], where: str) -> None:
    if attention_mask is not None:
        raise NotImplementedError(f"{where} does not support attention masks (SDXL uses none)")


class MixedSelfAttnProcessor(nn.Module):
    """``attn1``: mixed attention with AdaIN-mean on the ID stream (DESIGN section 2).

    Without an :class:`IDConditioning` (or in training mode, where the batch holds
    only the ID stream) it is plain self-attention.
    """

    def __init__(self, kernel_backend: str = "auto"):
        super().__init__()
        self.kernel_backend = kernel_backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        infinite_id: Optional[IDConditioning] = None,
    ) -> torch.Tensor:
        _no_mask(attention_mask, "MixedSelfAttnProcessor")
        frame = _Frame(attn, hidden_states, temb)
        q = frame.query()
        k, v = frame.keys_values(frame.hidden_states, attn.to_k, attn.to_v)
        two_streams = infinite_id is not None and infinite_id.mode == INFERENCE
        if two_streams:
            out = mixed_attention(
                q, k, v, mixed=infinite_id.mixed_attention, adain=infinite_id.adain, backend=self.kernel_backend
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return frame.finish(out)


class IDCrossAttnProcessor(nn.Module):
    """``attn2``: text cross-attention plus ``s`` times cross-attention to ``c_id``.

    Inference: text rows attend to the prompt only; ID rows to the prompt plus
    ``s * Attn(Q, to_k_ip(c_id), to_v_ip(c_id))``. Training: every row attends to
    ``c_id`` only (text cross-attention off).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        infinite_id: Optional[IDConditioning] = None,
    ) -> torch.Tensor:
        _no_mask(attention_mask, "IDCrossAttnProcessor")
        frame = _Frame(attn, hidden_states, temb)
        q = frame.query()
        if infinite_id is not None and infinite_id.mode == TRAINING:
            k_ip, v_ip = frame.keys_values(infinite_id.id_embeds, self.to_k_ip, self.to_v_ip)
            return frame.finish(F.scaled_dot_product_attention(q, k_ip, v_ip))

        context = frame.hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        k, v = frame.keys_values(context, attn.to_k, attn.to_v)
        out = F.scaled_dot_product_attention(q, k, v)
        if infinite_id is None:
            return frame.finish(out)

        out_t, out_id = split_streams(out)
        _, q_id = split_streams(q)
        k_ip, v_ip = frame.keys_values(infinite_id.id_embeds, self.to_k_ip, self.to_v_ip)
        scale = infinite_id.id_scale
        if scale is None:
            scale = torch.ones(q_id.shape[0], dtype=q.dtype, device=q.device)
        ip = F.scaled_dot_product_attention(q_id, k_ip, v_ip)
        out_id = out_id + scale.to(ip.dtype).view(-1, 1, 1, 1) * ip
        return frame.finish(merge_streams(out_t, out_id))


def _is_self_attention(name: str) -> bool:
    return name.endswith("attn1.processor")


def install_processors(unet: nn.Module, kernel_backend: str = "auto") -> Dict[str, nn.Module]:
    """Put Infinite-ID's processors on every transformer block of ``unet``.

    Returns the installed processors by name (diffusers' ``attn_processors`` keys).
    The ``attn2`` projections are freshly initialised; load an adapter to fill them.
    """
    cross_dim = unet.config.cross_attention_dim
    procs: Dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        key = f"{name}.processor"
        if _is_self_attention(key):
            procs[key] = MixedSelfAttnProcessor(kernel_backend)
        elif module.is_cross_attention:
            procs[key] = IDCrossAttnProcessor(module.inner_dim, cross_dim)
        else:  # not a transformer block's attention: leave it plain
            procs[key] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    p = next(unet.parameters())
    for proc in procs.values():
        if isinstance(proc, nn.Module):
            proc.to(device=p.device, dtype=p.dtype)
    return procs


def remove_processors(unet: nn.Module) -> None:
    """Restore diffusers' default processor everywhere (drops the ID projections)."""
    unet.set_attn_processor(AttnProcessor2_0())


def id_processors(unet: nn.Module) -> Dict[str, IDCrossAttnProcessor]:
    """The installed ``attn2`` processors by name, in the U-Net's module order."""
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, IDCrossAttnProcessor)}
