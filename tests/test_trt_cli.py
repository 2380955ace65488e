"""``infiniteid build`` argument checks and messages, the TensorRT backend and benchmark without a GPU.

Everything here runs without TensorRT or a GPU: what is checked is that a user
gets a one-line answer saying what is wrong and what to do, before anything
reaches TensorRT (whose runtime crashes on a machine without a GPU).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from trt_testutil import tiny_bundle

from infiniteid.cli import build_parser, main

pytestmark = pytest.mark.slow  # exports the tiny model (about 12 s, shared with test_check_command)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "fp16")


def run_cli(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def test_help_has_examples():
    sub = build_parser()._subparsers._group_actions[0].choices
    text = sub["build"].format_help()
    for flag in ("--precision", "--shapes", "--opt-level", "--timing-cache", "--workspace", "--dry-run"):
        assert flag in text
    assert "infiniteid build bundle/ --precision fp16" in text
    assert "infiniteid check bundle/ --backend trt --against ort" in sub["check"].format_help()


def test_dry_run_prints_the_engines_and_profiles(fp32, capsys):
    rc, out, _ = run_cli(["build", str(fp32), "--dry-run"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["flags"]["shapes"] == "static" and doc["flags"]["height"] == 128  # the tiny model's default
    engines = {e["engine"]: e for e in doc["engines"]}
    assert list(engines) == ["text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder", "step_cfg"]
    assert engines["unet"]["profiles"][0]["sample"]["min"] == [4, 4, 16, 16]
    assert engines["unet"]["profiles"][0]["sample"]["max"] == [4, 4, 16, 16]
    assert engines["text_encoder"]["profiles"][0]["input_ids"]["max"][0] > 1  # encoders stay dynamic
    rc, out, _ = run_cli(["build", str(fp32), "--dry-run", "--shapes", "dynamic"], capsys)
    engines = {e["engine"]: e for e in json.loads(out)["engines"]}
    assert "step_nocfg" in engines
    assert engines["unet"]["profiles"][0]["sample"]["max"] == [16, 4, 24, 24]


def test_no_cfg_static_engines_take_half_the_batch(fp32, capsys):
    """``--no-cfg``: static engines for guidance-1 batches (two streams x one sample), the few-step fast path."""
    from infiniteid.trt.engine_check import build_command

    rc, out, _ = run_cli(["build", str(fp32), "--dry-run", "--no-cfg"], capsys)
    assert rc == 0
    doc = json.loads(out)
    engines = {e["engine"]: e for e in doc["engines"]}
    assert "step_nocfg" in engines and "step_cfg" not in engines
    assert engines["unet"]["profiles"][0]["sample"]["min"] == engines["unet"]["profiles"][0]["sample"]["max"] == [2, 4, 16, 16]
    assert doc["flags"]["cfg"] is False
    assert build_command("b", doc["flags"]).endswith("--images 1 --no-cfg --opt-level 3")


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "--precision fp16 asked, but the bundle's text_encoder, text_encoder_2, id_encoder, "
                              "unet ONNX is fp32"),
    (["--height", "100"], "height=100 is not a multiple of 16 (the VAE and U-Net downsampling need it); try 96 or 112"),
    (["--height", "256"], "unet input 'sample': shape [4, 4, 32, 16] is outside the range the bundle's export declares"),
    (["--opt-level", "9"], "--opt-level must be an integer from 0 to 5"),
    (["--workspace", "-1"], "--workspace must be a positive number of GiB"),
    (["--shapes", "dynamic", "--images", "2"], "--height/--width/--images choose the static shape"),
    (["--shapes", "dynamic", "--no-cfg"], "--no-cfg chooses the static shape; dynamic engines take batches with and without CFG"),
    (["--components", "unet", "vae"], "unknown component 'vae'"),
])
def test_build_argument_errors(fp32, capsys, args, message):
    rc, _, err = run_cli(["build", str(fp32)] + args, capsys)
    assert rc == 1
    assert err.startswith("infiniteid build: error: ")
    assert message in err


def test_fp16_build_message_says_how_to_export(fp32, capsys):
    _, _, err = run_cli(["build", str(fp32), "--precision", "fp16"], capsys)
    assert "export the bundle with --precision fp16" in err
    assert f"infiniteid build {fp32} --precision fp16" in err


def test_missing_bundle(tmp_path, capsys):
    rc, _, err = run_cli(["build", str(tmp_path / "nope")], capsys)
    assert rc == 1 and "bundle folder not found" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_says_what_to_install(fp16, capsys):
    rc, _, err = run_cli(["build", str(fp16), "--precision", "fp16"], capsys)
    assert rc == 1
    assert "building engines needs TensorRT (the full package, not only the lean runtime)" in err


def test_trt_backend_without_a_gpu_refuses_before_tensorrt(fp32):
    """With the lean runtime installed and no GPU the backend must stop before creating a TensorRT Runtime."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from infiniteid.runtime.backend import BackendError, make_backend
    from infiniteid.runtime.loader import Bundle
    from infiniteid.trt.cuda import device_count

    if device_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError) as e:
        make_backend("trt", Bundle.load(fp32))
    msg = str(e.value)
    assert ("needs TensorRT" in msg) or ("needs an NVIDIA GPU and driver; none is usable here" in msg)


def test_cuda_layer_without_a_gpu():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from infiniteid.runtime.backend import BackendError
    from infiniteid.trt import cuda

    if cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match=r"needs an NVIDIA GPU and driver; none is usable here \(cudaError"):
        cuda.require_device(0)
    with pytest.raises(BackendError, match=r"CUDA call cudaMalloc\(1024\) failed: cudaError"):
        cuda.DeviceBuffer(1024)
    with pytest.raises(BackendError, match="CUDA call cudaGetDeviceProperties failed"):
        cuda.device_info(0)


def test_trt_backend_rejects_bad_options(fp32):
    from infiniteid.runtime.backend import BackendError
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.trt_backend import TrtBackend

    with pytest.raises(BackendError, match="cuda_graphs must be one of auto, always, never"):
        TrtBackend(Bundle.load(fp32), cuda_graphs="sometimes")


def test_benchmark_script_arguments_and_no_gpu_exit(fp32):
    script = str(ROOT / "benchmarks" / "gpu_trt.py")
    r = subprocess.run([sys.executable, script, "--bundle", str(fp32), "--base", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs all of --base, --image-encoder and --adapter" in r.stderr
    r = subprocess.run([sys.executable, script, "--bundle", str(fp32), "--repeats", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--repeats must be >= 1" in r.stderr
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--e2e-repeats" in r.stdout
    if importlib.util.find_spec("cuda") is not None:
        from infiniteid.trt.cuda import device_count

        if device_count() == 0:
            r = subprocess.run([sys.executable, script, "--bundle", str(fp32)], capture_output=True, text=True)
            assert r.returncode == 2 and "gpu_trt: the TensorRT backend needs an NVIDIA GPU" in r.stderr
            assert "Traceback" not in r.stderr
