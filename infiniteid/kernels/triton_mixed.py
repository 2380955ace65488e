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

This module imports triton at import time; :mod:`infiniteid.kernels` imports it
lazily, so the package works without triton.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

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


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------
# device code
# ----------------------------------------------------------------------------
@triton.jit
def _flash_loop(
    acc, m_i, l_i, q,
    k_src, v_src, row, h, stride_kn, stride_vn, n_keys,
    offs_n, offs_d,
    QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
):
    """Online-softmax loop over the keys/values of batch row ``row``, head ``h``; scores in log2 units.

    ``k_src``/``v_src`` are tensor descriptors (``TMA``; ``row``, ``h`` are coordinates)
    or pointers already offset to (row, head).

    ``LAZY``: keep a row's running max until a tile's max exceeds it by more than
    ``2^8`` (probabilities stay <= 256, exact after the final division), and skip
    the rescaling of the accumulator when no row of the tile moved its max.
    """
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        if TMA:
            # rows past the end are zero-filled by the copy engine
            kt = tl.trans(k_src.load([row, h, start, 0]).reshape(BLOCK_N, HEAD_DIM))
        else:
            k_ptrs = k_src + cols[None, :] * stride_kn + offs_d[:, None]
            if EVEN_N:
                kt = tl.load(k_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=cols[None, :] < n_keys, other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=PREC)
        s = s * QK_SCALE
        if not EVEN_N:
            s = tl.where(cols[None, :] < n_keys, s, float("-inf"))
        m_tile = tl.max(s, 1)
        if LAZY:
            m_new = tl.where(m_tile > m_i + 8.0, m_tile, m_i)
        else:
            m_new = tl.maximum(m_i, m_tile)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if LAZY:
            if tl.max(m_new - m_i, 0) > 0:
                acc = acc * alpha[:, None]
        else:
            acc = acc * alpha[:, None]
        if TMA:
            v = v_src.load([row, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            v_ptrs = v_src + cols[:, None] * stride_vn + offs_d[None, :]
            if EVEN_N:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=cols[:, None] < n_keys, other=0.0)
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _mixed_attn_body(
    Q, K, V, Delta, Out,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    n_ctx, n_heads, pairs, n_splits, row, h, pid_m,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, ADAIN: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
):
    """One program: ``BLOCK_M`` queries of batch row ``row``, head ``h``.

    ``Q, K, V, Out`` are tensor descriptors over ``(B, H, N, D)`` when ``TMA``, else
    pointers with the given strides.
    """
    is_id = row >= pairs
    partner = tl.maximum(row - pairs, 0)  # text row of an ID row (unused for text rows)
    row64 = row.to(tl.int64)
    h64 = h.to(tl.int64)
    partner64 = partner.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    if TMA:
        q = Q.load([row, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
        k_own, v_own, k_text, v_text = K, V, K, V
    else:
        q_ptrs = Q + row64 * sqb + h64 * sqh + offs_m[:, None] * sqn + offs_d[None, :]
        if EVEN_M:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < n_ctx, other=0.0)
        k_own = K + row64 * skb + h64 * skh
        v_own = V + row64 * svb + h64 * svh
        k_text = K + partner64 * skb + h64 * skh
        v_text = V + partner64 * svb + h64 * svh

    HAS_FOLD: tl.constexpr = MIXED and ADAIN
    dv = tl.zeros([HEAD_DIM], dtype=tl.float32)
    bias2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_FOLD:
        # add up the split slices of delta; text rows read nothing (all-false mask)
        id_mask = offs_d < tl.where(is_id, HEAD_DIM, 0)
        base = Delta + (partner64 * n_heads + h64) * n_splits * 2 * HEAD_DIM
        dk = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s in range(0, n_splits):
            dk += tl.load(base + s * 2 * HEAD_DIM + offs_d, mask=id_mask, other=0.0)
            dv += tl.load(base + s * 2 * HEAD_DIM + HEAD_DIM + offs_d, mask=id_mask, other=0.0)
        bias2 = tl.sum(q.to(tl.float32) * dk[None, :], 1) * QK_SCALE  # q.dk in log2 units

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # 1. own keys: ID keys for an ID row, text keys for a text row
    acc, m_i, l_i = _flash_loop(
        acc, m_i, l_i, q, k_own, v_own, row, h, skn, svn, n_ctx,
        offs_n, offs_d, QK_SCALE, BLOCK_N, HEAD_DIM, EVEN_N, PREC, DOT_F32, TMA, LAZY,
    )
    # every ID logit gets +q.dk: shifting the running max by it is the same thing
    m_i = m_i + bias2
    m_own = m_i
    l_own = l_i
    if MIXED:
        # 2. partner text keys for an ID row; zero trips for a text row
        n_partner = tl.where(is_id, n_ctx, 0)
        acc, m_i, l_i = _flash_loop(
            acc, m_i, l_i, q, k_text, v_text, partner, h, skn, svn, n_partner,
            offs_n, offs_d, QK_SCALE, BLOCK_N, HEAD_DIM, EVEN_N, PREC, DOT_F32, TMA, LAZY,
        )
    inv_l = 1.0 / l_i
    out = acc * inv_l[:, None]
    if HAS_FOLD:
        mass_id = l_own * tl.exp2(m_own - m_i) * inv_l  # softmax mass on the ID keys
        out += mass_id[:, None] * dv[None, :]
    if TMA:
        # rows past the end are clipped by the copy engine
        Out.store([row, h, pid_m * BLOCK_M, 0], out.to(Out.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = Out + row64 * sob + h64 * soh + offs_m[:, None] * son + offs_d[None, :]
        if EVEN_M:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < n_ctx)


@triton.jit
def _mixed_attn_fwd(
    Q, K, V, Delta, Out,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    n_ctx, n_heads, pairs, n_splits,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, ADAIN: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
):
    """PyTorch-launched entry point: any strides (last dim contiguous), pointers or descriptors.

    Grid ``(m-blocks, heads, rows)``. Rows run last-first: blocks are dispatched
    roughly in grid order, so the ID rows (twice the keys) start first and the
    short text-row programs fill the tail.
    """
    row = tl.num_programs(2) - 1 - tl.program_id(2)
    _mixed_attn_body(
        Q, K, V, Delta, Out,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
        n_ctx, n_heads, pairs, n_splits, row, tl.program_id(1), tl.program_id(0),
        QK_SCALE, HEAD_DIM, BLOCK_M, BLOCK_N, MIXED, ADAIN, EVEN_M, EVEN_N, PREC, DOT_F32, TMA, LAZY,
    )


@triton.jit
def mixed_attn_plugin_kernel(
    Q, K, V, Delta, n_ctx, n_heads, pairs, Out,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ADAIN: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """TensorRT AOT entry point.

    TensorRT calls an AOT plugin kernel as (input pointers, int32 extra args,
    output pointers) on contiguous ``(B, H, N, D)`` tensors, with ``Delta``
    ``(pairs, H, 2, D)`` float32 from the graph. Grid ``(cdiv(N, BLOCK_M), H, B)``.
    """
    son = HEAD_DIM
    soh = n_ctx * HEAD_DIM
    sob = n_heads * soh
    row = tl.num_programs(2) - 1 - tl.program_id(2)
    _mixed_attn_body(
        Q, K, V, Delta, Out,
        sob, soh, son, sob, soh, son, sob, soh, son, sob, soh, son,
        n_ctx, n_heads, pairs, 1, row, tl.program_id(1), tl.program_id(0),
        QK_SCALE, HEAD_DIM, BLOCK_M, BLOCK_N, True, ADAIN, EVEN_M, EVEN_N, PREC, DOT_F32, False, False,
    )


@triton.jit
def _mean_delta_kernel(
    K, V, Delta,
    skb, skh, skn, svb, svh, svn,
    n_ctx, n_heads, pairs, n_splits, inv_n,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
):
    """One split of ``mean(K_t - K_id)`` and ``mean(V_t - V_id)``, fp32.

    Program ``(split, pair*H + h)`` writes ``Delta[pair, h, split, 0:2, :]``: the
    sum over its ``BLOCK_T`` tokens divided by ``n_ctx``, so the splits add up to
    the means. Deterministic (no atomics) and parallel enough to stay memory-bound.
    """
    split = tl.program_id(0)
    ph = tl.program_id(1).to(tl.int64)
    pair = ph // n_heads
    h = ph % n_heads
    text_row = pair
    id_row = pair + pairs
    offs_t = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    acc_k = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([HEAD_DIM], dtype=tl.float32)
    start = split * BLOCK_T
    for t in range(0, BLOCK_T, CHUNK):
        rows = start + t + offs_t
        mask = rows[:, None] < n_ctx
        kt = tl.load(K + text_row * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=mask, other=0.0)
        ki = tl.load(K + id_row * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=mask, other=0.0)
        acc_k += tl.sum(kt.to(tl.float32) - ki.to(tl.float32), 0)
        vt = tl.load(V + text_row * svb + h * svh + rows[:, None] * svn + offs_d[None, :], mask=mask, other=0.0)
        vi = tl.load(V + id_row * svb + h * svh + rows[:, None] * svn + offs_d[None, :], mask=mask, other=0.0)
        acc_v += tl.sum(vt.to(tl.float32) - vi.to(tl.float32), 0)
    out = Delta + (ph * n_splits + split) * 2 * HEAD_DIM
    tl.store(out + offs_d, acc_k * inv_n)
    tl.store(out + HEAD_DIM + offs_d, acc_v * inv_n)


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
