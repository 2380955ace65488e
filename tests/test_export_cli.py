"""``infiniteid export`` in process, through ``infiniteid.cli.main``."""
from __future__ import annotations

import json
import os

import numpy as np

import pytest

from infiniteid.bundle import check_files, read_manifest
from infiniteid.cli import main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("infiniteid export: error: ")
    return err


@pytest.mark.slow
def test_export_tiny_writes_a_bundle(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["export", "--tiny", "--out", str(out), "--no-progress", "--max-batch", "2", "--no-adain"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    m = read_manifest(out)
    check_files(out, m, verify_hashes=True)
    assert m.max_images == 2 and m.components["unet"].options["adain"] is False
    assert m.components["unet"].options["mixed_attention"] is True
    assert os.listdir(tmp_path) == ["tiny"]

    # the same folder again: refused, and the bundle is left as it was
    before = (out / "manifest.json").read_bytes()
    assert main(["export", "--tiny", "--out", str(out), "--no-progress"]) == 1
    assert "already exists" in one_line_error(capsys)
    assert (out / "manifest.json").read_bytes() == before


def test_existing_folder_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--tiny", "--out", str(out)]) == 1
    assert "--overwrite" in one_line_error(capsys)
    assert main(["export", "--tiny", "--out", str(out), "--overwrite"]) == 1
    assert "is not a bundle" in one_line_error(capsys)
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--height", "100"], "height=100 is not a multiple of 16 (the VAE and U-Net downsampling need it); try 96 or 112"),
        (["--width", "8"], "width=8 is not a multiple of 16"),
        (["--height", "256", "--max-resolution", "192"], "height=256 is outside the supported range [64, 192]"),
        (["--max-batch", "0"], "max batch must be a positive integer"),
        (["--opset", "13"], "opset must be an integer in [17, 20]"),
    ],
)
def test_illegal_settings_give_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "b"
    assert main(["export", "--tiny", "--out", str(out), "--no-progress"] + flags) == 1
    assert message in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_real_export_needs_all_four_sources(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "b"), "--base", str(tmp_path)]) == 1
    err = one_line_error(capsys)
    assert "missing --image-encoder, --adapter, --face-models" in err and "--tiny" in err


def test_real_export_checks_paths_first(tmp_path, capsys):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "clip").mkdir()
    args = ["export", "--out", str(tmp_path / "b"), "--base", str(tmp_path / "sdxl"), "--image-encoder", str(tmp_path / "clip")]
    args += ["--adapter", str(tmp_path / "adapter.safetensors"), "--face-models", str(tmp_path / "faces")]
    assert main(args) == 1
    assert "--adapter: file not found" in one_line_error(capsys)


def test_tiny_refuses_real_sources(tmp_path, capsys):
    assert main(["export", "--tiny", "--base", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "--tiny exports the tiny model; drop --base" in one_line_error(capsys)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "infiniteid export --tiny --out out/tiny" in out and "--face-models" in out


@pytest.mark.slow
def test_export_from_real_weight_folders(tmp_path, capsys):
    """The real-weights path end to end, on the tiny model written in the SDXL folder layout.

    The face models are only referenced (path and sha256), never read, so placeholder
    files stand in for the insightface pack here.
    """
    import numpy as np

    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.model.weights_folder import save_weight_folders
    from infiniteid.tokenize import PromptTokenizer

    pipe = InfiniteIDPipeline.tiny(0)
    w = save_weight_folders(pipe.c, tmp_path / "weights")
    faces = tmp_path / "antelopev2"
    faces.mkdir()
    (faces / "scrfd_10g_bnkps.onnx").write_bytes(b"detector placeholder")
    (faces / "glintr100.onnx").write_bytes(b"arcface placeholder")
    out = tmp_path / "bundle"
    args = ["export", "--base", str(w.base), "--image-encoder", str(w.image_encoder), "--adapter", str(w.adapter)]
    args += ["--face-models", str(faces), "--out", str(out), "--no-progress", "--no-slim", "--precision", "fp16"]
    assert main(args) == 0, capsys.readouterr().err
    m = read_manifest(out)
    check_files(out, m, verify_hashes=True)
    assert m.face_models["path"] == str(faces) and set(m.face_models["files"]) == {"scrfd_10g_bnkps.onnx", "glintr100.onnx"}
    assert not list(out.rglob("*.onnx.*")) and not (out / "glintr100.onnx").exists()  # referenced, not copied
    assert "adapter/adapter.safetensors" in m.sources
    assert "base/unet/diffusion_pytorch_model.safetensors" in m.sources and "image_encoder/config.json" in m.sources
    assert m.model["kind"] == "tiny" and m.components["unet"].precision == "fp16"
    assert m.components["vae_decoder"].precision == "fp32"  # the VAE stays fp32 unless asked
    prompts = ["a photo of a man", ""]
    np.testing.assert_array_equal(PromptTokenizer.from_file(out / "tokenizer" / "tokenizer.json")(prompts), pipe.c.tokenizer(prompts))


def test_attention_plugin_bundle_runs_on_the_runtime_like_the_plain_one(tmp_path_factory, capsys):
    """``--attention-plugin``: the U-Net carries the custom node, onnxruntime runs it through
    its function body, and a generation matches the plain bundle within 1/255."""
    import onnx

    from infiniteid import generation as gen
    from infiniteid.runtime import FaceInput, Runtime
    from trt_testutil import tiny_bundle

    plain = tiny_bundle(tmp_path_factory)
    out = tmp_path_factory.mktemp("plugin") / "bundle"
    assert main(["export", "--tiny", "--attention-plugin", "--no-slim", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    unet = onnx.load(str(out / "onnx" / "unet.onnx"), load_external_data=False)
    assert sum(n.op_type == "MixedAttention" for n in unet.graph.node) > 0
    assert json.loads((out / "manifest.json").read_text())["components"]["unet"]["options"]["attention_plugin"] is True

    rng = np.random.default_rng(0)
    e = rng.standard_normal(512).astype(np.float32)
    face = FaceInput(e / np.linalg.norm(e), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    req = [gen.GenerationRequest("a photo of a man", faces=[face], seed=1)]
    settings = gen.BatchSettings(height=64, width=64, steps=3)
    a, b = (Runtime(x).generate(req, settings, progress=False).arrays[0].astype(int) for x in (out, plain))
    assert np.abs(a - b).max() <= 1
