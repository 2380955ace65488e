"""``infiniteid check``: per-component parity, exercised here with onnxruntime on both sides.

An fp16 export of the tiny model is checked against its fp32 export (both on
onnxruntime), which gives real, non-zero fp16 errors; the TensorRT side is the
same code path with another backend object.
"""
from __future__ import annotations

import json
from pathlib import Path

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


def test_strict_tolerance_fails_with_its_own_exit_status(fp16, fp32, capsys, tmp_path):
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "ort", "--bundle-b", str(fp32),
               "--components", "unet", "--min-cosine", "1.0", "--max-rel-l2", "1e-7",
               "--failures-dir", str(tmp_path / "fails")])
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


def _stats(doc) -> dict:
    return {(c["component"], o["name"]): o for c in doc["components"] for o in c["outputs"]}


def test_polygraphy_as_the_reference_gives_the_same_statistics_as_ort(fp16, fp32, tmp_path, capsys):
    """Polygraphy's OnnxrtRunner on the fp32 bundle reproduces our onnxruntime backend's reference side."""
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    docs = {}
    for against in ("ort", "polygraphy"):
        out = tmp_path / f"{against}.json"
        rc = main(["check", str(fp16), "--backend", "ort", "--against", against, "--bundle-b", str(fp32),
                   "--json", str(out)])
        text = capsys.readouterr().out
        assert rc == 0, text
        docs[against] = json.loads(out.read_text())
    assert "polygraphy's comparator agrees with these statistics" in text
    assert docs["polygraphy"]["reference"]["backend"] == "polygraphy-onnxrt"
    ours, theirs = _stats(docs["ort"]), _stats(docs["polygraphy"])
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    for key, a in ours.items():
        b = theirs[key]
        for stat in ("max_abs", "mean_abs", "rel_l2", "cosine", "reference_max_abs"):
            # the same graphs on the same onnxruntime: equal up to float rounding of reordered sums
            assert b[stat] == pytest.approx(a[stat], rel=1e-4, abs=1e-9), (key, stat)
    # Polygraphy's own comparator computed the absolute errors too, and agrees with ours
    second = docs["polygraphy"]["polygraphy_comparator"]
    for (comp, name), b in theirs.items():
        assert second[comp][name]["max_absdiff"] == pytest.approx(b["max_abs"], rel=1e-6, abs=1e-12)
        assert second[comp][name]["mean_absdiff"] == pytest.approx(b["mean_abs"], rel=1e-6, abs=1e-12)


def test_a_failing_check_writes_a_case_polygraphy_run_loads_back(fp16, fp32, tmp_path, capsys):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    import shutil
    import subprocess
    import sys

    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    fails = tmp_path / "fails"
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "polygraphy", "--bundle-b", str(fp32),
               "--components", "unet", "--max-rel-l2", "1e-7", "--failures-dir", str(fails)])
    err = capsys.readouterr().err
    assert rc == 3  # TOLERANCE_FAILED
    inputs_file, cand_file, ref_file = (fails / f"unet.{s}.json" for s in ("inputs", "ort.outputs", "polygraphy-onnxrt.outputs"))
    assert f"unet: inputs and outputs written to {inputs_file}" in err
    assert f"--load-inputs {inputs_file} --load-outputs {ref_file}" in err
    # the inputs, in the candidate graph's dtypes, exactly what the check fed
    [feed] = load_json(str(inputs_file))
    b16 = Bundle.load(fp16)
    shapes = input_shapes(b16, "unet", 128, 128, 1)
    want = sample_feeds(b16, "unet", shapes, 0, 128, 128)
    assert sorted(feed) == sorted(want)
    for n, t in ((t.name, t) for t in b16.component("unet").inputs):
        assert feed[n].dtype == np.dtype(t.dtype) and feed[n].shape == want[n].shape
        np.testing.assert_array_equal(feed[n], want[n].astype(t.dtype))
    cand, ref = RunResults.load(str(cand_file)), RunResults.load(str(ref_file))
    [(cand_name, [cand_it])], [(ref_name, [ref_it])] = list(cand.items()), list(ref.items())
    assert (cand_name, ref_name) == ("ort", "polygraphy-onnxrt")
    assert cand_it["noise_pred"].dtype == np.float16 and ref_it["noise_pred"].dtype == np.float32
    # Polygraphy's own CLI reruns the candidate graph on the saved inputs and matches the saved candidate outputs
    exe = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    res = subprocess.run([exe, "run", str(b16.onnx_path("unet")), "--onnxrt", "--load-inputs", str(inputs_file),
                          "--load-outputs", str(cand_file), "--atol", "0", "--rtol", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASSED" in res.stdout + res.stderr


def test_no_failure_files_when_asked_or_when_passing(fp16, fp32, tmp_path, capsys):
    fails = tmp_path / "fails"
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "ort", "--bundle-b", str(fp32),
               "--components", "vae_decoder", "--failures-dir", str(fails)])
    assert rc == 0 and not fails.exists()
    rc = main(["check", str(fp16), "--backend", "ort", "--against", "ort", "--bundle-b", str(fp32),
               "--components", "unet", "--max-rel-l2", "1e-7", "--failures-dir", str(fails), "--no-failure-files"])
    capsys.readouterr()
    assert rc == 3 and not fails.exists()  # TOLERANCE_FAILED
