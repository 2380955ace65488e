"""The insightface model folder: clear errors, and nothing is ever downloaded.

``no_network`` refuses (and records) every DNS lookup and socket connection
in this process, and ``home`` points ``~`` at an empty temporary folder, so a
test can assert that no download was attempted and no ``~/.insightface``
appeared.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("insightface", reason="the face front end needs insightface (pip install --no-deps insightface==2.1)")

import infiniteid.face.models as face_models  # noqa: E402
from infiniteid.face import (FaceDependencyError, FaceEmbedder, FaceModelsError, check_model_folder,  # noqa: E402
                             refuse_downloads, write_synthetic_face_models)
from infiniteid.face.synthetic import SYNTHETIC_DETECTOR, SYNTHETIC_RECOGNIZER  # noqa: E402

CPU = ["CPUExecutionProvider"]
PACK_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "det_10g.onnx", "w600k_r50.onnx")


class _Refused(list):
    """Network attempts seen during a test."""


@pytest.fixture
def no_network(monkeypatch):
    attempts = _Refused()

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(("getaddrinfo", host))
        raise OSError(f"network disabled in this test (lookup of {host})")

    def refuse_connect(self, address, *args, **kwargs):
        attempts.append(("connect", address))
        raise OSError(f"network disabled in this test (connect to {address})")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)
    return attempts


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert Path("~").expanduser() == home
    return home


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_face_models(tmp_path_factory.mktemp("synthetic"), seed=0)


def _names_every_pack_file(message: str):
    for name in PACK_FILES:
        assert name in message, (name, message)


def test_missing_folder_is_a_clear_error_and_downloads_nothing(tmp_path, home, no_network):
    folder = tmp_path / "models" / "antelopev2"
    with pytest.raises(FaceModelsError) as info:
        FaceEmbedder.from_folder(folder, providers=CPU)
    message = str(info.value)
    assert f"insightface model folder not found: {folder}" in message
    _names_every_pack_file(message)
    assert "never downloaded" in message
    assert no_network == []
    assert not (home / ".insightface").exists() and list(home.iterdir()) == []
    assert not folder.exists()


def test_insightface_alone_would_download(tmp_path, home, no_network):
    """Control for the harness: insightface's own FaceAnalysis, given a pack name
    that is not a folder, goes to the network (refused here)."""
    from insightface.app import FaceAnalysis

    with pytest.raises(Exception):
        FaceAnalysis(name="antelopev2", root=str(tmp_path / "root"), providers=CPU)
    assert no_network, "insightface was expected to try a download"


def test_guard_stops_insightface_download_path(tmp_path, home, no_network):
    """Even if insightface reached its download code, the guard refuses before any
    file or connection: the same call as above, inside ``refuse_downloads``."""
    from insightface.app import FaceAnalysis
    import insightface.app.face_analysis as fa

    original = fa.ensure_available
    with pytest.raises(FaceModelsError, match="never downloads models"):
        with refuse_downloads():
            FaceAnalysis(name="antelopev2", root=str(tmp_path / "root"), providers=CPU)
    assert no_network == []
    assert not (tmp_path / "root").exists() and not (home / ".insightface").exists()
    assert fa.ensure_available is original  # restored after the block


def test_folder_that_is_a_file(tmp_path):
    f = tmp_path / "antelopev2"
    f.write_text("")
    with pytest.raises(FaceModelsError, match="is a file, not a folder") as info:
        FaceEmbedder.from_folder(f, providers=CPU)
    _names_every_pack_file(str(info.value))


def test_empty_folder(tmp_path):
    with pytest.raises(FaceModelsError, match=r"no \.onnx model files in the insightface model folder") as info:
        FaceEmbedder.from_folder(tmp_path, providers=CPU)
    _names_every_pack_file(str(info.value))


def test_parent_folder_points_at_the_pack(tmp_path, synthetic):
    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "scrfd_10g_bnkps.onnx")
    with pytest.raises(FaceModelsError, match=r"subfolder\(s\) antelopev2 hold \.onnx files: give one of those"):
        FaceEmbedder.from_folder(tmp_path / "models", providers=CPU)


def test_incomplete_pack_without_recogniser(tmp_path, synthetic, no_network):
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "scrfd_10g_bnkps.onnx")
    (pack / "2d106det.onnx").write_bytes(b"auxiliary")
    with pytest.raises(FaceModelsError) as info:
        FaceEmbedder.from_folder(pack, providers=CPU)
    message = str(info.value)
    assert f"incomplete insightface model folder {pack}" in message
    assert "lacks an ArcFace recogniser (e.g. glintr100.onnx or w600k_r50.onnx)" in message
    assert no_network == []


def test_incomplete_pack_without_detector(tmp_path, synthetic):
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_RECOGNIZER, pack / "w600k_r50.onnx")
    with pytest.raises(FaceModelsError, match=r"lacks a face detector with landmarks .*det_10g\.onnx"):
        FaceEmbedder.from_folder(pack, providers=CPU)


def test_files_insightface_cannot_route(tmp_path, synthetic):
    """Names do not reveal the kinds; insightface's routing by shapes finds no detector."""
    pack = tmp_path / "custom"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_RECOGNIZER, pack / "a.onnx")
    shutil.copy(synthetic / SYNTHETIC_RECOGNIZER, pack / "b.onnx")
    with pytest.raises(FaceModelsError, match=r"recognised no face detector among a\.onnx, b\.onnx"):
        FaceEmbedder.from_folder(pack, providers=CPU)


def test_detector_without_recogniser_by_routing(tmp_path, synthetic):
    """Two files pass the name check, but both are detectors to insightface."""
    pack = tmp_path / "custom"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "a.onnx")
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "b.onnx")
    with pytest.raises(FaceModelsError, match=r"found no recognition model among a\.onnx, b\.onnx "
                                              r"\(recognised: a\.onnx = detection\)"):
        FaceEmbedder.from_folder(pack, providers=CPU)


def test_empty_and_damaged_model_files(tmp_path, synthetic):
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "scrfd_10g_bnkps.onnx")
    (pack / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(FaceModelsError, match=r"empty model file\(s\) glintr100\.onnx"):
        FaceEmbedder.from_folder(pack, providers=CPU)
    data = (synthetic / SYNTHETIC_RECOGNIZER).read_bytes()
    (pack / "glintr100.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(FaceModelsError, match=r"cannot load the insightface models in .*antelopev2 .*truncated"):
        FaceEmbedder.from_folder(pack, providers=CPU)


def test_a_real_pack_layout_loads(tmp_path, synthetic):
    """The synthetic models under antelopev2's file names, beside auxiliary models
    the front end does not use, load and route like a real pack."""
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    shutil.copy(synthetic / SYNTHETIC_DETECTOR, pack / "scrfd_10g_bnkps.onnx")
    shutil.copy(synthetic / SYNTHETIC_RECOGNIZER, pack / "glintr100.onnx")
    checked = check_model_folder(pack)
    assert checked.detectors == ("scrfd_10g_bnkps.onnx",) and checked.recognizers == ("glintr100.onnx",)
    fe = FaceEmbedder.from_folder(pack, providers=CPU)
    assert (fe.detector_file, fe.recognizer_file) == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")


def test_missing_insightface_is_a_clear_error(synthetic, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "insightface.app", None)
    with pytest.raises(FaceDependencyError, match=r"pip install --no-deps insightface==2\.1"):
        FaceEmbedder.from_folder(synthetic, providers=CPU)


def test_default_providers_end_with_cpu():
    providers = face_models.default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert set(providers) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}
