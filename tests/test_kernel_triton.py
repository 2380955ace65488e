"""The Triton mixed-attention kernel against the concatenating reference.

On a machine without CUDA these run in Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py); with CUDA they run compiled on the GPU. Inputs are fresh
random draws every run (the seed is in each failure message); outputs are written
into a NaN-poisoned buffer so an unwritten element cannot pass.

Error bounds (relative Frobenius error against a float64 evaluation):
fp32 < 1e-5 (IEEE dots), fp16 < 3e-3, bf16 < 2e-2, and never more than twice the
error of the torch reference run in the same dtype (plus a rounding floor).
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from infiniteid.kernels.fold import mean_delta  # noqa: E402
from infiniteid.kernels.reference import mixed_attention_math, mixed_attention_reference  # noqa: E402
from infiniteid.kernels.triton_mixed import (  # noqa: E402
    LOG2E,
    KernelConfig,
    check_inputs,
    dot_in_f32,
    dot_precision,
    mean_delta_triton,
    mixed_attention_triton,
    mixed_attn_plugin_kernel,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
SMALL_TILES = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, reduce_block=64)


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def two_stream(pairs, heads, tokens, dim, dtype, seed):
    """q, k, v with different per-channel means per stream, so AdaIN-mean matters."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        x = torch.randn(2 * pairs, heads, tokens, dim, generator=gen)
        x = x + 1.5 * torch.randn(2 * pairs, heads, 1, dim, generator=gen)
        return x.to(DEVICE, dtype)

    return one(), one(), one()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def check_against_reference(q, k, v, out, *, mixed, adain, seed, scale=None):
    assert not torch.isnan(out).any(), f"unwritten (NaN) output elements, seed={seed}"
    truth = mixed_attention_math(q.double().cpu(), k.double().cpu(), v.double().cpu(), mixed=mixed, adain=adain, scale=scale)
    err = rel(out, truth)
    ref_err = rel(mixed_attention_reference(q, k, v, mixed=mixed, adain=adain, scale=scale), truth)
    dt = q.dtype
    assert err < BOUND[dt], f"relative error {err:.2e} >= {BOUND[dt]:.0e} ({dt}), seed={seed}"
    assert err <= 2 * ref_err + FLOOR[dt], f"kernel {err:.2e} vs torch reference {ref_err:.2e}, seed={seed}"
    return err


CASES = [
    # dtype, pairs, heads, tokens, head_dim, mixed, adain
    (torch.float32, 1, 2, 77, 64, True, True),
    (torch.float32, 2, 1, 100, 16, True, False),
    (torch.float16, 1, 2, 257, 64, True, True),
    (torch.float16, 2, 1, 77, 128, True, False),
    (torch.bfloat16, 1, 1, 100, 64, True, True),
    (torch.bfloat16, 2, 1, 257, 32, True, False),
    (torch.float16, 1, 2, 128, 64, True, True),  # whole tiles: no masks
    (torch.float32, 1, 1, 300, 64, False, True),  # mixed attention off: plain attention
]


@pytest.mark.parametrize("dtype,pairs,heads,tokens,dim,mixed,adain", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kernel_matches_reference(dtype, pairs, heads, tokens, dim, mixed, adain):
    seed = fresh_seed()
    q, k, v = two_stream(pairs, heads, tokens, dim, dtype, seed)
    out = torch.full_like(q, float("nan"))
    got = mixed_attention_triton(q, k, v, mixed=mixed, adain=adain, out=out)
    assert got is out
    check_against_reference(q, k, v, out, mixed=mixed, adain=adain, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_small_tiles_many_loop_trips_and_tails(dtype):
    """32x16 tiles over 77 tokens: several query blocks, several key steps, ragged tails."""
    seed = fresh_seed()
    q, k, v = two_stream(2, 1, 77, 16, dtype, seed)
    out = torch.full_like(q, float("nan"))
    mixed_attention_triton(q, k, v, adain=True, out=out, config=SMALL_TILES)
    check_against_reference(q, k, v, out, mixed=True, adain=True, seed=seed)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_lazy_rescaling_on_large_logits(tma):
    """Lazy rescaling keeps a row's max until it grows by 2^8: exact on large, drifting logits."""
    seed = fresh_seed()
    q, k, v = two_stream(2, 1, 100, 32, torch.float32, seed)
    q = q * 4  # logits of tens: the running max moves often
    out = torch.full_like(q, float("nan"))
    cfg = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, reduce_block=64, lazy_rescale=True, tma=tma)
    mixed_attention_triton(q, k, v, adain=True, out=out, config=cfg)
    check_against_reference(q, k, v, out, mixed=True, adain=True, seed=seed)


def test_strided_inputs_custom_scale_and_default_output_layout():
    """Heads-split views as attention processors make them; output in (B, N, H, D) memory."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b, n, h, d = 4, 65, 2, 32
    x = [torch.randn(b, n, h * d, generator=gen).to(DEVICE) + torch.randn(b, 1, h * d, generator=gen).to(DEVICE) for _ in range(3)]
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    out = mixed_attention_triton(q, k, v, adain=True, scale=0.3)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    check_against_reference(q, k, v, out, mixed=True, adain=True, seed=seed, scale=0.3)


def test_given_delta_equals_computed_delta():
    seed = fresh_seed()
    q, k, v = two_stream(2, 2, 50, 16, torch.float32, seed)
    delta = mean_delta(k, v)
    a = mixed_attention_triton(q, k, v, delta=delta)
    b = mixed_attention_triton(q, k, v)
    assert rel(a, b) < 1e-6, f"seed={seed}"
    with pytest.raises(ValueError, match="delta must be"):
        mixed_attention_triton(q, k, v, delta=delta[:1])


def test_reduction_kernel_splits_add_up_to_the_means():
    seed = fresh_seed()
    _, k, v = two_stream(2, 3, 257, 16, torch.float16, seed)
    parts = mean_delta_triton(k, v, KernelConfig(reduce_block=64))
    assert parts.shape == (2, 3, 5, 2, 16) and parts.dtype == torch.float32  # ceil(257 / 64) splits
    want = mean_delta(k.double(), v.double(), dtype=torch.float64)
    assert rel(parts.sum(dim=2), want) < 1e-6, f"seed={seed}"


def test_plugin_entry_kernel_matches_reference():
    """The TensorRT AOT entry point (contiguous tensors, delta from the graph), launched by triton."""
    seed = fresh_seed()
    dtype = torch.float16
    q, k, v = two_stream(2, 2, 77, 64, dtype, seed)
    delta = mean_delta(k, v).contiguous()
    out = torch.full_like(q, float("nan"))
    block_m, block_n = 64, 32
    grid = (triton.cdiv(77, block_m), 2, 4)
    mixed_attn_plugin_kernel[grid](
        q, k, v, delta, 77, 2, 2, out,
        QK_SCALE=LOG2E / 8.0, HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=block_n,
        ADAIN=True, EVEN_M=False, EVEN_N=False, PREC=dot_precision(dtype), DOT_F32=dot_in_f32(dtype),
        num_warps=4, num_stages=2,
    )
    check_against_reference(q, k, v, out, mixed=True, adain=True, seed=seed)


def test_check_inputs_explains_what_is_wrong():
    q = torch.zeros(4, 2, 8, 64, device=DEVICE)
    assert check_inputs(q, q, q, True) is None
    assert "even size" in check_inputs(q[:3], q[:3], q[:3], True)
    assert check_inputs(q[:3], q[:3], q[:3], False) is None  # plain attention: any batch
    assert "head dim 48" in check_inputs(q[..., :48], q[..., :48], q[..., :48], True)
    assert "one dtype" in check_inputs(q, q.half(), q, True)
    assert "float64" in check_inputs(q.double(), q.double(), q.double(), True)
    assert "shape" in check_inputs(q, q[:, :, :4], q, True)
    with pytest.raises(ValueError, match="even size"):
        mixed_attention_triton(q[:3], q[:3], q[:3])
    with pytest.raises(ValueError, match="out must match"):
        mixed_attention_triton(q, q, q, out=torch.empty(4, 2, 8, 64, dtype=torch.float16, device=DEVICE))


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(block_m=48).validate()
    with pytest.raises(ValueError, match="num_warps"):
        KernelConfig(num_warps=3).validate()
    assert KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3).validate().label() == "M128/N64/w4/s3"
    assert KernelConfig(tma=True, lazy_rescale=True).label().endswith("/tma/lazy")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 17, 64, 200, 333])
def test_sweep(dtype, tokens):
    """Wider sweep: token counts from 1 up, both switches, two head dims."""
    for dim, adain, mixed in ((64, True, True), (128, False, True), (16, True, False)):
        seed = fresh_seed()
        q, k, v = two_stream(1, 1, tokens, dim, dtype, seed)
        out = torch.full_like(q, float("nan"))
        mixed_attention_triton(q, k, v, mixed=mixed, adain=adain, out=out)
        check_against_reference(q, k, v, out, mixed=mixed, adain=adain, seed=seed)
