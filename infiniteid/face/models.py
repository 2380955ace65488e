"""The insightface model folder: check it, load it, and never download anything.

Users bring their own insightface model pack (the pretrained packs are for
non-commercial research only, and this project never fetches weights). Left
to itself, insightface's ``FaceAnalysis`` downloads a pack into
``~/.insightface`` whenever the name it is given is not an existing folder.
Three things keep that from ever happening here:

1. :func:`check_model_folder` inspects the folder and its ``.onnx`` files
   *before* insightface is involved, and turns a missing, empty or
   incomplete folder into a :class:`FaceModelsError` that says which files to
   put where.
2. ``FaceAnalysis`` gets the folder's absolute path as its ``name``;
   insightface uses an existing folder as it is and only downloads otherwise.
3. :func:`refuse_downloads` replaces insightface's download functions, for
   the duration of the construction, with one that raises; so even a folder
   deleted between the check and the construction cannot start a download.
"""
from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from .errors import FaceDependencyError, FaceModelsError

#: Known insightface packs: pack name -> (detector, recogniser) file names.
KNOWN_PACKS = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}

#: Files of a pack that the face front end does not use (landmarks beyond the
#: detector's five points, age and gender, face swapping).
AUXILIARY_MODELS = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")

#: The insightface task names the front end needs.
TASKS = ("detection", "recognition")

INSTALL_HINT = (
    "install it with: pip install --no-deps insightface==2.1 "
    "and make sure what it imports is present: onnxruntime-gpu, onnx, opencv-python-headless, "
    "scikit-image, scipy, requests, tqdm (--no-deps keeps insightface from pulling in "
    "onnxruntime and opencv-python next to onnxruntime-gpu and the headless OpenCV)"
)

_GUARD_LOCK = threading.RLock()


def folder_hint(folder: Path) -> str:
    """What a usable folder looks like; part of every model-folder error."""
    packs = "; ".join(f"{name}/ with {det} (detector) and {rec} (recogniser)"
                      for name, (det, rec) in KNOWN_PACKS.items())
    return (
        f"Give the folder that directly contains an insightface detector with five-point "
        f"landmarks (det_*.onnx or scrfd_*.onnx) and an ArcFace recogniser, for example "
        f"{packs}. Copy the files into {folder} yourself: models are never downloaded."
    )


def _is_detector_name(name: str) -> bool:
    lower = name.lower()
    return lower.startswith("det_") or "scrfd" in lower or "retinaface" in lower


def _is_auxiliary_name(name: str) -> bool:
    lower = name.lower()
    return lower in AUXILIARY_MODELS or lower.startswith("inswapper")


@dataclass(frozen=True)
class ModelFolder:
    """An insightface model folder that passed :func:`check_model_folder`.

    ``detectors`` and ``recognizers`` are the ``.onnx`` file names that look
    like each kind by name (a recogniser candidate is any file that is neither
    a detector nor an auxiliary model); insightface's own routing by tensor
    shapes decides in the end.
    """

    path: Path
    onnx_files: Tuple[str, ...]
    detectors: Tuple[str, ...]
    recognizers: Tuple[str, ...]
    has_manifest: bool


def check_model_folder(folder) -> ModelFolder:
    """Check ``folder`` before any model is loaded; raise :class:`FaceModelsError` if unusable."""
    if folder is None or str(folder).strip() == "":
        raise FaceModelsError("no insightface model folder given. " + folder_hint(Path("<folder>")))
    path = Path(os.path.expanduser(str(folder))).absolute()
    if not path.exists():
        raise FaceModelsError(f"insightface model folder not found: {path}. " + folder_hint(path))
    if not path.is_dir():
        raise FaceModelsError(f"the insightface model folder is a file, not a folder: {path}. "
                              + folder_hint(path))
    has_manifest = (path / "manifest.json").is_file()
    onnx_files = tuple(sorted(p.name for p in path.glob("*.onnx") if p.is_file()))
    if not onnx_files and not has_manifest:
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.onnx")))
        where = (f" Its subfolder(s) {', '.join(inner)} hold .onnx files: give one of those "
                 f"(e.g. {path / inner[0]})." if inner else "")
        raise FaceModelsError(f"no .onnx model files in the insightface model folder {path}.{where} "
                              + folder_hint(path))
    empty = [n for n in onnx_files if (path / n).stat().st_size == 0]
    if empty:
        raise FaceModelsError(f"empty model file(s) {', '.join(empty)} in {path} (an interrupted copy?). "
                              "Copy them again. " + folder_hint(path))
    detectors = tuple(n for n in onnx_files if _is_detector_name(n))
    recognizers = tuple(n for n in onnx_files if not _is_detector_name(n) and not _is_auxiliary_name(n))
    if not has_manifest:
        missing = []
        if not detectors and len(recognizers) < 2:
            missing.append("a face detector with landmarks (det_*.onnx or scrfd_*.onnx, e.g. "
                           + " or ".join(det for det, _ in KNOWN_PACKS.values()) + ")")
        if not recognizers:
            missing.append("an ArcFace recogniser (e.g. "
                           + " or ".join(rec for _, rec in KNOWN_PACKS.values()) + ")")
        if missing:
            raise FaceModelsError(
                f"incomplete insightface model folder {path}: it has {', '.join(onnx_files)} "
                f"but lacks {' and '.join(missing)}. " + folder_hint(path))
    return ModelFolder(path=path, onnx_files=onnx_files, detectors=detectors,
                       recognizers=recognizers, has_manifest=has_manifest)


def default_providers() -> List[str]:
    """CUDA then CPU where this onnxruntime build has the CUDA provider *and* a GPU is present, else CPU.

    onnxruntime-gpu lists CUDA even on a machine without a GPU, and a session asked
    for it there prints red provider-load errors before falling back to the CPU;
    so the choice is :func:`infiniteid.devices.usable_providers`'s, as the
    runtime's onnxruntime backend makes it.
    """
    import onnxruntime

    from ..devices import usable_providers

    return usable_providers(onnxruntime.get_available_providers())


def _refuse(*args, **kwargs):
    what = " ".join(str(a) for a in args if isinstance(a, (str, os.PathLike)))
    raise FaceModelsError(
        f"insightface tried to download model files ({what or 'a model pack'}); this project never "
        "downloads models. " + folder_hint(Path("<folder>")))


#: (module, attribute) pairs through which insightface can reach the network.
_DOWNLOAD_FUNCTIONS = (
    ("insightface.app.face_analysis", "ensure_available"),
    ("insightface.model_zoo.model_zoo", "download_onnx"),
    ("insightface.utils.storage", "download"),
    ("insightface.utils.storage", "download_file"),
    ("insightface.utils.download", "download_file"),
)


@contextmanager
def refuse_downloads() -> Iterator[None]:
    """Within the block, every insightface download function raises :class:`FaceModelsError`.

    The functions are swapped back afterwards. A lock serialises the blocks,
    so concurrent model loads in one process do not undo each other's guard.
    """
    with _GUARD_LOCK:
        saved = []
        try:
            for module_name, attr in _DOWNLOAD_FUNCTIONS:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue
                if hasattr(module, attr):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, _refuse)
            yield
        finally:
            for module, attr, original in reversed(saved):
                setattr(module, attr, original)


def import_face_analysis():
    """``insightface.app.FaceAnalysis``, or a :class:`FaceDependencyError` saying how to install it."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError as exc:
        raise FaceDependencyError(f"the face front end needs insightface ({exc}); " + INSTALL_HINT) from None
    return FaceAnalysis


def load_face_analysis(folder: ModelFolder, *, providers: Optional[Sequence] = None,
                       det_size: Tuple[int, int] = (640, 640), det_thresh: float = 0.5):
    """Build and prepare insightface's ``FaceAnalysis`` on a checked folder.

    Only the detection and recognition models are kept. Any failure inside
    insightface or onnxruntime while loading (a truncated or foreign ``.onnx``
    file, for instance) becomes a :class:`FaceModelsError` that names the
    folder; the original error stays attached as ``__cause__``.
    """
    FaceAnalysis = import_face_analysis()
    providers = list(providers) if providers is not None else default_providers()
    try:
        with refuse_downloads():
            app = FaceAnalysis(name=str(folder.path), allowed_modules=list(TASKS), providers=providers)
            app.prepare(ctx_id=0, det_thresh=float(det_thresh), det_size=tuple(int(v) for v in det_size))
    except FaceModelsError:
        raise
    except AssertionError:  # insightface asserts that it found a detector
        raise FaceModelsError(
            f"incomplete insightface model folder {folder.path}: insightface recognised no face detector "
            f"among {', '.join(folder.onnx_files) or 'its files'}. " + folder_hint(folder.path)) from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad folder, said once
        raise FaceModelsError(
            f"cannot load the insightface models in {folder.path} "
            f"({type(exc).__name__}: {str(exc).strip() or 'no message'}). A file may be truncated or "
            "not an insightface model. " + folder_hint(folder.path)) from exc
    found = dict(app.models)
    missing = [t for t in TASKS if t not in found]
    if missing:
        routed = ", ".join(f"{Path(m.model_file).name} = {t}" for t, m in found.items()) or "none"
        raise FaceModelsError(
            f"incomplete insightface model folder {folder.path}: insightface found no "
            f"{' and no '.join(missing)} model among {', '.join(folder.onnx_files) or 'its files'} "
            f"(recognised: {routed}). " + folder_hint(folder.path))
    if not getattr(found["detection"], "use_kps", False):
        raise FaceModelsError(
            f"the detector {Path(found['detection'].model_file).name} in {folder.path} gives no five-point "
            "landmarks, which alignment needs; use a detector with keypoints such as "
            + " or ".join(det for det, _ in KNOWN_PACKS.values()) + ".")
    return app
