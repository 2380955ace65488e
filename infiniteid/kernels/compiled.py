"""The Triton kernel as one torch operator, so ``torch.compile`` keeps it whole.

Dynamo cannot see through the Python that launches a Triton kernel (descriptor
set-up, grid, config choice) without breaking the graph or re-tracing it; as the
registered operator ``infiniteid::mixed_attention_triton`` the kernel is one opaque
node whose output metadata comes from a fake implementation. Inductor compiles
everything around it (projections, norms, the SDPA of ``attn2``) and calls the
kernel in place.

:func:`infiniteid.kernels.mixed_attention` goes through this operator only while a
compiler traces (eager calls the kernel directly: the dispatcher's per-call cost
is measurable at 70 attention layers x 2 CFG halves x 30 steps).
"""
from __future__ import annotations

import torch

from .triton_mixed import empty_like_heads, mixed_attention_triton


@torch.library.custom_op("infiniteid::mixed_attention_triton", mutates_args=())
def mixed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixed: bool, adain: bool, scale: float
) -> torch.Tensor:
    return mixed_attention_triton(q, k, v, mixed=mixed, adain=adain, scale=scale)


@mixed_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixed: bool, adain: bool, scale: float) -> torch.Tensor:
    # same shape, dtype and (B, N, H, D) memory order as the kernel's own output
    return empty_like_heads(q)
