"""The Triton device code of the mixed-attention kernel, without torch.

Split from :mod:`.triton_mixed` (which launches these kernels on torch tensors)
so that compiling the TensorRT plugin kernel ahead of time
(:mod:`.plugin_ptx`) needs triton only: an engine-build box needs neither torch
nor a current torch device. The algorithm is described in :mod:`.triton_mixed`.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
