"""``infiniteid.kernels.mixed_attention``: which backend runs, and that each computes the method.

The Triton backend runs in the interpreter here (conftest.py sets TRITON_INTERPRET=1
without CUDA).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention

from infiniteid.kernels import BACKENDS, choose_backend, mixed_attention
from infiniteid.kernels.reference import mixed_attention_reference
from infiniteid.model.processors import IDConditioning, MixedSelfAttnProcessor


def inputs(seed: int, shape=(4, 2, 37, 16), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen).to(dtype) + torch.randn(shape[0], 1, 1, shape[3], generator=gen).to(dtype) for _ in range(3))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_backend_names_are_checked():
    q, k, v = inputs(0)
    assert BACKENDS == ("auto", "triton", "torch")
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
        mixed_attention(q, k, v, backend="cuda")


def test_auto_uses_torch_on_cpu_and_equals_the_reference():
    q, k, v = inputs(1)
    assert choose_backend(q, k, v, mixed=True, backend="auto") == "torch"
    for adain in (True, False):
        for mixed in (True, False):
            got = mixed_attention(q, k, v, mixed=mixed, adain=adain)
            assert torch.equal(got, mixed_attention_reference(q, k, v, mixed=mixed, adain=adain))


def test_auto_never_picks_the_kernel_for_autograd_or_tracing_or_plain_attention():
    q, k, v = inputs(2)
    # on CPU "auto" is torch anyway; what matters is that these checks come first and hold on CUDA too
    q.requires_grad_(True)
    assert choose_backend(q, k, v, mixed=True, backend="auto") == "torch"
    out = mixed_attention(q, k, v)
    out.sum().backward()  # the torch path keeps autograd working
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert choose_backend(q, k, v, mixed=False, backend="auto") == "torch"


def test_forced_triton_backend_matches_torch():
    pytest.importorskip("triton")
    q, k, v = inputs(3)
    a = mixed_attention(q, k, v, adain=True, backend="triton", scale=0.2)
    b = mixed_attention(q, k, v, adain=True, backend="torch", scale=0.2)
    assert rel(a, b) < 1e-5


def test_processor_kernel_backend_is_honoured():
    """MixedSelfAttnProcessor("triton") and ("torch") give the same attn1 output."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16, bias=False).eval()
    h = torch.randn(4, 37, 64) + torch.randn(4, 1, 64)
    cond = IDConditioning(id_embeds=torch.randn(2, 3, 64))
    outs = {}
    for backend in ("torch", "triton"):
        attn.set_processor(MixedSelfAttnProcessor(kernel_backend=backend))
        with torch.no_grad():
            outs[backend] = attn(h, infinite_id=cond)
    assert rel(outs["triton"], outs["torch"]) < 1e-5
    attn.set_processor(MixedSelfAttnProcessor(kernel_backend="nope"))
    with pytest.raises(ValueError, match="backend must be one of"):
        attn(h, infinite_id=cond)


def test_package_works_without_triton():
    """With triton unimportable: auto and torch run, triton is refused with a clear message."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from infiniteid.kernels import mixed_attention\n"
        "from infiniteid.kernels.dispatch import triton_available\n"
        "q = torch.randn(2, 1, 5, 16)\n"
        "assert mixed_attention(q, q, q).shape == q.shape\n"
        "assert not triton_available()\n"
        "try:\n"
        "    mixed_attention(q, q, q, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused: backend='triton' needs the triton package" in res.stdout
