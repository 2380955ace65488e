"""Triton flash-attention kernel for Infinite-ID mixed attention (the exact fold).

Why a kernel: the ID stream's ``attn1`` reads ``[K_id'; K_t]`` (twice the keys) in
the layers with the most tokens. The plain way builds AdaIN-shifted, concatenated
copies of K and V first. With the fold of :mod:`infiniteid.kernels.fold`
(``dk``, ``dv`` = mean differences, "delta")

    logit_j = q.k_j + [j in ID keys] * q.dk
    out     = sum_j p_j v_j + (sum_{j in ID keys} p_j) * dv

one flash-attention pass reads ``K_id, V_id, K_t, V_t`` in place.

Layout (see :mod:`infiniteid.layout`): batch rows ``[0, pairs)`` are the text
stream, ``[pairs, 2*pairs)`` the ID stream; ID row ``b`` pairs with text row
``b - pairs``. One program handles ``BLOCK_M`` queries of one (row, head):

1. its own keys: the ID keys for an ID row, the text keys for a text row;
2. for an ID row with mixed attention on, the partner text row's keys. Text rows
   run this loop zero times, so both streams ride in one launch.

The per-query bias ``q.dk`` is the same for every ID key, so it is never added to a
score tile: after loop 1 the running maximum is shifted by it (the online softmax
state ``(m, l, acc)`` describes ``exp(s - m)``, and adding a constant to every
``s`` and to ``m`` changes nothing else). The mass on the ID keys is the running
sum after loop 1, rescaled by the final maximum; ``dv`` times that mass is the
output correction.

``delta`` is a float32 tensor ``(pairs, H, splits, 2, D)`` whose ``splits`` slices
add up to ``[dk, dv]``: a small split-N reduction kernel writes it here (no atomics,
deterministic); in a TensorRT engine ``splits = 1`` and the graph computes it with
ReduceMean (see :mod:`.onnx_op`).

Accumulation is fp32 for every input dtype; fp32 inputs use IEEE dot products
(not TF32) so the fp32 path matches the reference to ~1e-6.

The device code lives in :mod:`.triton_device` (torch-free, so the TensorRT
plugin compiles without torch); this module is the torch side that launches it.
It imports triton at import time; :mod:`infiniteid.kernels` imports it lazily,
so the package works without triton.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .triton_device import (  # noqa: F401  (the device code, re-exported for callers of this module)
    LOG2E,
    _mean_delta_kernel,
    _mixed_attn_fwd,
    interpreting,
    mixed_attn_plugin_kernel,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of the attention kernel.

    ``block_m`` queries per program, ``block_n`` keys per inner step; ``reduce_block``
    tokens per program of the mean-difference reduction. Defaults come from the
    GPU sweep recorded in ``benchmarks/results/``.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    reduce_block: int = 512
    #: load Q/K/V and store the output through tensor descriptors (the Hopper copy
    #: engine); needs 16-byte-aligned strides, else the kernel falls back to pointers
    tma: bool = False
    #: rescale the accumulator only when a running max grows by more than 2^8
    lazy_rescale: bool = False

    def validate(self) -> "KernelConfig":
        for name in ("block_m", "block_n", "reduce_block"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        return self

    def label(self) -> str:
        return (
            f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}"
            + ("/tma" if self.tma else "") + ("/lazy" if self.lazy_rescale else "")
        )


def default_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tile config chosen from the GPU sweep (benchmarks/results/kernel_mixed_attention_*.md).

    fp16/bf16, head dim 64: 128x64 tiles, 8 warps, 3 stages, pointer loads was the
    fastest or within noise of it at every SDXL shape on an H200 (tensor
    descriptors were 0-4% slower at 4096 tokens and, with their host-side set-up,
    up to 2x slower at 1024). Head dim 128 was not measured: same tiles.
    """
    if dtype == torch.float32:
        # IEEE fp32 dots need more registers per element: smaller tiles.
        return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


# ----------------------------------------------------------------------------
# host code
# ----------------------------------------------------------------------------
def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE dots (TF32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Upcast dot operands to fp32 in the interpreter for bf16.

    The interpreter keeps bf16 as raw uint16 and multiplies those integers in
    ``tl.dot``; bf16 products are exact in fp32, so upcasting computes what the
    GPU's bf16 tensor cores do.
    """
    return dtype == torch.bfloat16 and interpreting()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixed: bool) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None if it can."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not supported (float16, bfloat16, float32)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not supported {SUPPORTED_HEAD_DIMS}"
    if mixed and q.shape[0] % 2:
        return f"a two-stream batch has an even size, got {q.shape[0]}"
    if q.shape[0] < 1 or q.shape[1] < 1 or q.shape[2] < 1:
        return f"empty input {tuple(q.shape)}"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if q.device.type != "cuda" and not interpreting():
        return f"tensors on {q.device.type}: the kernel needs CUDA (or TRITON_INTERPRET=1)"
    return None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mean_delta_triton(k: torch.Tensor, v: torch.Tensor, config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Split-N partial means ``(pairs, H, splits, 2, D)`` float32 (splits add up to delta)."""
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    bsz, heads, n_ctx, head_dim = k.shape
    cfg = config or default_config(head_dim, k.dtype)
    pairs = bsz // 2
    n_splits = triton.cdiv(n_ctx, cfg.reduce_block)
    delta = torch.empty((pairs, heads, n_splits, 2, head_dim), dtype=torch.float32, device=k.device)
    _mean_delta_kernel[(n_splits, pairs * heads)](
        k, v, delta,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        n_ctx, heads, pairs, n_splits, 1.0 / n_ctx,
        HEAD_DIM=head_dim, BLOCK_T=cfg.reduce_block, CHUNK=min(cfg.reduce_block, 64), num_warps=4,
    )
    return delta


def tma_supported(*xs: torch.Tensor) -> bool:
    """Tensor descriptors work here: triton has them, a Hopper+ GPU (or the interpreter),
    16-byte-aligned base pointers and strides."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    for x in xs:
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
        size = x.element_size()
        if x.data_ptr() % 16 or any((st * size) % 16 for st in x.stride()[:-1]):
            return False
    return True


def _descriptor(x: torch.Tensor, block_rows: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_rows, x.shape[-1]])


def empty_like_heads(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(B, H, N, D)`` view whose memory is ``(B, N, H, D)``.

    Attention processors merge heads right after attention (``(B, N, H*D)``); with
    this layout that merge is a free view instead of a copy.
    """
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def mixed_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mixed: bool = True,
    adain: bool = True,
    scale: Optional[float] = None,
    config: Optional[KernelConfig] = None,
    delta: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed attention of a two-stream ``(B, H, N, D)`` batch with the Triton kernel.

    Same function as :func:`infiniteid.kernels.reference.mixed_attention_reference`.
    ``delta`` may be given (``(B/2, H, 2, D)`` or ``(B/2, H, splits, 2, D)``,
    float32; the splits are added up), else the reduction kernel computes it.
    ``out`` may be given (e.g. a poisoned buffer in tests; any strides with the
    last dim contiguous), else it is allocated in ``(B, N, H, D)`` memory order.
    """
    why = check_inputs(q, k, v, mixed)
    if why:
        raise ValueError(why)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    bsz, heads, n_ctx, head_dim = q.shape
    cfg = (config or default_config(head_dim, q.dtype)).validate()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = empty_like_heads(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError("out must match q in shape, dtype and device, last dim contiguous")

    pairs = bsz // 2
    fold = bool(mixed and adain)
    n_splits = 1
    if not fold:
        delta = q  # never read: a placeholder pointer
    elif delta is None:
        delta = mean_delta_triton(k, v, cfg)
        n_splits = delta.shape[2]
    else:
        if delta.dim() == 4:
            delta = delta.unsqueeze(2)
        if delta.shape[:2] != (pairs, heads) or delta.shape[3:] != (2, head_dim):
            raise ValueError(f"delta must be ({pairs}, {heads}, [splits,] 2, {head_dim}), got {tuple(delta.shape)}")
        delta = delta.to(device=q.device, dtype=torch.float32).contiguous()
        n_splits = delta.shape[2]

    tma = cfg.tma and tma_supported(q, k, v, out)
    if tma:
        srcs = (_descriptor(q, cfg.block_m), _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n))
        dst = _descriptor(out, cfg.block_m)
    else:
        srcs, dst = (q, k, v), out
    grid = (triton.cdiv(n_ctx, cfg.block_m), heads, bsz)
    _mixed_attn_fwd[grid](
        *srcs, delta, dst,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_ctx, heads, pairs, n_splits,
        QK_SCALE=scale * LOG2E, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        MIXED=bool(mixed), ADAIN=fold, EVEN_M=n_ctx % cfg.block_m == 0, EVEN_N=n_ctx % cfg.block_n == 0,
        PREC=dot_precision(q.dtype), DOT_F32=dot_in_f32(q.dtype), TMA=tma, LAZY=cfg.lazy_rescale,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
