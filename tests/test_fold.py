"""The exact fold (DESIGN section 2): per-query bias on ID keys + output correction
equals concatenation + AdaIN-mean, in float64 on random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from infiniteid.kernels.fold import mean_delta, mixed_attention_fold
from infiniteid.kernels.reference import adain_mean, mixed_attention_math, mixed_keys_values


def two_stream(pairs: int, heads: int, tokens: int, dim: int, gen: torch.Generator, dtype=torch.float64):
    """Random q, k, v whose streams have different per-channel means (so AdaIN-mean matters)."""
    def one():
        x = torch.randn(2 * pairs, heads, tokens, dim, generator=gen, dtype=dtype)
        return x + 1.5 * torch.randn(2 * pairs, heads, 1, dim, generator=gen, dtype=dtype)

    return one(), one(), one()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("pairs,heads,tokens,dim", [(1, 1, 5, 8), (2, 3, 77, 16), (4, 2, 100, 64)])
def test_fold_equals_concatenation_with_adain(pairs, heads, tokens, dim):
    gen = torch.Generator().manual_seed(1000 + tokens)
    q, k, v = two_stream(pairs, heads, tokens, dim, gen)
    scale = 1.0 / math.sqrt(dim)
    folded = mixed_attention_fold(q, k, v, adain=True, scale=scale)
    concat = mixed_attention_math(q, k, v, mixed=True, adain=True, scale=scale)
    assert rel(folded, concat) < 1e-13
    # and AdaIN-mean really changes the result on these inputs
    assert rel(mixed_attention_math(q, k, v, adain=False), concat) > 1e-2


def test_fold_without_adain_is_plain_mixed_attention():
    gen = torch.Generator().manual_seed(7)
    q, k, v = two_stream(2, 2, 33, 16, gen)
    assert rel(mixed_attention_fold(q, k, v, adain=False), mixed_attention_math(q, k, v, adain=False)) < 1e-13


def test_fold_term_by_term_on_one_query():
    """Spell the identity out for one ID query: logits and output of the fold vs the shifted keys."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = two_stream(1, 1, 9, 4, gen)
    k_t, k_id, v_t, v_id = k[0, 0], k[1, 0], v[0, 0], v[1, 0]
    dk = k_t.mean(0) - k_id.mean(0)
    dv = v_t.mean(0) - v_id.mean(0)
    x = q[1, 0, 4]  # one ID-stream query
    shifted_k = torch.cat([adain_mean(k_id, k_t), k_t])
    shifted_v = torch.cat([adain_mean(v_id, v_t), v_t])
    logits_concat = shifted_k @ x
    logits_fold = torch.cat([k_id @ x + x @ dk, k_t @ x])
    assert torch.allclose(logits_fold, logits_concat, rtol=0, atol=1e-12)
    p = torch.softmax(logits_concat, 0)
    out_concat = p @ shifted_v
    out_fold = p @ torch.cat([v_id, v_t]) + p[: k_id.shape[0]].sum() * dv
    assert torch.allclose(out_fold, out_concat, rtol=0, atol=1e-12)


def test_mean_delta_layout_and_values():
    gen = torch.Generator().manual_seed(11)
    _, k, v = two_stream(3, 2, 21, 8, gen)
    delta = mean_delta(k, v, dtype=torch.float64)
    assert delta.shape == (3, 2, 2, 8) and delta.dtype == torch.float64
    k_mix, v_mix = mixed_keys_values(k, v, adain=True)
    # the shifted ID keys are K_id + dk, the shifted ID values V_id + dv
    assert torch.allclose(k_mix[:, :, :21], k[3:] + delta[:, :, 0:1], atol=1e-12)
    assert torch.allclose(v_mix[:, :, :21], v[3:] + delta[:, :, 1:2], atol=1e-12)
    # float32 by default, accumulated in at least float32 for half inputs
    assert mean_delta(k.half(), v.half()).dtype == torch.float32


def test_fold_uses_given_delta():
    gen = torch.Generator().manual_seed(5)
    q, k, v = two_stream(1, 1, 12, 8, gen)
    delta = mean_delta(k, v, dtype=torch.float64)
    assert rel(mixed_attention_fold(q, k, v, delta=delta), mixed_attention_fold(q, k, v)) < 1e-15
    other = mixed_attention_fold(q, k, v, delta=torch.zeros_like(delta))
    assert rel(other, mixed_attention_fold(q, k, v, adain=False)) < 1e-13
