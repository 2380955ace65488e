"""``infiniteid selftest`` on this machine (no GPU): CPU steps pass, GPU steps are skipped with their reason.

The tiny bundle is exported once per test session (shared with the other CLI
tests); a copy with a damaged U-Net must fail with the component named.
"""
from __future__ import annotations

import json
import shutil

import pytest
from trt_testutil import tiny_bundle

from infiniteid.cli import main

pytestmark = pytest.mark.slow  # exports the tiny model once per session, runs it on onnxruntime

CPU_STEPS = ["environment", "bundle", "bundle: load, hashes", "onnxruntime CPU: text_encoder",
             "onnxruntime CPU: text_encoder_2", "onnxruntime CPU: id_encoder", "onnxruntime CPU: unet",
             "onnxruntime CPU: vae_decoder", "generate: onnxruntime CPU"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "fp32")


def no_gpu():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from infiniteid.trt.cuda import device_count

    if device_count() > 0:
        pytest.skip("this machine has a GPU: the GPU steps would run")


def test_cpu_machine_passes_with_every_gpu_step_skipped_and_why(fp32, tmp_path, capsys):
    no_gpu()
    report = tmp_path / "report.json"
    rc = main(["selftest", "--bundle", str(fp32), "--out", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "selftest passed" in out and "0 failed" in out
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and doc["format"] == 1
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]][:len(CPU_STEPS)] == CPU_STEPS
    for name in CPU_STEPS:
        assert steps[name]["status"] == "pass", steps[name]
        assert steps[name]["seconds"] >= 0
    assert steps["onnxruntime CPU: unet"]["versions"]["onnxruntime"]
    assert steps["onnxruntime CPU: unet"]["details"]["providers"] == ["CPUExecutionProvider"]
    assert steps["generate: onnxruntime CPU"]["details"]["image_shape"] == [128, 128, 3]
    gpu = [s for s in doc["steps"] if s["name"] not in CPU_STEPS]
    names = {s["name"] for s in gpu}
    for must in ("gpu: device", "onnxruntime CUDA: unet vs CPU", "triton kernel vs reference", "trt build static",
                 "trt build dynamic", "trt check vs onnxruntime (static)", "generate: trt static, host loop",
                 "generate: trt dynamic, device loop, graphs on", "polygraphy TrtRunner vs ours (dynamic)",
                 "plugin bundle: export, build, check, generate"):
        assert must in names, must
    for s in gpu:
        assert s["status"] == "skip" and s["reason"] == "GPU step: run with --gpu", s
    env = doc["environment"]
    assert env["python"] and env["onnxruntime"] and "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["gpu"]["usable"] is False and "no usable NVIDIA GPU" in env["gpu"]["reason"]
    assert "GPU step: run with --gpu" in out  # the table says why too


def test_a_broken_bundle_fails_naming_the_component_and_gpu_asked_without_a_gpu_fails(fp32, tmp_path, capsys):
    no_gpu()
    broken = tmp_path / "broken"
    shutil.copytree(fp32, broken)
    unet = broken / "onnx" / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the graph
    unet.write_bytes(bytes(data))
    report = tmp_path / "report.json"
    rc = main(["selftest", "--bundle", str(broken), "--gpu", "--out", str(report)])
    cap = capsys.readouterr()
    assert rc == 1
    doc = json.loads(report.read_text())
    assert doc["passed"] is False
    steps = {s["name"]: s for s in doc["steps"]}
    load = steps["bundle: load, hashes"]
    assert load["status"] == "fail" and "unet.onnx" in load["reason"], load
    assert steps["gpu: device"]["status"] == "fail"
    assert "--gpu asked, but no usable NVIDIA GPU" in steps["gpu: device"]["reason"]
    for name in CPU_STEPS[3:]:
        assert steps[name] == {**steps[name], "status": "skip", "reason": "needs bundle: load, hashes, which failed"}
    assert "selftest FAILED: bundle: load, hashes, gpu: device" in cap.err
    assert "Traceback" not in cap.err


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    rc = main(["selftest", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and f"--out must be a file, {tmp_path} is a folder" in err
    rc = main(["selftest", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    bundle = next(s for s in doc["steps"] if s["name"] == "bundle")
    assert bundle["status"] == "fail" and "not a bundle folder (no manifest.json)" in bundle["reason"]
    assert "Traceback" not in cap.err
