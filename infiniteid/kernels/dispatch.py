"""``mixed_attention``: one entry point that picks the Triton kernel or the torch reference.

Backends:

* ``"torch"``: :func:`~infiniteid.kernels.reference.mixed_attention_reference`
  (SDPA over explicitly concatenated, AdaIN-shifted keys). Runs everywhere,
  supports autograd.
* ``"triton"``: :func:`~infiniteid.kernels.triton_mixed.mixed_attention_triton`.
  Needs triton and CUDA tensors (or ``TRITON_INTERPRET=1``); forward only.
* ``"auto"``: the kernel where it was measured faster (see :data:`AUTO_TRITON_DTYPES`
  and benchmarks/results/), else torch. Never the kernel on the CPU, when autograd
  needs a graph, or while a graph is being traced for export (ONNX, TorchScript,
  ``torch.export``). Under ``torch.compile`` the kernel runs as one custom operator
  (:mod:`.compiled`), so the compiler keeps it whole.

While :func:`infiniteid.kernels.onnx_op.attention_plugin` is active, mixed attention
becomes one custom ONNX node (the TensorRT plugin) instead, whatever the backend.

triton is imported lazily: the package works without it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .reference import mixed_attention_reference

BACKENDS = ("auto", "triton", "torch")

#: dtypes for which "auto" uses the kernel on CUDA. From benchmarks/results/kernel_notes.md
#: (H200, SDXL shapes): fp16/bf16 1.6-2.2x faster than SDPA flash over concatenated
#: keys, 1.2-1.9x faster than SDPA cuDNN; fp32 (exact IEEE dots) 3x slower than SDPA.
AUTO_TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16})


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernel module imports (triton installed and importable)."""
    try:
        from . import triton_mixed  # noqa: F401
    except ImportError:
        return False
    return True


def _exporting() -> bool:
    """A graph is being captured for a file (ONNX export, TorchScript trace, torch.export)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return True
    return bool(torch.compiler.is_exporting())


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def choose_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mixed: bool, backend: str) -> str:
    """Which implementation ``backend`` resolves to for these inputs: ``"triton"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        return "triton"
    # auto
    if not mixed or not q.is_cuda or _exporting() or _needs_grad(q, k, v):
        return "torch"
    if q.dtype not in AUTO_TRITON_DTYPES or not triton_available():
        return "torch"
    from .triton_mixed import check_inputs

    return "torch" if check_inputs(q, k, v, mixed) else "triton"


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mixed: bool = True,
    adain: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixed self-attention of a two-stream ``(B, H, N, D)`` batch (DESIGN section 2).

    Rows ``[0, B/2)`` are the text stream, ``[B/2, B)`` the ID stream. ``scale``
    defaults to ``1/sqrt(D)``. See the module docstring for ``backend``.
    """
    if mixed:
        from .onnx_op import plugin_export_enabled

        if plugin_export_enabled():
            from .onnx_op import plugin_node

            return plugin_node(q, k, v, adain=adain, scale=scale)
    if choose_backend(q, k, v, mixed=mixed, backend=backend) == "triton":
        if torch.compiler.is_compiling():
            from .compiled import mixed_attention_op

            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            return mixed_attention_op(q, k, v, bool(mixed), bool(adain), scale)
        from .triton_mixed import mixed_attention_triton

        return mixed_attention_triton(q, k, v, mixed=mixed, adain=adain, scale=scale)
    return mixed_attention_reference(q, k, v, mixed=mixed, adain=adain, scale=scale)
