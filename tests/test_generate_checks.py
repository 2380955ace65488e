"""``infiniteid generate``: mistakes about outputs and inputs are refused before any work,
and what it prints and records is complete (latency, absolute paths, face hashes)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from infiniteid.cli import main
from infiniteid.commands.demo import demo_face, tiny_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


@pytest.fixture(scope="module")
def face_models(tmp_path_factory) -> Path:
    from infiniteid.face import write_synthetic_face_models

    return write_synthetic_face_models(tmp_path_factory.mktemp("face-models"), seed=0)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("photo") / "face.png"
    demo_face().save(p)
    return p


def args(bundle_dir, photo, face_models, out, *extra):
    return ["generate", "--bundle", str(bundle_dir), "--face", str(photo), "--face-models", str(face_models),
            "--prompt", "a photo of a person", "--out", str(out), "--steps", "2", "--height", "64", "--width", "64",
            "--threads", "1", "--no-progress", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unwritable_outputs_refused_before_any_work(bundle_dir, photo, face_models, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    under_file = tmp_path / "file" / "sub" / "me.png"
    t0 = time.perf_counter()
    assert main(args(bundle_dir, photo, face_models, under_file)) == 1
    assert one_line(capsys) == (f"infiniteid generate: error: --out {under_file} cannot be written: "
                                f"{tmp_path / 'file'} is a file, not a folder")
    assert main(args(bundle_dir, photo, face_models, tmp_path / "ok.png", "--text-stream-out", str(under_file))) == 1
    assert "--text-stream-out" in one_line(capsys)
    assert time.perf_counter() - t0 < 5  # nothing was loaded or denoised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_text_stream_out_must_differ_from_out(bundle_dir, photo, face_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args(bundle_dir, photo, face_models, tmp_path / "me.png", "--text-stream-out", "me.png")) == 1
    assert one_line(capsys) == ("infiniteid generate: error: --text-stream-out must differ from --out "
                                "(one image would overwrite the other)")
    assert list(tmp_path.iterdir()) == []


def test_face_folder_is_named_a_folder(bundle_dir, face_models, tmp_path, capsys):
    assert main(args(bundle_dir, tmp_path, face_models, tmp_path / "me.png")) == 1
    assert one_line(capsys) == f"infiniteid generate: error: --face {tmp_path} is a folder; give an image file (a photo of the face)"
