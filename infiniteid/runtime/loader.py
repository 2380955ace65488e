"""Loading a bundle: the manifest, its files, and a check that they are usable.

:meth:`Bundle.load` is the runtime's only way in. It refuses, with a
:class:`~infiniteid.bundle.BundleError` that names the file and says what is
wrong, a bundle that

* has no or an unreadable ``manifest.json``, or one of a format version this
  runtime does not read;
* misses a component, a tokenizer or an ONNX / external-weights file;
* names a file outside its folder (``..``, an absolute path, a symlink pointing
  out), in the manifest or as an ONNX file's external-data location
  (:func:`~infiniteid.bundle.inside_bundle`; checked before anything is opened);
* names tensors that differ from the graph contract (:mod:`infiniteid.contract`);
* holds an ONNX file that is truncated or not an ONNX model at all (checked by
  walking the protobuf structure, :mod:`infiniteid.runtime.onnx_file`, so the
  user never sees an onnxruntime ``InvalidProtobuf`` traceback);
* (with ``verify_hashes``) holds a file whose sha256 differs from the manifest
  (:meth:`Bundle.verify_hashes` does it at any time and reports the cost).

Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tqdm.auto import tqdm

from ..bundle import (
    BundleError,
    ComponentSpec,
    HashReport,
    Manifest,
    check_files,
    face_models_recorded_here,
    hashed_files,
    inside_bundle,
    read_manifest,
    verify_hashes_of,
)
from ..contract import COMPONENTS, contracts
from .onnx_file import OnnxFileError, OnnxFileInfo, check_onnx_file


def _contract_names() -> Dict[str, Dict[str, List[str]]]:
    """Input and output names of every component (names do not depend on model widths)."""
    c = contracts(text_hidden=1, text_hidden_2=1, pooled_dim=1, cross_attention_dim=1, clip_image_size=1)
    return {k: {"inputs": [t.name for t in v.inputs], "outputs": [t.name for t in v.outputs]} for k, v in c.items()}


@dataclass
class Bundle:
    """A validated bundle folder and its manifest."""

    path: Path
    manifest: Manifest
    onnx: Dict[str, OnnxFileInfo]
    hashes: Optional[HashReport] = None  # what the load's hash verification read, when asked for

    @classmethod
    def load(cls, path: Union[str, Path], verify_hashes: bool = False) -> "Bundle":
        """Read and check ``path``; raises :class:`BundleError` naming the file and the problem."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        where = path / "manifest.json"
        hashes = check_files(path, manifest, verify_hashes=verify_hashes)
        names = _contract_names()
        for comp in COMPONENTS:
            spec = manifest.components[comp]
            for kind in ("inputs", "outputs"):
                have = [t.name for t in getattr(spec, kind)]
                want = names[comp][kind]
                if sorted(have) != sorted(want):
                    raise BundleError(
                        f"{where}: component {comp!r} declares {kind} {have}, the runtime expects {want}"
                    )
        onnx: Dict[str, OnnxFileInfo] = {}
        for comp in COMPONENTS:
            file = inside_bundle(path, manifest.components[comp].file, f"components.{comp}.file")
            try:
                onnx[comp] = check_onnx_file(file, root=path)
            except OnnxFileError as e:
                raise BundleError(f"{file}: ONNX file of component {comp!r} is unusable: it {e}") from None
            except OSError as e:
                raise BundleError(f"{file}: cannot read the ONNX file of component {comp!r}: {e}") from None
        return cls(path=path, manifest=manifest, onnx=onnx, hashes=hashes)

    def verify_hashes(self, engine_folder: Optional[Union[str, Path]] = None, progress: bool = False) -> HashReport:
        """Check every recorded sha256 now; returns what it cost (files, bytes, seconds).

        The manifest's hashes of the ONNX files and their external weights, and
        with ``engine_folder`` the hash each plan's sidecar records (plans built
        by older versions record none). A :class:`BundleError` names the first
        file that differs. Meant for a server at start-up (log the report);
        ``generate`` does it on ``--verify-hashes``. Costs one read of every file
        (about the disk's or sha256's speed, whichever is slower).
        """
        files = hashed_files(self.path, self.manifest)
        if engine_folder is not None:
            from ..trt.names import EngineError, check_engine_folder, plan_path, read_sidecar

            folder = Path(engine_folder).expanduser()
            if folder.resolve().is_relative_to(self.path.resolve()):
                folder = check_engine_folder(self.path, folder)
            for side in sorted(folder.glob("*.json")):
                try:
                    sc = read_sidecar(side)
                except EngineError:
                    continue  # not a sidecar; the backend refuses broken ones with its own message
                if sc.plan_sha256 and sc.component == side.stem:  # the plan next to it, never a name it gives
                    files.append((plan_path(folder, side.stem), sc.plan_sha256, "engine sidecar"))
        total = sum(p.stat().st_size for p, _, _ in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="verifying hashes", disable=not progress,
                  leave=False) as bar:
            return verify_hashes_of(files, on_bytes=bar.update)

    # -- what is inside --------------------------------------------------------
    def component(self, name: str) -> ComponentSpec:
        try:
            return self.manifest.components[name]
        except KeyError:
            raise BundleError(f"{self.path}: the bundle has no component {name!r}") from None

    def onnx_path(self, name: str) -> Path:
        return inside_bundle(self.path, self.component(name).file, f"components.{name}.file")

    def tokenizer_paths(self) -> List[Path]:
        return [inside_bundle(self.path, rel, f"tokenizers[{i}]") for i, rel in enumerate(self.manifest.tokenizers)]

    @property
    def model(self) -> Dict[str, Any]:
        return self.manifest.model

    def face_models_folder(self, trust: bool = False) -> Optional[Path]:
        """The face model folder the manifest references (the user's, never copied), if any.

        It lies outside the bundle, so it is followed only when an export on this
        machine recorded it (:func:`~infiniteid.bundle.face_models_recorded_here`)
        or with ``trust``; otherwise a :class:`BundleError` says to pass the folder.
        """
        fm = self.manifest.face_models
        if not fm:
            return None
        where = self.path / "manifest.json"
        raw = fm.get("path") if isinstance(fm, dict) else None
        if not isinstance(raw, str) or not raw:
            raise BundleError(f"{where}: face_models.path must be a folder path, got {raw!r}")
        p = Path(raw).expanduser()  # the export writes {"path": folder, "files": {name: sha256}, "recorded_here": tag}
        if not p.is_absolute():  # a relative folder is taken inside the bundle, and must stay there
            return inside_bundle(self.path, raw, "face_models.path")
        if not trust and not face_models_recorded_here(fm):
            raise BundleError(
                f"{where}: face_models.path = {raw!r} is a folder outside the bundle that was not recorded by an "
                f"export on this machine, so it is not followed; pass the face model folder yourself "
                f"(--face-models DIR, face_models=...), or trust_face_models=True to use this one"
            )
        return p

    def face_models_recorded_here(self) -> bool:
        """The manifest's face-model folder was recorded by an export on this machine."""
        return face_models_recorded_here(self.manifest.face_models)

    def engine_dirs(self) -> List[Path]:
        """``engines/<gpu>-...-trt<ver>/`` folders present in the bundle (built on target machines).

        Each folder and every file in it must resolve inside the bundle (a :class:`BundleError` otherwise).
        """
        from ..trt.names import list_engine_folders  # torch- and TensorRT-free

        return list_engine_folders(self.path)

    def unet_option(self, key: str, default: Any = None) -> Any:
        """An export option baked into the U-Net graph (e.g. which ablation switches it allows)."""
        return self.component("unet").options.get(key, default)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, components={list(self.manifest.components)})"
