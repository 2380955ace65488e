"""The runtime's commands: ``infiniteid demo``, ``inspect`` and ``generate`` (bundle and reference paths)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infiniteid import generation as gen
from infiniteid.bundle import read_manifest
from infiniteid.cli import main
from infiniteid.commands.demo import BUNDLE_NAME, WORLD_PROMPT, demo_face, tiny_bundle
from infiniteid.contract import COMPONENTS


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "iid-cache"


@pytest.fixture(scope="session")
def bundle_dir(cache) -> Path:
    return tiny_bundle(cache, progress=False)


def test_demo_in_a_subprocess(bundle_dir, cache, tmp_path):
    assert bundle_dir == cache / BUNDLE_NAME
    env = dict(os.environ, INFINITEID_CACHE=str(cache))
    out = subprocess.run(
        [sys.executable, "-m", "infiniteid.cli", "demo", "--out", str(tmp_path / "demo"), "--model", "random",
         "--steps", "2", "--seed", "3"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout
    manifest = read_manifest(bundle_dir)
    with Image.open(tmp_path / "demo" / "demo.png") as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (manifest.resolution["default_width"], manifest.resolution["default_height"])
        assert np.asarray(im).std() > 1  # an image, not a blank
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert "RANDOM" in record["note"]
    assert record["settings"]["steps"] == 2 and record["request"]["seed"] == 3
    assert record["source"]["bundle"] == str(bundle_dir.resolve())
    assert record["source"]["backend"]["backend"] == "ort"
    assert "numpy" in record["versions"] and "onnxruntime" in record["versions"]


def test_world_demo_draws_the_prompts_scene_and_the_identity(cache, tmp_path):
    """The default demo: the shipped world model, exported once, on the runtime. Both streams draw
    the prompt's scene (read back by the world's own measurement); the image carries at least
    three more of the reference's six identity attributes than the same prompt without the
    identity (the text stream). Measured with this model: 6 of 6 against 2 of 6 (the bound
    leaves one attribute of slack for onnxruntime builds that round differently)."""
    from infiniteid.evaluation import world as W

    env = dict(os.environ, INFINITEID_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "infiniteid.cli", "demo", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "trained on the generated world" in out.stdout
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert record["settings"]["steps"] == 20 and record["request"]["prompt"] == WORLD_PROMPT
    assert Path(record["source"]["bundle"]).name.startswith("world-bundle-")
    sheet = np.asarray(Image.open(tmp_path / "demo" / "demo-sheet.png").convert("RGB"))
    assert sheet.shape == (128, 384, 3)
    reference, text, image = (W.measure(sheet[:, i * 128:(i + 1) * 128]) for i in range(3))
    assert W.measure(np.asarray(Image.open(tmp_path / "demo" / "demo.png").convert("RGB"))) == image
    assert reference == W.expected(W.Identity("dark", "round", "red", "long", "green", True), W.Scene("forest", "blue"))
    for stream in (text, image):
        assert (stream["background"], stream["clothing"], stream["lighting"]) == ("snow", "red", "sunset")
    hits = {name: sum(s[k] == reference[k] for k in W.IDENTITY_ATTRIBUTES) for name, s in (("text", text), ("id", image))}
    assert hits["id"] >= hits["text"] + 3, hits


def test_world_demo_user_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--face", str(tmp_path / "nope.png")]) == 1
    assert "--face: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "d"), "--model", "large"])
    assert e.value.code == 2 and "invalid choice: 'large'" in capsys.readouterr().err


def test_inspect(bundle_dir, capsys):
    assert main(["inspect", str(bundle_dir)]) == 0
    text = capsys.readouterr().out
    for name in COMPONENTS:
        assert name in text
    for word in ("precision", "fp32", "noise_pred", "(16, 4, 24, 24)", "tokenizer/tokenizer.json", "scheduler",
                 "scaled_linear", "onnxruntime", "engines    none", "adapter    kind infiniteid, face_tokens=4"):
        assert word in text, word
    assert main(["inspect", str(bundle_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"].keys() == set(COMPONENTS)


def _generate_args(bundle_dir, photo, face_models, out, *extra):
    return ["generate", "--bundle", str(bundle_dir), "--face", str(photo), "--face-models", str(face_models),
            "--prompt", "a photo of a person in comic book style", "--out", str(out), "--steps", "3",
            "--height", "64", "--width", "96", "--seed", "4", "--threads", "1", "--no-progress", *extra]


def test_generate_bundle(bundle_dir, photo, face_models, tmp_path, capsys):
    out = tmp_path / "x" / "me.png"
    text = tmp_path / "x" / "text.png"
    rc = main(_generate_args(bundle_dir, photo, face_models, out, "--text-stream-out", str(text),
                             "--negative-prompt", "blurry", "--guidance", "4", "--id-scale", "0.8",
                             "--scheduler", "euler"))
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (96, 64)
        img = np.asarray(im)
    with Image.open(text) as im:
        assert im.size == (96, 64)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["request"] == {
        "prompt": "a photo of a person in comic book style", "faces": [str(photo)], "negative_prompt": "blurry",
        "id_scale": 0.8, "guidance": 4.0, "seed": 4, "identity": {"mode": "mix", "alpha": 0.5},
    }
    assert side["settings"]["scheduler"] == "euler" and side["settings"]["return_text_stream"] is True
    assert side["source"]["backend"]["intra_op_threads"] == 1
    assert side["outputs"] == {"image": str(out), "text_stream": str(text)}
    assert side["arguments"]["threads"] == 1

    # the same through the Python API gives the same pixels
    from infiniteid.runtime import Runtime

    rt = Runtime(bundle_dir, face_models=face_models, intra_op_threads=1)
    req = gen.GenerationRequest("a photo of a person in comic book style", faces=[str(photo)], negative_prompt="blurry",
                                guidance=4.0, id_scale=0.8, seed=4)
    api = rt.generate([req], gen.BatchSettings(height=64, width=96, steps=3, scheduler="euler"), progress=False)
    np.testing.assert_array_equal(api.arrays[0], img)


def test_generate_verifies_hashes_only_when_asked(bundle_dir, photo, face_models, tmp_path, capsys):
    """--verify-hashes is opt-in and prints what it read and how long it took."""
    files = sorted(p for p in (bundle_dir / "onnx").iterdir())
    assert main(_generate_args(bundle_dir, photo, face_models, tmp_path / "a.png", "--steps", "1")) == 0
    assert "verified the sha256" not in capsys.readouterr().err
    assert main(_generate_args(bundle_dir, photo, face_models, tmp_path / "b.png", "--steps", "1",
                               "--verify-hashes")) == 0
    err = capsys.readouterr().err
    gb = sum(f.stat().st_size for f in files) / 1e9
    assert f"verified the sha256 of {len(files)} files ({gb:.2f} GB) in " in err and " GB/s)" in err


def test_generate_two_faces_mix_identities(bundle_dir, photo, face_models, tmp_path):
    other = tmp_path / "other.png"
    demo_face(200).save(other)
    out = tmp_path / "mix.png"
    assert main(_generate_args(bundle_dir, photo, face_models, out, "--face", str(other))) == 0
    assert json.loads(out.with_suffix(".json").read_text())["request"]["faces"] == [str(photo), str(other)]


def test_generate_reference_path_matches_bundle(bundle_dir, photo, face_models, tmp_path):
    """``--base`` (PyTorch reference on real-layout weight folders) and ``--bundle`` agree within 2/255."""
    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.model.weights_folder import save_weight_folders

    w = save_weight_folders(InfiniteIDPipeline.tiny(seed=0).c, tmp_path / "weights")
    ref_png, rt_png = tmp_path / "ref.png", tmp_path / "rt.png"
    common = ["--face", str(photo), "--face-models", str(face_models), "--prompt", "a man in the snow",
              "--steps", "3", "--height", "64", "--width", "64", "--no-progress"]
    assert main(["generate", "--base", str(w.base), "--image-encoder", str(w.image_encoder), "--adapter", str(w.adapter),
                 "--out", str(ref_png), *common]) == 0
    assert main(["generate", "--bundle", str(bundle_dir), "--out", str(rt_png), *common]) == 0
    a = np.asarray(Image.open(ref_png)).astype(int)
    b = np.asarray(Image.open(rt_png)).astype(int)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 2
    side = json.loads(ref_png.with_suffix(".json").read_text())
    assert side["source"]["engine"] == "pytorch-reference" and side["source"]["device"] == "cpu"


# -- user mistakes: one line on stderr, exit code 1, no traceback ---------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"--steps": "0"}, "steps must be an integer in [1, 1000], got 0"),
        ({"--height": "70"}, "height=70 is not a multiple of 16"),
        ({"--height": "512"}, "height=512 is outside the supported range [64, 192]"),
        ({"--scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"--guidance": "0.5"}, "guidance must be a finite number >= 1"),
        ({"--threads": "0"}, "--threads must be a positive integer"),
        ({"--out": "{tmp}/x.jpg"}, "--out must be a .png file"),
        ({"--face": "{tmp}/nobody.png"}, "face image not found"),
        ({"--bundle": "{tmp}/no-bundle"}, "bundle folder not found"),
        ({"--face-models": "{tmp}"}, "{tmp}"),
        ({"--no-mixed-attention": None}, "exported with mixed attention on; re-export with it off"),
        ({"--adapter": "{tmp}/a.safetensors"}, "--adapter only applies with --base"),
    ],
)
def test_generate_user_errors(bundle_dir, photo, face_models, tmp_path, capsys, change, message):
    args = _generate_args(bundle_dir, photo, face_models, tmp_path / "out.png")
    for flag, value in change.items():
        value = value.format(tmp=tmp_path) if value else None
        if flag in args:
            i = args.index(flag)
            args[i + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("infiniteid generate: error: ")
    assert message.format(tmp=tmp_path) in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_generate_needs_a_face_model_folder(bundle_dir, photo, tmp_path, capsys):
    args = ["generate", "--bundle", str(bundle_dir), "--face", str(photo), "--prompt", "p", "--out", str(tmp_path / "o.png"),
            "--steps", "1", "--height", "64", "--width", "64", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no face model folder is known" in err and "--face-models" in err and err.strip().count("\n") == 0


def test_reference_path_argument_errors(photo, tmp_path, capsys):
    base = ["generate", "--face", str(photo), "--prompt", "p", "--out", str(tmp_path / "o.png")]
    assert main(base + ["--base", str(tmp_path)]) == 1
    assert "--base needs --image-encoder DIR and --adapter FILE" in capsys.readouterr().err
    assert main(base + ["--base", str(tmp_path), "--image-encoder", str(tmp_path), "--adapter", str(tmp_path / "a")]) == 1
    assert "--base needs --face-models DIR" in capsys.readouterr().err
    assert main(base + ["--base", str(tmp_path / "nope"), "--image-encoder", str(tmp_path), "--adapter", str(tmp_path / "a"),
                        "--face-models", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "SDXL base folder not found" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--face", "f.png", "--prompt", "p", "--out", "o.png"], "one of the arguments --bundle --base is required"),
        (["generate", "--bundle", "b", "--base", "d", "--face", "f.png", "--prompt", "p", "--out", "o.png"],
         "argument --base: not allowed with argument --bundle"),
        (["generate", "--bundle", "b", "--prompt", "p", "--out", "o.png"], "the following arguments are required: --face"),
        (["generate", "--bundle", "b", "--face", "f", "--prompt", "p", "--out", "o.png", "--backend", "tf"], "invalid choice: 'tf'"),
        (["demo"], "the following arguments are required: --out"),
        (["inspect"], "the following arguments are required: bundle"),
    ],
)
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("infiniteid ")  # usage line, then the one-line error


def test_demo_and_inspect_user_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 1
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("infiniteid inspect: error: bundle folder not found") and err.strip().count("\n") == 0
