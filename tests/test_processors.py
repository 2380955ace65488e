"""attn1 / attn2 processors against formulas written out by hand, independently of the code under test.

Relative error everywhere: ``max|a - b| / max|b|``. The oracle runs in float64 numpy
on the processor's own weights, so an fp32 run should agree to ~1e-7; the bound is 1e-5.
"""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from infiniteid.model.processors import (
    INFERENCE,
    TRAINING,
    IDConditioning,
    IDCrossAttnProcessor,
    MixedSelfAttnProcessor,
)

DIM, HEADS, TOKENS = 32, 4, 13


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _attention(seed: int, cross_dim=None) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, cross_attention_dim=cross_dim, heads=HEADS, dim_head=DIM // HEADS, bias=False)
    for p in attn.parameters():  # default init leaves biases zero; randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return attn.eval()


def _w(linear):
    w = linear.weight.detach().double().numpy()
    b = None if linear.bias is None else linear.bias.detach().double().numpy()
    return lambda x: x @ w.T + (0 if b is None else b)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attend(q, k, v):
    """Single-head attention on (N, d) arrays."""
    return _softmax(q @ k.T / np.sqrt(q.shape[-1])) @ v


def explicit_attn1(attn, h, mixed, adain, partner):
    """The method's attn1, spelled out row by row: rows [0, P) text, [P, 2P) ID;
    ID row P+i attends to [K_id' ; K_t] of text row ``partner[i]``."""
    h = h.detach().double().numpy()
    q, k, v = (_w(l)(h) for l in (attn.to_q, attn.to_k, attn.to_v))
    P, d = h.shape[0] // 2, DIM // HEADS
    out = np.zeros_like(q)
    for row in range(2 * P):
        for head in range(HEADS):
            sl = slice(head * d, (head + 1) * d)
            qh, kh, vh = q[row, :, sl], k[row, :, sl], v[row, :, sl]
            if row >= P and mixed:
                t = partner[row - P]
                kt, vt = k[t, :, sl], v[t, :, sl]
                if adain:
                    kh = kh - kh.mean(0) + kt.mean(0)
                    vh = vh - vh.mean(0) + vt.mean(0)
                kh, vh = np.concatenate([kh, kt]), np.concatenate([vh, vt])
            out[row, :, sl] = _attend(qh, kh, vh)
    return _w(attn.to_out[0])(out)


def _run(proc, attn, h, cond, context=None):
    with torch.no_grad():
        return proc(attn, h, encoder_hidden_states=context, infinite_id=cond).double().numpy()


@pytest.mark.parametrize("images,cfg", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("mixed,adain", [(True, True), (True, False), (False, False)])
def test_attn1_equals_explicit_formula(images, cfg, mixed, adain):
    attn = _attention(seed=images * 10 + cfg)
    pairs = images * (2 if cfg else 1)
    h = torch.randn(2 * pairs, TOKENS, DIM)  # fresh every test (no fixed seed needed for the oracle)
    cond = IDConditioning(id_embeds=torch.zeros(pairs, 1, 8), mixed_attention=mixed, adain=adain, mode=INFERENCE)
    got = _run(MixedSelfAttnProcessor(kernel_backend="torch"), attn, h, cond)
    want = explicit_attn1(attn, h, mixed, adain, partner=list(range(pairs)))
    assert got.dtype == np.float64 and got.shape == (2 * pairs, TOKENS, DIM)
    assert rel_err(got, want) < 1e-5


def test_attn1_pairing_is_really_tested():
    """Pair ID row i with text row (P-1-i) instead: the oracle must then disagree."""
    attn = _attention(seed=3)
    pairs = 4  # 2 images with CFG
    h = torch.randn(2 * pairs, TOKENS, DIM)
    cond = IDConditioning(id_embeds=torch.zeros(pairs, 1, 8), mode=INFERENCE)
    got = _run(MixedSelfAttnProcessor(kernel_backend="torch"), attn, h, cond)
    right = explicit_attn1(attn, h, True, True, partner=list(range(pairs)))
    swapped = explicit_attn1(attn, h, True, True, partner=list(reversed(range(pairs))))
    assert rel_err(got, right) < 1e-5
    assert rel_err(got, swapped) > 1e-2


def test_attn1_without_conditioning_is_plain_self_attention():
    attn = _attention(seed=4)
    h = torch.randn(4, TOKENS, DIM)
    got = _run(MixedSelfAttnProcessor(kernel_backend="torch"), attn, h, None)
    want = explicit_attn1(attn, h, mixed=False, adain=False, partner=[])  # mixed off: every row plain
    assert rel_err(got, want) < 1e-5


def explicit_attn2(attn, proc, h, ctx, id_embeds, scale):
    """attn2: every row attends to the prompt; ID rows add s * Attn(Q, K_ip, V_ip)."""
    h, ctx, ide = (x.detach().double().numpy() for x in (h, ctx, id_embeds))
    q, k, v = _w(attn.to_q)(h), _w(attn.to_k)(ctx), _w(attn.to_v)(ctx)
    kip, vip = _w(proc.to_k_ip)(ide), _w(proc.to_v_ip)(ide)
    P, d = h.shape[0] // 2, DIM // HEADS
    out = np.zeros_like(q)
    for row in range(2 * P):
        for head in range(HEADS):
            sl = slice(head * d, (head + 1) * d)
            o = _attend(q[row, :, sl], k[row, :, sl], v[row, :, sl])
            if row >= P:
                o = o + scale[row - P] * _attend(q[row, :, sl], kip[row - P, :, sl], vip[row - P, :, sl])
            out[row, :, sl] = o
    return _w(attn.to_out[0])(out)


@pytest.mark.parametrize("pairs", [1, 4])
def test_attn2_equals_explicit_formula(pairs):
    cross = 24
    attn = _attention(seed=5, cross_dim=cross)
    proc = IDCrossAttnProcessor(DIM, cross)
    torch.nn.init.normal_(proc.to_k_ip.weight, std=0.3)
    torch.nn.init.normal_(proc.to_v_ip.weight, std=0.3)
    h, ctx = torch.randn(2 * pairs, TOKENS, DIM), torch.randn(2 * pairs, 7, cross)
    ide, scale = torch.randn(pairs, 5, cross), torch.rand(pairs) * 2
    got = _run(proc, attn, h, IDConditioning(id_embeds=ide, id_scale=scale), context=ctx)
    want = explicit_attn2(attn, proc, h, ctx, ide, scale.double().numpy())
    assert rel_err(got, want) < 1e-5


def test_attn2_training_mode_ignores_prompt_embeddings():
    cross = 24
    attn = _attention(seed=6, cross_dim=cross)
    proc = IDCrossAttnProcessor(DIM, cross)
    h, ide = torch.randn(2, TOKENS, DIM), torch.randn(2, 5, cross)
    cond = IDConditioning(id_embeds=ide, mode=TRAINING)
    a = _run(proc, attn, h, cond, context=torch.randn(2, 7, cross))
    b = _run(proc, attn, h, cond, context=torch.randn(2, 7, cross) * 5)
    np.testing.assert_array_equal(a, b)
    # ...and it does depend on the identity tokens
    c = _run(proc, attn, h, IDConditioning(id_embeds=torch.randn(2, 5, cross), mode=TRAINING), context=None)
    assert rel_err(c, a) > 1e-3


def test_conditioning_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be"):
        IDConditioning(id_embeds=torch.zeros(1, 1, 1), mode="train")
