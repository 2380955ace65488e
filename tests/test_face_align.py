"""Five-point alignment: exact on synthetic landmarks, and equal to insightface's norm_crop on a real photo."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infiniteid.face import align

PHOTO = Path(__file__).parent / "data" / "faces" / "Tom_Hanks_54745.png"


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0, 1, 0, 0), (17, 2.3, 40, -5), (-35, 0.7, 120, 80), (180, 1.5, 300, 250)])
def test_transform_recovers_a_known_similarity(angle, scale, tx, ty):
    template = align.arcface_template(112)
    m = _similarity(angle, scale, tx, ty)
    landmarks = _apply(m, template)  # the face as it appears in an image
    est = align.alignment_matrix(landmarks, 112)  # image -> crop, the inverse of m
    np.testing.assert_allclose(_apply(est, landmarks), template, atol=1e-9)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(est, inv, atol=1e-9)


def test_least_squares_on_noisy_landmarks_is_a_pure_similarity():
    rng = np.random.default_rng(0)
    landmarks = _apply(_similarity(10, 3, 50, 60), align.arcface_template(112)) + rng.normal(0, 2, (5, 2))
    m = align.alignment_matrix(landmarks, 224)
    a = m[:, :2]
    # Rotation times scale: equal diagonal, opposite off-diagonal, no reflection.
    assert abs(a[0, 0] - a[1, 1]) < 1e-12 and abs(a[0, 1] + a[1, 0]) < 1e-12 and np.linalg.det(a) > 0


def test_mirrored_landmarks_are_not_reflected():
    landmarks = align.arcface_template(112) * np.array([-1.0, 1.0]) + np.array([200.0, 0.0])
    assert np.linalg.det(align.alignment_matrix(landmarks, 112)[:, :2]) > 0


def test_degenerate_landmarks():
    with pytest.raises(ValueError, match="degenerate"):
        align.alignment_matrix(np.ones((5, 2)), 112)
    with pytest.raises(ValueError, match="five"):
        align.alignment_matrix(np.ones((4, 2)), 112)
    with pytest.raises(ValueError, match="not finite"):
        align.alignment_matrix(np.full((5, 2), np.nan), 112)


@pytest.mark.parametrize("size", [112, 224])
def test_matches_insightface_norm_crop_on_a_real_photo(size):
    face_align = pytest.importorskip("insightface.utils.face_align")
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    # Put the aligned photo into a larger scene, rotated and scaled; the
    # landmarks move with it.
    m = _similarity(-23, 2.1, 60, 140)
    import cv2

    scene = cv2.warpAffine(photo, m, (420, 420), flags=cv2.INTER_LINEAR)  # the face fits inside
    landmarks = _apply(m, align.arcface_template(112)).astype(np.float32)
    ours = align.align_face(scene, landmarks, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-image's deprecated estimate() inside norm_crop
        theirs = face_align.norm_crop(scene, landmarks, image_size=size)
    assert ours.shape == theirs.shape == (size, size, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    # And the crop is the original photo again (up to two resamplings).
    back = np.asarray(Image.fromarray(ours).resize((112, 112), Image.BILINEAR)) if size != 112 else ours
    assert np.abs(back.astype(float) - photo.astype(float)).mean() < 5.0
