"""The face front end: a photo in, an ArcFace embedding and a CLIP crop out.

Steps of :meth:`FaceEmbedder.embed`:

1. decode the image to RGB uint8 and check its size (:mod:`.images`);
2. detect faces with five landmarks (insightface's SCRFD, through
   ``FaceAnalysis``); none is a :class:`NoFaceError`, several keep the largest
   and say so with a :class:`MultipleFacesWarning`;
3. align: the similarity transform that puts the landmarks on the ArcFace
   template (:mod:`.align`), warped to the recogniser's 112x112 input and,
   with the same framing, to a larger crop for the CLIP image encoder;
4. embed the 112x112 crop with the ArcFace recogniser and L2-normalise.

**The CLIP crop** is the ArcFace-template crop at ``clip_crop_size`` pixels
(224 by default), i.e. insightface's ``norm_crop(image, kps, 224)``: the face
tightly framed, eyes level, as IP-Adapter FaceID-PlusV2 feeds its CLIP
encoder. The pipeline then resizes it to the encoder's input size.

:meth:`FaceEmbedder.embed_aligned` skips steps 1-3 for a crop that is already
aligned to the template (square; resized to 112 if needed).

Torch-free: numpy, OpenCV, onnxruntime and insightface only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import align
from .errors import FaceError, FaceImageError, FaceModelsError, MultipleFacesWarning, NoFaceError
from .images import MIN_DETECT_SIDE, ImageLike, describe, load_image, rgb_to_bgr
from .models import check_model_folder, load_face_analysis

#: Smallest side (pixels) of a crop given to :meth:`FaceEmbedder.embed_aligned`.
MIN_ALIGNED_SIDE = 56


@dataclass(frozen=True)
class FaceSettings:
    """How the front end runs; :meth:`validate` rejects impossible values.

    ``det_size`` is the detector's input (width, height): the image is
    letterboxed into it, so faces smaller than about 1/40 of it are missed.
    ``det_thresh`` is the minimum detection score. ``clip_crop_size`` is the
    side of the aligned crop handed to CLIP. ``providers`` are onnxruntime
    execution providers (``None``: CUDA then CPU where a GPU is present, else
    the CPU only; :mod:`infiniteid.devices`).
    """

    det_size: Tuple[int, int] = (640, 640)
    det_thresh: float = 0.5
    clip_crop_size: int = 224
    providers: Optional[Tuple[Any, ...]] = None

    def validate(self) -> "FaceSettings":
        try:
            w, h = (int(v) for v in self.det_size)
        except (TypeError, ValueError):
            raise FaceError(f"det_size must be a (width, height) pair, got {self.det_size!r}") from None
        if w <= 0 or h <= 0 or w % 32 or h % 32:
            raise FaceError(f"det_size must be positive multiples of 32 (the detector's coarsest stride), "
                            f"got {self.det_size!r}")
        if not 0.0 < float(self.det_thresh) < 1.0:
            raise FaceError(f"det_thresh must be between 0 and 1, got {self.det_thresh!r}")
        if int(self.clip_crop_size) < 32:
            raise FaceError(f"clip_crop_size must be at least 32 pixels, got {self.clip_crop_size!r}")
        return self


@dataclass(frozen=True)
class DetectedFace:
    """One detection in image pixels: box (x0, y0, x1, y1), score, five landmarks (5, 2)."""

    bbox: np.ndarray
    score: float
    kps: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


@dataclass
class FaceResult:
    """What the front end gives the ID encoder for one face.

    ``embedding``: (512,) float32 ArcFace embedding, L2 norm 1.
    ``clip_crop``: (S, S, 3) uint8 RGB aligned crop for CLIP (S = ``clip_crop_size``).
    ``aligned``: (112, 112, 3) uint8 RGB crop the recogniser saw.
    ``bbox`` (4,) float32 and ``score``: the chosen detection in image pixels;
    ``kps`` (5, 2) float32 its landmarks; all three ``None`` for an already
    aligned input. ``num_faces``: how many faces the detector found.
    """

    embedding: np.ndarray
    clip_crop: np.ndarray
    aligned: np.ndarray
    bbox: Optional[np.ndarray] = None
    score: Optional[float] = None
    kps: Optional[np.ndarray] = None
    num_faces: int = 1


class FaceEmbedder:
    """Detect, align and embed faces with a local insightface model folder.

    Build it with :meth:`from_folder`; nothing is ever downloaded. One
    instance is safe to share between threads (onnxruntime sessions are).
    """

    def __init__(self, app: Any, folder: Path, settings: FaceSettings):
        self._app = app
        self.folder = Path(folder)
        self.settings = settings
        self._detector = app.models["detection"]
        self._recognizer = app.models["recognition"]
        size = tuple(int(v) for v in self._recognizer.input_size)
        if size != (align.ARCFACE_SIZE, align.ARCFACE_SIZE):
            raise FaceModelsError(f"the recogniser {self.recognizer_file} in {self.folder} takes {size[0]}x{size[1]} "
                                  f"input; an ArcFace recogniser takes the {align.ARCFACE_SIZE}x{align.ARCFACE_SIZE} "
                                  "aligned crop (glintr100.onnx, w600k_r50.onnx)")

    @classmethod
    def from_folder(cls, folder, *, providers: Optional[Sequence[Any]] = None,
                    det_size: Tuple[int, int] = (640, 640), det_thresh: float = 0.5,
                    clip_crop_size: int = 224) -> "FaceEmbedder":
        """Load the detector and the ArcFace recogniser from an insightface model folder.

        ``folder`` must directly contain the ``.onnx`` files (e.g. an
        ``antelopev2`` or ``buffalo_l`` folder). A missing or incomplete
        folder raises :class:`FaceModelsError` saying which files to put
        where; a missing insightface raises :class:`FaceDependencyError`.
        """
        settings = FaceSettings(det_size=tuple(det_size), det_thresh=det_thresh, clip_crop_size=clip_crop_size,
                                providers=None if providers is None else tuple(providers)).validate()
        checked = check_model_folder(folder)
        app = load_face_analysis(checked, providers=settings.providers, det_size=settings.det_size,
                                 det_thresh=settings.det_thresh)
        return cls(app, checked.path, settings)

    # -- facts for manifests and logs ---------------------------------------
    @property
    def detector_file(self) -> str:
        return Path(self._detector.model_file).name

    @property
    def recognizer_file(self) -> str:
        return Path(self._recognizer.model_file).name

    def describe(self) -> Dict[str, Any]:
        """Folder, chosen files and settings, JSON-ready (a bundle references the folder, never copies it)."""
        return {
            "folder": str(self.folder),
            "detector": self.detector_file,
            "recognizer": self.recognizer_file,
            "det_size": list(self.settings.det_size),
            "det_thresh": float(self.settings.det_thresh),
            "clip_crop_size": int(self.settings.clip_crop_size),
        }

    def __repr__(self) -> str:
        return (f"FaceEmbedder(folder={str(self.folder)!r}, detector={self.detector_file!r}, "
                f"recognizer={self.recognizer_file!r})")

    # -- the front end ----------------------------------------------------------
    def detect(self, image: ImageLike) -> List[DetectedFace]:
        """All faces in ``image``, largest first (empty list when there is none)."""
        return self._detect(load_image(image, min_side=MIN_DETECT_SIDE))

    def embed(self, image: ImageLike) -> FaceResult:
        """Embed the (largest) face in a photo: a path, a PIL image or an RGB uint8 array."""
        rgb = load_image(image, min_side=MIN_DETECT_SIDE)
        faces = self._detect(rgb)
        if not faces:
            h, w = rgb.shape[:2]
            raise NoFaceError(
                f"no face found in {describe(image)} ({w}x{h} pixels, detection threshold "
                f"{self.settings.det_thresh}); use a photo in which one face is clearly visible, "
                "roughly frontal and not too small")
        face = faces[0]
        if len(faces) > 1:
            x0, y0, x1, y1 = (float(v) for v in face.bbox)
            message = (f"{len(faces)} faces found in {describe(image)}; using the largest "
                       f"({x1 - x0:.0f}x{y1 - y0:.0f} pixels at x={x0:.0f}, y={y0:.0f}). "
                       "Crop the photo to one face to choose another.")
            warnings.warn(message, MultipleFacesWarning, stacklevel=2)
        aligned, clip_crop = self._align(rgb, face.kps)
        return FaceResult(embedding=self._embed_crop(aligned), clip_crop=clip_crop, aligned=aligned,
                          bbox=face.bbox, score=face.score, kps=face.kps, num_faces=len(faces))

    def embed_aligned(self, crop: ImageLike) -> FaceResult:
        """Embed a face crop already aligned to the ArcFace template (square, ideally 112x112 RGB)."""
        rgb = load_image(crop, min_side=MIN_ALIGNED_SIDE)
        h, w = rgb.shape[:2]
        if h != w:
            raise FaceImageError(
                f"an aligned face crop must be square (the ArcFace {align.ARCFACE_SIZE}x{align.ARCFACE_SIZE} "
                f"template), got {w}x{h} pixels from {describe(crop)}; pass the photo to embed() instead "
                "to detect and align the face")
        aligned = _resize(rgb, align.ARCFACE_SIZE)
        clip_crop = _resize(rgb, self.settings.clip_crop_size)
        return FaceResult(embedding=self._embed_crop(aligned), clip_crop=clip_crop, aligned=aligned)

    # -- steps ------------------------------------------------------------------
    def _detect(self, rgb: np.ndarray) -> List[DetectedFace]:
        bboxes, kpss = self._detector.detect(rgb_to_bgr(rgb), max_num=0)
        faces = [DetectedFace(bbox=np.asarray(b[:4], dtype=np.float32), score=float(b[4]),
                              kps=np.asarray(k, dtype=np.float32))
                 for b, k in zip(bboxes, kpss if kpss is not None else [None] * len(bboxes))
                 if k is not None]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _align(self, rgb: np.ndarray, kps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The 112x112 recogniser crop and the CLIP crop, both on the ArcFace template."""
        try:
            to_rec = align.alignment_matrix(kps, align.ARCFACE_SIZE)
            to_clip = align.alignment_matrix(kps, self.settings.clip_crop_size)
        except ValueError as exc:
            raise NoFaceError(f"the detected face cannot be aligned: {exc}") from None
        return (align.warp(rgb, to_rec, align.ARCFACE_SIZE),
                align.warp(rgb, to_clip, self.settings.clip_crop_size))

    def _embed_crop(self, aligned_rgb: np.ndarray) -> np.ndarray:
        # insightface's recogniser takes BGR and swaps to RGB itself.
        raw = np.asarray(self._recognizer.get_feat(rgb_to_bgr(aligned_rgb)), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(raw))
        if not np.isfinite(raw).all() or norm <= 1e-12:
            raise FaceModelsError(f"the recogniser {self.recognizer_file} returned an unusable embedding "
                                  f"(norm {norm}); check the model file")
        return (raw / norm).astype(np.float32)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square resize with OpenCV (area when shrinking, cubic when enlarging); no-op at the size."""
    import cv2

    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(rgb, (int(size), int(size)), interpolation=interp)
