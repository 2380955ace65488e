"""The face front end: detect, align (ArcFace template) and embed a reference face.

Torch-free (numpy, OpenCV, onnxruntime, insightface), so the PyTorch reference
and the torch-free runtime share it. Model weights come from a local
insightface model folder only; see :mod:`.models` for how downloads are ruled
out and :mod:`.synthetic` for the stand-in models of tests and the demo.

``import infiniteid.face`` is cheap: insightface is imported when a
:class:`FaceEmbedder` is built.
"""
from .embedder import DetectedFace, FaceEmbedder, FaceResult, FaceSettings
from .errors import (FaceDependencyError, FaceError, FaceImageError, FaceModelsError, MultipleFacesWarning,
                     NoFaceError)
from .images import load_image
from .models import check_model_folder, refuse_downloads
from .synthetic import write_synthetic_face_models

__all__ = [
    "DetectedFace",
    "FaceDependencyError",
    "FaceEmbedder",
    "FaceError",
    "FaceImageError",
    "FaceModelsError",
    "FaceResult",
    "FaceSettings",
    "MultipleFacesWarning",
    "NoFaceError",
    "check_model_folder",
    "load_image",
    "refuse_downloads",
    "write_synthetic_face_models",
]
