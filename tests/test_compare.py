"""Error statistics between two outputs (infiniteid.compare), checked against hand-computed numbers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from infiniteid.compare import Tolerance, compare_arrays, compare_outputs, format_table, reports_to_json


def test_statistics_match_hand_computed_values():
    ref = np.array([1.0, -2.0, 4.0, 0.0], dtype=np.float32)
    cand = np.array([1.1, -2.0, 3.0, 0.001], dtype=np.float32)
    s = compare_arrays(cand, ref, name="x")
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    assert s.max_abs == pytest.approx(1.0, rel=1e-6)
    assert s.mean_abs == pytest.approx(diff.mean(), rel=1e-6)
    # floor = 1e-3 * max|ref| = 4e-3: the zero reference entry divides by 4e-3, not by 0
    rel = diff / np.maximum(np.abs(ref), 4e-3)
    assert s.max_rel == pytest.approx(rel.max(), rel=1e-6)
    assert s.max_rel == pytest.approx(0.25, rel=1e-5)  # 1.0 off 4.0, and 0.001 off 0 (floored at 0.004)
    assert s.mean_rel == pytest.approx(rel.mean(), rel=1e-6)
    assert s.rel_l2 == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref), rel=1e-6)
    cos = float(np.dot(cand, ref) / (np.linalg.norm(cand) * np.linalg.norm(ref)))
    assert s.cosine == pytest.approx(cos, rel=1e-6)
    assert s.finite and s.shape == (4,) and s.reference_max_abs == 4.0


def test_identical_arrays_are_exact():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    s = compare_arrays(x, x.copy())
    assert (s.max_abs, s.mean_abs, s.max_rel, s.rel_l2) == (0.0, 0.0, 0.0, 0.0)
    assert s.cosine == pytest.approx(1.0, abs=1e-12)


def test_fp16_rounding_error_is_within_half_precision():
    """Rounding float32 to float16 must show relative errors near fp16's epsilon (2**-11), not more."""
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    s = compare_arrays(x.astype(np.float16), x)
    assert s.candidate_dtype == "float16" and s.reference_dtype == "float32"
    assert 1e-4 < s.rel_l2 < 2 ** -11
    assert s.cosine > 0.999999
    assert s.max_abs <= 2 ** -11 * np.abs(x).max() * 1.01


def test_non_finite_values_are_counted_and_fail():
    ref = np.ones(5, dtype=np.float32)
    cand = ref.copy()
    cand[1] = np.nan
    cand[3] = np.inf
    s = compare_arrays(cand, ref)
    assert s.nonfinite_candidate == 2 and s.nonfinite_reference == 0 and not s.finite
    assert math.isnan(s.cosine)
    why = Tolerance().failures(s)
    assert why and "non-finite values (candidate 2, reference 0)" in why[0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"y: shapes differ: candidate \[2, 3\] vs reference \[3, 2\]"):
        compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), name="y")


def test_zero_tensors_and_empty_tensors():
    z = np.zeros((3,), dtype=np.float32)
    s = compare_arrays(z, z)
    assert s.cosine == 1.0 and s.rel_l2 == 0.0
    s = compare_arrays(np.ones(3), z)
    assert s.cosine == 0.0 and s.rel_l2 == float("inf")
    e = compare_arrays(np.zeros((0, 4)), np.zeros((0, 4)))
    assert e.max_abs == 0.0 and e.cosine == 1.0


def test_tolerance_judges_cosine_and_rel_l2():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(1000)
    close = ref + 0.01 * rng.standard_normal(1000)
    far = ref + 0.5 * rng.standard_normal(1000)
    tol = Tolerance(min_cosine=0.999, max_rel_l2=0.05)
    assert tol.failures(compare_arrays(close, ref)) == []
    why = tol.failures(compare_arrays(far, ref))
    assert any(w.startswith("cosine") for w in why) and any(w.startswith("rel_l2") for w in why)
    assert Tolerance(min_cosine=None, max_rel_l2=None, max_abs=1e-9).failures(compare_arrays(close, ref))[0].startswith("max_abs")
    with pytest.raises(ValueError, match="min_cosine"):
        Tolerance(min_cosine=2.0).validate()
    with pytest.raises(ValueError, match="max_rel_l2"):
        Tolerance(max_rel_l2=-1).validate()


def test_reports_table_and_json():
    ref = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    cand = {"a": ref["a"] + 1e-6, "b": np.full(4, np.nan, dtype=np.float32)}
    r = compare_outputs("unet", cand, ref, Tolerance())
    assert not r.passed and r.failures["a"] == [] and r.failures["b"]
    missing = compare_outputs("vae_decoder", {}, {"images": np.ones(2)}, Tolerance())
    assert "candidate has no output 'images'" in missing.failures["images"][0]
    table = format_table([r, missing])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["component", "output", "shape"]
    assert any(line.startswith("unet") and "2x3" in line and line.rstrip().endswith("ok") for line in lines)
    assert any(line.startswith("unet") and " b " in line and "FAIL" in line for line in lines)
    assert "unet.b: non-finite values" in table
    doc = json.loads(reports_to_json([r], candidate="trt", reference="ort"))
    assert doc["candidate"] == "trt" and doc["components"][0]["passed"] is False
    outs = {o["name"]: o for o in doc["components"][0]["outputs"]}
    assert outs["a"]["shape"] == [2, 3] and outs["b"]["cosine"] == "nan" and outs["b"]["finite"] is False
