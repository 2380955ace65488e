"""TensorRT on a real GPU: build the tiny bundle's engines, then compare them with onnxruntime.

Runs where the full TensorRT, cuda-python and an NVIDIA GPU exist (markers
``tensorrt`` and ``gpu``); skipped elsewhere with the reason printed (``-ra``).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from trt_testutil import tiny_bundle

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu, pytest.mark.slow]


def face(seed: int):
    from infiniteid.runtime.generator import FaceInput

    rng = np.random.default_rng(seed)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny fp32 bundle (a private copy) with static engines built for this GPU."""
    from infiniteid.cli import main

    src = tiny_bundle(tmp_path_factory, "fp32")
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(src, bundle)
    assert main(["build", str(bundle), "--no-progress"]) == 0
    return bundle


def test_build_writes_plans_sidecars_and_timing_cache(built, capsys):
    from infiniteid.cli import main
    from infiniteid.trt.names import list_engine_folders, read_sidecar

    [folder] = list_engine_folders(built)
    for name in ("text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder", "step_cfg"):
        sc = read_sidecar(folder / f"{name}.json")
        assert (folder / f"{name}.plan").stat().st_size == sc.plan_bytes > 0
        assert sc.build_seconds > 0 and sc.io
    assert (folder / "timing.cache").stat().st_size > 0
    assert main(["build", str(built), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("kept ") == 6  # up to date: nothing rebuilt


def test_every_component_matches_onnxruntime(built, capsys):
    from infiniteid.cli import main

    out = built / "parity.json"
    rc = main(["check", str(built), "--backend", "trt", "--against", "ort", "--json", str(out),
               "--min-cosine", "0.9999", "--max-rel-l2", "0.01"])
    assert rc == 0, capsys.readouterr()
    for c in json.loads(out.read_text())["components"]:
        assert c["passed"], c


def test_device_loop_matches_the_host_loop_on_onnxruntime(built):
    """Whole generations: TensorRT with guidance + step on the GPU vs onnxruntime with the host loop."""
    from infiniteid.generation import BatchSettings, GenerationRequest
    from infiniteid.runtime import Runtime

    reqs = [GenerationRequest("a photo of a person", faces=[face(1)], seed=3, guidance=5.0)]
    for scheduler in ("ddim", "euler", "dpmpp_2m"):
        settings = BatchSettings(height=128, width=128, steps=8, scheduler=scheduler)
        with Runtime(built, backend="ort") as ref, Runtime(built, backend="trt") as trt:
            a = trt.generate(reqs, settings, progress=False)
            b = ref.generate(reqs, settings, progress=False)
            assert trt.backend.describe()["cuda_graphs"]["unet"] is True  # static engine: replayed graphs
        rel = np.abs(a.latents - b.latents).max() / np.abs(b.latents).max()
        assert rel < 1e-3, (scheduler, rel)
        assert np.abs(a.arrays[0].astype(int) - b.arrays[0].astype(int)).max() <= 2


def test_cuda_graphs_and_host_loop_give_the_same_latents(built):
    from infiniteid.generation import BatchSettings, GenerationRequest
    from infiniteid.runtime import Runtime

    reqs = [GenerationRequest("a portrait", faces=[face(2)], seed=5)]
    settings = BatchSettings(height=128, width=128, steps=6)
    runs = []
    for opts in ({}, {"cuda_graphs": "never"}, {"device_loop": False}):
        with Runtime(built, backend="trt", **opts) as rt:
            runs.append(rt.generate(reqs, settings, progress=False).latents)
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(runs[0], runs[2], rtol=1e-4, atol=1e-4)


def test_reexported_bundle_is_refused(built, tmp_path):
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.trt_backend import TrtBackend
    from infiniteid.trt.engine_check import EngineMismatch

    copy = tmp_path / "b"
    shutil.copytree(built, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["components"]["unet"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatch, match="built from another ONNX file.*Rebuild with: infiniteid build"):
        TrtBackend(Bundle.load(copy))


def test_static_engine_refuses_other_shapes(built):
    from infiniteid.runtime.backend import BackendError
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.trt_backend import TrtBackend

    with TrtBackend(Bundle.load(built), components=["vae_decoder"]) as be:
        assert be.fixed_input_shapes("vae_decoder") == {"latent": (1, 4, 16, 16)}
        with pytest.raises(BackendError, match=r"outside what the engine was built for.*infiniteid build"):
            be.run("vae_decoder", {"latent": np.zeros((1, 4, 8, 8), np.float32)})


def test_dynamic_engines_take_other_resolutions(built, tmp_path):
    from infiniteid.cli import main
    from infiniteid.generation import BatchSettings, GenerationRequest
    from infiniteid.runtime import Runtime

    copy = tmp_path / "dyn"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("engines"))
    assert main(["build", str(copy), "--shapes", "dynamic", "--no-progress"]) == 0
    reqs = [GenerationRequest("a photo", faces=[face(3)], seed=1)]
    for h, w in ((96, 128), (128, 160)):
        settings = BatchSettings(height=h, width=w, steps=4)
        with Runtime(copy, backend="trt") as trt, Runtime(copy, backend="ort") as ref:
            a = trt.generate(reqs, settings, progress=False).latents
            b = ref.generate(reqs, settings, progress=False).latents
        assert a.shape == (2, 4, h // 8, w // 8)
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-3
