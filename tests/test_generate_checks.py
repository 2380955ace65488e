"""``infiniteid generate``: mistakes about outputs and inputs are refused before any work,
and what it prints and records is complete (latency, absolute paths, face hashes)."""
from __future__ import annotations

import hashlib
import json
import time


from infiniteid.cli import main


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


def test_prints_latency_and_records_absolute_paths_and_face_hashes(bundle_dir, photo, face_models, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "face.png").write_bytes(photo.read_bytes())
    argv = args(bundle_dir, "face.png", face_models, "sub/me.png", "--text-stream-out", "sub/text.png")
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    import re

    assert re.fullmatch(r"wrote sub/me\.png \(64x64, 2 steps, \d+\.\d\d s: encode \d+\.\d\d s, denoise \d+\.\d\d s, "
                        r"decode \d+\.\d\d s\) and sub/me\.json", line), line
    side = json.loads((tmp_path / "sub" / "me.json").read_text())
    face = str(tmp_path / "face.png")
    assert side["request"]["faces"] == [face]
    assert side["faces"] == [{"path": face, "sha256": hashlib.sha256(photo.read_bytes()).hexdigest()}]
    assert side["outputs"] == {"image": str(tmp_path / "sub" / "me.png"), "text_stream": str(tmp_path / "sub" / "text.png")}
    assert side["arguments"]["face"] == [face] and side["arguments"]["out"] == str(tmp_path / "sub" / "me.png")
    assert side["source"]["face_models"] == str(face_models) and side["source"]["bundle"] == str(bundle_dir)
    assert side["source"]["seconds"] > 0


def test_missing_face_models_named_as_the_option(bundle_dir, photo, tmp_path, capsys):
    argv = ["generate", "--bundle", str(bundle_dir), "--face", str(photo), "--prompt", "p", "--out", str(tmp_path / "o.png")]
    assert main(argv) == 1
    err = one_line(capsys)
    assert err == ("infiniteid generate: error: no face model folder is known (the bundle references none): pass "
                   "--face-models DIR, an insightface folder with a detector and ArcFace, such as antelopev2")
    assert "face_models" not in err
