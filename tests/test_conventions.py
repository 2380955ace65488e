"""Images and conventions a new user meets: 16-bit faces, over-long prompts, ``--version``,
``check``'s exit statuses, the reference pipeline's defaults, the benchmark's ``--help``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infiniteid.face.images import load_image

PHOTO = Path(__file__).parent / "data" / "faces" / "Tom_Hanks_54745.png"
REPO = Path(__file__).resolve().parents[1]


# -- 16-bit images ----------------------------------------------------------------------
def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey8 = np.asarray(Image.open(PHOTO).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
    with Image.open(path) as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(load_image(path), np.repeat(grey8[:, :, None], 3, axis=2))


def test_sixteen_bit_face_is_found(tmp_path):
    pytest.importorskip("insightface", reason="the face front end needs insightface")
    from infiniteid.face import FaceEmbedder, write_synthetic_face_models

    grey8 = np.asarray(Image.open(PHOTO).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)
    face = FaceEmbedder.from_folder(write_synthetic_face_models(tmp_path / "models", seed=0),
                                    providers=["CPUExecutionProvider"])
    got = face.embed(path)  # was: an all-white image, "no face found"
    want = face.embed(np.repeat(grey8[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(got.embedding, want.embedding)


# -- prompts past 77 tokens -------------------------------------------------------------
LONG = " ".join(["a photo of a man in comic book style"] * 9) + " wearing a red hat"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from infiniteid.commands.demo import tiny_bundle

    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


def test_truncated_prompt_warns_with_the_dropped_part_runtime_and_reference(bundle_dir):
    from infiniteid.runtime import Runtime
    from infiniteid.tokenize import PromptTruncatedWarning

    rt = Runtime(bundle_dir, intra_op_threads=1)
    assert rt.tokenizer.dropped_text("a photo of a man") == ""
    with pytest.warns(PromptTruncatedWarning) as got:
        rt.encode_prompts(["a short one", LONG])
    assert [str(w.message) for w in got] == [
        "the prompt is longer than the text encoders' 77 tokens; this part was dropped: "
        "'a man in comic book style wearing a red hat'"]

    from infiniteid.model.pipeline import InfiniteIDPipeline

    with pytest.warns(PromptTruncatedWarning, match="this part was dropped: 'a man in comic book style wearing a red hat'"):
        InfiniteIDPipeline.tiny(0).encode_prompts([LONG])


def test_truncated_prompt_warning_on_the_command_line(bundle_dir, tmp_path, capsys):
    from infiniteid.cli import main
    from infiniteid.commands.demo import demo_face
    from infiniteid.face import write_synthetic_face_models

    demo_face().save(tmp_path / "face.png")
    models = write_synthetic_face_models(tmp_path / "models", seed=0)
    assert main(["generate", "--bundle", str(bundle_dir), "--face", str(tmp_path / "face.png"), "--face-models",
                 str(models), "--prompt", LONG, "--out", str(tmp_path / "o.png"), "--steps", "1", "--height", "64",
                 "--width", "64", "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["infiniteid generate: warning: the prompt is longer than the text encoders' 77 tokens; this part "
                   "was dropped: 'a man in comic book style wearing a red hat'"], err


# -- --version, check's defaults and exit statuses -----------------------------------------
def test_version_flag_and_attribute():
    import importlib.metadata

    import infiniteid

    p = subprocess.run([sys.executable, "-m", "infiniteid", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"infiniteid-rt {infiniteid.__version__}"
    assert infiniteid.__version__ == importlib.metadata.version("infiniteid-rt")  # setup.py reads it from the package


def test_check_backend_defaults_to_what_runs_here(bundle_dir, tmp_path, capsys):
    import shutil

    from infiniteid.cli import main
    from infiniteid.commands.check import TOLERANCE_FAILED
    from infiniteid.runtime.backend import default_backend
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.ort_backend import cuda_device_count

    assert TOLERANCE_FAILED == 3
    if cuda_device_count() == 0:
        assert default_backend(Bundle.load(bundle_dir)) == "ort"  # no GPU: was "trt", which cannot run here
    other = tmp_path / "copy"
    shutil.copytree(bundle_dir, other)
    rc = main(["check", str(bundle_dir), "--bundle-b", str(other), "--components", "text_encoder"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"candidate {default_backend(Bundle.load(bundle_dir))}:{bundle_dir}" in out and "parity check passed" in out
    if cuda_device_count() == 0:
        assert main(["check", str(bundle_dir)]) == 1
        assert capsys.readouterr().err.strip() == (
            "infiniteid check: error: comparing backend 'ort' (the default here: no GPU with TensorRT and engines) with "
            "itself on one bundle shows nothing; choose another --backend/--against or give a second bundle with --bundle-b")


# -- the reference pipeline: native size, PIL images like the runtime ------------------------
def test_reference_pipeline_defaults_to_native_size_and_returns_pil_like_the_runtime(bundle_dir):
    from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
    from infiniteid.runtime import Runtime

    rng = np.random.default_rng(0)
    e = rng.standard_normal(512).astype(np.float32)
    face = FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    pipe = InfiniteIDPipeline.tiny(0)
    assert (pipe.default_height, pipe.default_width) == (128, 128)  # the tiny U-Net's native size (was 1024)
    ref = pipe("a photo of a person", face, steps=1, seed=2, progress=False)
    rt = Runtime(bundle_dir, intra_op_threads=1)
    ours = rt("a photo of a person", face, steps=1, seed=2, progress=False)
    for out in (ref, ours):
        assert isinstance(out.images[0], Image.Image) and out.images[0].size == (128, 128)
        np.testing.assert_array_equal(np.asarray(out.images[0]), out.arrays[0])
    assert np.abs(ref.arrays[0].astype(int) - ours.arrays[0].astype(int)).max() <= 2  # and they agree


# -- benchmark scripts: --help runs and names only real options -------------------------------
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_help_mentions_only_real_options(script):
    import re

    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    defined = set(re.findall(r"^\s{2}(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", p.stdout, flags=re.M))
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", p.stdout))
    assert defined and mentioned - defined == set(), f"{script} --help mentions options it does not have"


# -- the face front end picks providers that can run here ---------------------------------------
def test_face_embedder_default_providers_load_quietly_without_a_gpu(tmp_path):
    pytest.importorskip("insightface", reason="the face front end needs insightface")
    from infiniteid.devices import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("this machine has a GPU: the CUDA provider is the right default here")
    code = ("import sys; from infiniteid.face import FaceEmbedder, write_synthetic_face_models\n"
            f"f = FaceEmbedder.from_folder(write_synthetic_face_models({str(tmp_path / 'models')!r}, seed=0))\n"
            f"r = f.embed({str(PHOTO)!r}); print(r.embedding.shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip() == "(512,)", p.stderr
    assert "CUDA" not in p.stderr and "Failed to load" not in p.stderr, p.stderr  # was: red provider-load errors


def test_a_closed_pipe_ends_quietly(bundle_dir, monkeypatch, capsys):
    """`infiniteid inspect B | head`: the reader closing the pipe ends the command quietly (141, as a shell
    reports SIGPIPE), not with a BrokenPipeError traceback."""
    import io

    from infiniteid.cli import main

    class ClosedPipe(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(bundle_dir)]) == 141
