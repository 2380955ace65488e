"""``infiniteid check``: per-component parity, exercised here with onnxruntime on both sides.

An fp16 export of the tiny model is checked against its fp32 export (both on
onnxruntime), which gives real, non-zero fp16 errors; the TensorRT side is the
same code path with another backend object.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from trt_testutil import tiny_bundle

from infiniteid.cli import main
from infiniteid.commands.check import input_shapes, sample_feeds
from infiniteid.runtime.loader import Bundle

pytestmark = pytest.mark.slow  # exports the tiny model twice (about 25 s)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "fp16")


def test_fp16_bundle_against_fp32_bundle(fp16, fp32, tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "ort", "--bundle-b", str(fp32),
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "parity check passed" in text
    doc = json.loads(out.read_text())
    assert doc["candidate"]["bundle"] == str(fp16) and doc["reference"]["bundle"] == str(fp32)
    comps = {c["component"]: c for c in doc["components"]}
    assert sorted(comps) == ["id_encoder", "text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    for name in ("text_encoder", "text_encoder_2", "id_encoder", "unet"):
        for o in comps[name]["outputs"]:
            # fp16 graphs against fp32 ones: small but real errors
            assert 1e-5 < o["rel_l2"] < 1e-2, (name, o)
            assert o["cosine"] > 0.9999 and o["finite"]
    [vae] = comps["vae_decoder"]["outputs"]
    assert vae["max_abs"] == 0.0  # the VAE stays fp32 in an fp16 export: identical graphs
    unet = comps["unet"]["outputs"][0]
    assert unet["shape"] == [4, 4, 16, 16]  # default resolution 128x128, CFG, one image


def test_strict_tolerance_fails_with_its_own_exit_status(fp16, fp32, capsys):
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "ort", "--bundle-b", str(fp32),
               "--components", "unet", "--min-cosine", "1.0", "--max-rel-l2", "1e-7"])
    cap = capsys.readouterr()
    assert rc == 3  # TOLERANCE_FAILED; usage errors exit 1
    assert "FAIL" in cap.out and "unet.noise_pred: cosine" in cap.out and "rel_l2" in cap.out
    assert "parity check FAILED for: unet" in cap.err


def test_argument_errors_are_one_line(fp32, capsys):
    cases = [
        (["--backend", "ort", "--against", "ort"], "comparing backend 'ort' with itself on one bundle shows nothing"),
        (["--backend", "tvm"], "unknown backend 'tvm'; choose from ort, trt"),
        (["--backend", "ort", "--against", "trt", "--components", "unet", "vea"], "unknown component(s) vea"),
        (["--backend", "ort", "--bundle-b", str(fp32) + "-nope"], "bundle folder not found"),
        (["--backend", "ort", "--against", "trt", "--min-cosine", "3"], "min_cosine must be in [-1, 1]"),
        (["--backend", "ort", "--against", "trt", "--height", "100"], "height=100 is not a multiple of 16"),
    ]
    for extra, msg in cases:
        rc = main(["check", str(fp32)] + extra)
        err = capsys.readouterr().err
        assert rc == 1, extra
        assert msg in err, (extra, err)
        assert "Traceback" not in err


def test_trt_side_without_a_gpu_is_a_clear_error(fp32, capsys):
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from infiniteid.trt.cuda import device_count

    if device_count() > 0:
        pytest.skip("this machine has a GPU")
    rc = main(["check", str(fp32), "--backend", "trt", "--against", "ort"])
    err = capsys.readouterr().err
    assert rc == 1
    assert ("needs TensorRT" in err) or ("needs an NVIDIA GPU and driver" in err), err


def test_sample_inputs_are_realistic_and_seeded(fp32):
    b = Bundle.load(fp32)
    shapes = input_shapes(b, "unet", 128, 128, 2)
    assert shapes["sample"] == (8, 4, 16, 16) and shapes["id_embeds"] == (4, 21, 64)
    feeds = sample_feeds(b, "unet", shapes, seed=3, height=128, width=128)
    assert feeds["timestep"].tolist() == [500.0]
    assert feeds["time_ids"][0].tolist() == [128, 128, 0, 0, 128, 128]
    np.testing.assert_array_equal(feeds["sample"], sample_feeds(b, "unet", shapes, seed=3)["sample"])
    assert not np.array_equal(feeds["sample"], sample_feeds(b, "unet", shapes, seed=4)["sample"])
    te = sample_feeds(b, "text_encoder", input_shapes(b, "text_encoder", 128, 128, 1), seed=0)
    ids = te["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    assert len(set(ids[0].tolist())) > 3  # a tokenised prompt, not padding only
    face = sample_feeds(b, "id_encoder", input_shapes(b, "id_encoder", 128, 128, 1))["face_embeds"]
    assert np.linalg.norm(face, axis=-1) == pytest.approx(1.0, rel=1e-5)
    fixed = {"latent": (1, 4, 8, 8)}
    assert input_shapes(b, "vae_decoder", 128, 128, 1, fixed) == fixed  # a static engine's own shapes win
