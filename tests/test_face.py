"""The face front end on a real photo through insightface's real code path.

The models are the synthetic insightface-shaped ones (seeded random ArcFace
weights, a scripted SCRFD-shaped detector, see ``infiniteid.face.synthetic``):
the numbers below are facts about the pipeline (shapes, norms, which face is
chosen, that alignment is exact), not about face recognition quality.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("insightface", reason="the face front end needs insightface (pip install --no-deps insightface==2.1)")

from infiniteid.face import (FaceEmbedder, FaceError, FaceImageError, FaceResult, MultipleFacesWarning,  # noqa: E402
                             NoFaceError, write_synthetic_face_models)

PHOTO = Path(__file__).parent / "data" / "faces" / "Tom_Hanks_54745.png"
CPU = ["CPUExecutionProvider"]
REPO = Path(__file__).resolve().parents[1]


def _embedder(tmp_path_factory, name, **kwargs):
    folder = write_synthetic_face_models(tmp_path_factory.mktemp(name), **kwargs)
    return FaceEmbedder.from_folder(folder, providers=CPU)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """Default script: one face, the middle half of the frame."""
    return _embedder(tmp_path_factory, "faces_default", seed=0)


@pytest.fixture(scope="module")
def full_frame(tmp_path_factory):
    """The whole frame is the face: right for an already aligned 112x112 photo."""
    return _embedder(tmp_path_factory, "faces_full", seed=0, faces=[(0.5, 0.5, 1.0)])


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_result(r: FaceResult, clip_size=224):
    assert r.embedding.shape == (512,) and r.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(r.embedding)) - 1.0) < 1e-5
    assert r.aligned.shape == (112, 112, 3) and r.aligned.dtype == np.uint8
    assert r.clip_crop.shape == (clip_size, clip_size, 3) and r.clip_crop.dtype == np.uint8


def test_real_photo_gives_unit_512_embedding(embedder, photo):
    r = embedder.embed(PHOTO)
    _check_result(r)
    # The scripted box (middle half of the 640 frame) in this 112x112 photo's pixels.
    np.testing.assert_allclose(r.bbox, [28, 28, 84, 84], atol=1e-3)
    assert r.score > 0.99 and r.num_faces == 1
    assert r.kps.shape == (5, 2)
    # Path, PIL image and array give the same embedding.
    for same in (Image.open(PHOTO), photo):
        np.testing.assert_allclose(embedder.embed(same).embedding, r.embedding, atol=1e-6)


def test_embedding_is_deterministic_per_seed(tmp_path_factory, embedder, photo):
    again = _embedder(tmp_path_factory, "faces_seed0_again", seed=0)
    other = _embedder(tmp_path_factory, "faces_seed1", seed=1)
    e0 = embedder.embed_aligned(photo).embedding
    np.testing.assert_array_equal(again.embed_aligned(photo).embedding, e0)
    assert abs(_cos(other.embed_aligned(photo).embedding, e0)) < 0.5


def test_aligned_crop_path(embedder, photo):
    r = embedder.embed_aligned(photo)
    _check_result(r)
    assert r.bbox is None and r.score is None and r.kps is None
    np.testing.assert_array_equal(r.aligned, photo)  # already 112x112: used as is
    # A 224 version of the same crop embeds (nearly) the same.
    big = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BICUBIC))
    assert _cos(embedder.embed_aligned(big).embedding, r.embedding) > 0.99


def test_detect_then_align_reproduces_an_aligned_photo(full_frame, photo):
    """The photo is already on the ArcFace template; a full-frame detection with the
    template landmarks must align it onto itself: identical pixels, identical embedding."""
    detected = full_frame.embed(photo)
    direct = full_frame.embed_aligned(photo)
    np.testing.assert_allclose(detected.kps, [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                              [41.5493, 92.3655], [70.7299, 92.2041]], atol=1e-3)
    assert np.abs(detected.aligned.astype(int) - photo.astype(int)).max() <= 1
    assert _cos(detected.embedding, direct.embedding) > 0.9999
    # The CLIP crop has the 112 crop's framing at twice the size.
    small = np.asarray(Image.fromarray(detected.clip_crop).resize((112, 112), Image.BILINEAR))
    assert np.abs(small.astype(float) - photo.astype(float)).mean() < 3.0


def test_several_faces_use_the_largest_and_warn(tmp_path_factory, photo):
    # Two scripted faces on a 640x640 canvas: A (256 px) and B (192 px, a mirrored photo).
    multi = _embedder(tmp_path_factory, "faces_two", seed=0, faces=[(0.3, 0.3, 0.4), (0.75, 0.75, 0.3)])
    canvas = np.full((640, 640, 3), 128, np.uint8)
    canvas[64:320, 64:320] = np.asarray(Image.fromarray(photo).resize((256, 256), Image.BICUBIC))
    canvas[384:576, 384:576] = np.asarray(Image.fromarray(photo[:, ::-1]).resize((192, 192), Image.BICUBIC))
    with pytest.warns(MultipleFacesWarning, match=r"2 faces found.*largest \(256x256 pixels at x=64, y=64\)"):
        r = multi.embed(canvas)
    _check_result(r)
    assert r.num_faces == 2
    np.testing.assert_allclose(r.bbox, [64, 64, 320, 320], atol=1e-3)
    a = multi.embed_aligned(photo).embedding
    b = multi.embed_aligned(np.ascontiguousarray(photo[:, ::-1])).embedding
    assert _cos(r.embedding, a) > 0.95 > _cos(r.embedding, b)
    faces = multi.detect(canvas)
    assert [round(f.area) for f in faces] == [256 * 256, 192 * 192]


def test_single_face_does_not_warn(embedder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MultipleFacesWarning)
        embedder.embed(PHOTO)


def test_no_face(embedder, tmp_path_factory):
    blank = np.full((200, 200, 3), 127, np.uint8)  # no contrast: the detector reports nothing
    with pytest.raises(NoFaceError, match=r"no face found in the 200x200x3 array \(200x200 pixels"):
        embedder.embed(blank)
    assert embedder.detect(blank) == []
    never = _embedder(tmp_path_factory, "faces_none", seed=0, faces=[])
    with pytest.raises(NoFaceError, match="Tom_Hanks_54745.png"):
        never.embed(PHOTO)


def test_unreadable_files(embedder, tmp_path):
    text = tmp_path / "photo.jpg"
    text.write_text("this is not an image")
    with pytest.raises(FaceImageError, match=r"cannot read .*photo\.jpg: not an image format"):
        embedder.embed(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(PHOTO.read_bytes()[:400])
    with pytest.raises(FaceImageError, match=r"cut\.png: the file is damaged or truncated"):
        embedder.embed(truncated)
    with pytest.raises(FaceImageError, match="image file not found"):
        embedder.embed(tmp_path / "missing.png")
    with pytest.raises(FaceImageError, match="not an image file"):
        embedder.embed(tmp_path)


def test_bad_arrays_and_types(embedder, photo):
    with pytest.raises(FaceImageError, match="must be uint8"):
        embedder.embed(photo.astype(np.float32) / 255)
    with pytest.raises(FaceImageError, match=r"shaped \(H, W\)"):
        embedder.embed(np.zeros((2, 112, 112, 3), np.uint8))
    with pytest.raises(FaceImageError, match="unsupported image type list"):
        embedder.embed([[0, 0, 0]])
    # Grey and RGBA inputs are accepted.
    assert embedder.embed(photo.mean(axis=2).astype(np.uint8)).embedding.shape == (512,)
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(embedder.embed(rgba).embedding, embedder.embed(photo).embedding, atol=1e-6)


def test_tiny_images(embedder, photo):
    with pytest.raises(FaceImageError, match=r"is 40x30 pixels; at least 64 pixels"):
        embedder.embed(np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(FaceImageError, match="at least 56 pixels"):
        embedder.embed_aligned(photo[:40, :40])
    with pytest.raises(FaceImageError, match="must be square"):
        embedder.embed_aligned(photo[:, :100])


def test_settings_are_checked(tmp_path):
    folder = write_synthetic_face_models(tmp_path / "m")
    with pytest.raises(FaceError, match="multiples of 32"):
        FaceEmbedder.from_folder(folder, providers=CPU, det_size=(600, 600))
    with pytest.raises(FaceError, match="det_thresh"):
        FaceEmbedder.from_folder(folder, providers=CPU, det_thresh=1.5)


def test_clip_crop_size_and_describe(tmp_path):
    fe = FaceEmbedder.from_folder(write_synthetic_face_models(tmp_path / "m"), providers=CPU, clip_crop_size=336)
    _check_result(fe.embed(PHOTO), clip_size=336)
    d = fe.describe()
    assert d["detector"] == "synthetic_scrfd.onnx" and d["recognizer"] == "synthetic_arcface.onnx"
    assert d["clip_crop_size"] == 336 and d["folder"] == str((tmp_path / "m").absolute())


@pytest.mark.slow  # importing torch and diffusers dominates
def test_pipeline_uses_the_front_end(embedder):
    """The PyTorch reference calls ``face.embed(image).embedding / .clip_crop``."""
    pytest.importorskip("torch")
    from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline

    pipe = InfiniteIDPipeline.tiny(0, face=embedder)
    fi = pipe.face_input(PHOTO)
    assert isinstance(fi, FaceInput) and fi.embedding.shape == (512,) and fi.crop.shape == (224, 224, 3)
    assert pipe.encode_faces([PHOTO]).shape[0] == 1


def test_face_errors_are_cli_user_errors():
    from infiniteid.cli import _user_errors

    assert issubclass(NoFaceError, _user_errors())


def test_front_end_is_torch_free(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from infiniteid.face import FaceEmbedder, write_synthetic_face_models
        fe = FaceEmbedder.from_folder(write_synthetic_face_models({str(tmp_path / 'm')!r}),
                                      providers=["CPUExecutionProvider"])
        r = fe.embed({str(PHOTO)!r})
        assert r.embedding.shape == (512,)
        heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_synthetic_detector_follows_insightface_letterbox(tmp_path_factory, photo):
    """A portrait image fills the left half of the 640x640 frame: a scripted box on the
    padding finds nothing; the default box maps back to image pixels by the letterbox scale."""
    portrait = np.concatenate([photo, photo[::-1]], axis=0)  # 112 wide, 224 tall
    scale = 640 / 224
    on_padding = _embedder(tmp_path_factory, "faces_padding", seed=0, faces=[(0.75, 0.5, 0.3)])
    assert on_padding.detect(portrait) == []
    (face,) = _embedder(tmp_path_factory, "faces_portrait", seed=0).detect(portrait)
    np.testing.assert_allclose(face.bbox, np.array([160, 160, 480, 480]) / scale, atol=1e-3)


def test_synthetic_script_is_checked(tmp_path):
    with pytest.raises(ValueError, match="share the anchor cell"):
        write_synthetic_face_models(tmp_path / "a", faces=[(0.5, 0.5, 0.5), (0.51, 0.5, 0.2)])
    with pytest.raises(ValueError, match="fractions of the frame"):
        write_synthetic_face_models(tmp_path / "b", faces=[(1.5, 0.5, 0.5)])
