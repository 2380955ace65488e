"""The exact fold of AdaIN-mean into attention, written out in plain torch.

DESIGN section 2: with ``dk = mean(K_t) - mean(K_id)`` and ``dv = mean(V_t) - mean(V_id)``
(per pair and head, mean over tokens), an ID-stream query ``q`` attending to
``[K_id + dk; K_t]`` / ``[V_id + dv; V_t]`` gets

    logit_j = q.k_j + [j in ID keys] * q.dk
    out     = sum_j p_j v_j + (sum_{j in ID keys} p_j) * dv

because ``q.(k_j + dk) = q.k_j + q.dk`` and ``sum_j p_j (v_j + dv) = sum_j p_j v_j
+ (sum_j p_j) dv`` over the ID keys. So a kernel never needs the shifted copies,
only the two mean differences ("delta").

This module is the readable statement of that identity: :func:`mixed_attention_fold`
computes mixed attention through the fold (no concatenation of keys, no shifted
copies) and is tested against the concatenating reference in float64. It is also
the eager implementation of the ONNX custom node (see :mod:`.onnx_op`), whose
fourth input is exactly :func:`mean_delta`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..layout import split_streams


def mean_delta(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[mean(K_t) - mean(K_id), mean(V_t) - mean(V_id)]`` of a two-stream batch.

    Inputs ``(B, H, N, D)`` with ``B = 2 * pairs``; returns ``(pairs, H, 2, D)`` in
    ``dtype`` (float32 by default: the means are accumulated in at least that precision).
    """
    work = torch.promote_types(dtype, k.dtype)
    k_t, k_id = split_streams(_as(k, work))
    v_t, v_id = split_streams(_as(v, work))
    dk = (k_t - k_id).mean(dim=2)
    dv = (v_t - v_id).mean(dim=2)
    return _as(torch.stack([dk, dv], dim=2), dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, without a (traced, no-op) cast when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


def mixed_attention_fold(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    adain: bool = True,
    scale: Optional[float] = None,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed attention (``mixed=True``) of a ``(B, H, N, D)`` two-stream batch via the fold.

    ``delta`` (``(B/2, H, 2, D)``, see :func:`mean_delta`) is computed when not given.
    With ``adain=False`` it is ignored. Arithmetic runs in the input dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_t, q_id = split_streams(q)
    k_t, k_id = split_streams(k)
    v_t, v_id = split_streams(v)

    out_t = torch.softmax((q_t @ k_t.transpose(-1, -2)) * scale, dim=-1) @ v_t

    logit_id = (q_id @ k_id.transpose(-1, -2)) * scale  # (P, H, N, N) own (ID) keys
    logit_t = (q_id @ k_t.transpose(-1, -2)) * scale  # partner text keys
    if adain:
        if delta is None:
            delta = mean_delta(k, v, dtype=q.dtype)
        delta = delta.to(q.dtype)
        dk, dv = delta[:, :, 0:1, :], delta[:, :, 1:2, :]  # (P, H, 1, D)
        bias = (q_id * dk).sum(dim=-1, keepdim=True) * scale  # q.dk per query: (P, H, N, 1)
        logit_id = logit_id + bias
    p = torch.softmax(torch.cat([logit_id, logit_t], dim=-1), dim=-1)
    n_id = k_id.shape[-2]
    p_id, p_t = p[..., :n_id], p[..., n_id:]
    out_id = p_id @ v_id + p_t @ v_t
    if adain:
        out_id = out_id + p_id.sum(dim=-1, keepdim=True) * dv
    return torch.cat([out_t, out_id], dim=0)
