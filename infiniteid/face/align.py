"""Five-point face alignment to the ArcFace template (a similarity transform).

ArcFace recognisers are trained on 112x112 crops in which the eyes, the nose
tip and the mouth corners sit at fixed template positions. A detected face is
brought there by the similarity transform (rotation, uniform scale,
translation; no shear) that maps its five landmarks onto the template in the
least-squares sense (Umeyama's closed form), then warped with OpenCV.

insightface does the same in ``insightface.utils.face_align.norm_crop``; this
module computes the transform in numpy itself so that one transform serves
both crops (112x112 for the recogniser, a larger one for CLIP) and so that the
project does not depend on a scikit-image API that is being deprecated. The
tests check the two against each other on a real photo.

Only numpy is imported at module level (the synthetic models reuse the
template without OpenCV); :func:`warp` imports cv2 when called.
"""
from __future__ import annotations

import numpy as np

#: Landmark order: left eye, right eye, nose tip, left and right mouth corner
#: (as seen in the image), in pixels of the 112x112 ArcFace crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

ARCFACE_SIZE = 112


def arcface_template(size: int) -> np.ndarray:
    """Template landmarks for a ``size`` x ``size`` crop with the 112 crop's framing.

    The 112 template scaled by ``size / 112``: the recogniser's crop at 112 and
    the CLIP crop at 224 (insightface's ``norm_crop(img, kps, 224)``) show the
    same part of the face.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return ARCFACE_TEMPLATE_112 * (size / float(ARCFACE_SIZE))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix ``M`` minimising ``sum |M [src;1] - dst|^2``.

    Umeyama (1991): centre both point sets, take the SVD of their
    cross-covariance, keep a proper rotation (no reflection), and read the
    scale off the singular values. Raises ``ValueError`` when ``src`` is
    degenerate (all points equal, or not finite).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks are not finite")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / n
    if src_var <= 1e-12:
        raise ValueError("landmarks are degenerate (all five points coincide)")
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    if np.linalg.matrix_rank(cov) == 1:
        # Collinear points: det(cov) is ~0 and says nothing; pick the sign
        # that makes the rotation proper.
        d[1] = 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 matrix that takes image pixels to a ``size`` x ``size`` aligned crop."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected five (x, y) landmarks, got shape {landmarks.shape}")
    return similarity_transform(landmarks, arcface_template(size))


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Apply a 2x3 matrix with bilinear sampling; outside the image is black."""
    import cv2

    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (int(size), int(size)),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Crop and align one face: ``image`` (H, W, C) uint8 -> (size, size, C) uint8."""
    return warp(image, alignment_matrix(landmarks, size), size)
