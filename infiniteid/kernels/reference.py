"""Pure-torch mixed attention, written with explicit concatenation.

This is the method's ``attn1`` for a two-stream batch (see :mod:`infiniteid.layout`)
and the oracle that every faster implementation (the Triton kernel, the ONNX
graph, the TensorRT plugin) is tested against. It is also what the PyTorch
reference runs when no faster path applies.

For a batch ``[text..., id...]`` of queries/keys/values shaped ``(B, H, N, D)``:

* text-stream queries attend to their own keys and values (plain SDXL);
* ID-stream queries attend to ``[K_id'; K_t]`` / ``[V_id'; V_t]`` where, with
  AdaIN-mean on, ``K_id' = K_id - mean(K_id) + mean(K_t)`` (mean over tokens, per
  channel), likewise for ``V``; with AdaIN-mean off ``K_id' = K_id``;
* with mixed attention off, ID-stream queries attend to their own keys only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..layout import split_streams


def adain_mean(x_id: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Shift ``x_id`` so its per-channel token mean equals that of ``x_t`` (axis -2 = tokens)."""
    return x_id - x_id.mean(dim=-2, keepdim=True) + x_t.mean(dim=-2, keepdim=True)


def mixed_keys_values(
    k: torch.Tensor, v: torch.Tensor, adain: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values the ID-stream queries see: ``[K_id'; K_t]``, ``[V_id'; V_t]``.

    Returns tensors shaped ``(B/2, H, 2N, D)`` for the ID half of the batch.
    """
    k_t, k_id = split_streams(k)
    v_t, v_id = split_streams(v)
    if adain:
        k_id = adain_mean(k_id, k_t)
        v_id = adain_mean(v_id, v_t)
    return torch.cat([k_id, k_t], dim=-2), torch.cat([v_id, v_t], dim=-2)


def mixed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mixed: bool = True,
    adain: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Mixed self-attention of a two-stream batch; inputs and output ``(B, H, N, D)``.

    ``scale`` defaults to ``1/sqrt(D)``. Computation runs in the input dtype
    through :func:`torch.nn.functional.scaled_dot_product_attention`.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not mixed:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    q_t, q_id = split_streams(q)
    k_t, _ = split_streams(k)
    v_t, _ = split_streams(v)
    out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, scale=scale)
    k_mix, v_mix = mixed_keys_values(k, v, adain=adain)
    out_id = F.scaled_dot_product_attention(q_id, k_mix, v_mix, scale=scale)
    return torch.cat([out_t, out_id], dim=0)


def mixed_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mixed: bool = True,
    adain: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The same function as :func:`mixed_attention_reference`, as naive matmul + softmax.

    Materialises the full score matrix; used as the "naive math" baseline and for
    float64 checks (SDPA's fused CPU kernels need not support float64 everywhere).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def attend(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        p = torch.softmax((qq @ kk.transpose(-1, -2)) * scale, dim=-1)
        return p @ vv

    if not mixed:
        return attend(q, k, v)
    q_t, q_id = split_streams(q)
    k_t, _ = split_streams(k)
    v_t, _ = split_streams(v)
    k_mix, v_mix = mixed_keys_values(k, v, adain=adain)
    return torch.cat([attend(q_t, k_t, v_t), attend(q_id, k_mix, v_mix)], dim=0)
