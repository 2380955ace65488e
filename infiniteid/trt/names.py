"""Where engines live in a bundle, and the JSON sidecar that says what each one is.

A TensorRT plan only runs on the TensorRT version and the GPU architecture it
was built with, so engines are kept per target::

    engines/<gpu-name>-sm<major><minor>-trt<version>/
        unet.plan        the serialised engine
        unet.json        its sidecar (:class:`EngineSidecar`)
        ...
        timing.cache     (optional) the builder's timing cache

The folder name is for people and for finding the right folder; the sidecar is
what the runtime checks before it trusts a plan (:mod:`.engine_check`). Every
file under ``engines/`` must resolve inside the bundle (:func:`check_engine_folder`). Files are
written atomically (temporary file in the same folder, then ``os.replace``), so
an interrupted build never leaves a half-written plan under the final name.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..bundle import ENGINES_DIR, inside_bundle

PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
TIMING_CACHE = "timing.cache"
SIDECAR_FORMAT = "infiniteid-engine"
SIDECAR_VERSION = 1

#: A profile: input name -> (min, opt, max) shapes.
Profile = Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]


class EngineError(ValueError):
    """An engine folder or sidecar that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for: its marketing name and compute capability."""

    name: str
    compute_capability: Tuple[int, int]

    @property
    def sm(self) -> str:
        """``"90"`` for compute capability 9.0, ``"120"`` for 12.0."""
        major, minor = self.compute_capability
        return f"{major}{minor}"

    @property
    def cc(self) -> str:
        """``"9.0"``."""
        return "{}.{}".format(*self.compute_capability)


def slug(text: str) -> str:
    """A folder-safe lower-case form: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"[^a-z0-9.]+", "-", text.strip().lower()).strip("-.")
    return s or "unknown-gpu"


def engine_folder_name(device: DeviceInfo, trt_version: str) -> str:
    """``<gpu-name>-sm<cc>-trt<version>``, e.g. ``nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106``."""
    if not re.fullmatch(r"[0-9]+(\.[0-9A-Za-z]+)*", trt_version or ""):
        raise EngineError(f"not a TensorRT version string: {trt_version!r}")
    return f"{slug(device.name)}-sm{device.sm}-trt{trt_version}"


def engine_folder(bundle: Union[str, Path], device: DeviceInfo, trt_version: str) -> Path:
    return Path(bundle) / ENGINES_DIR / engine_folder_name(device, trt_version)


def plan_path(folder: Path, component: str) -> Path:
    return Path(folder) / f"{component}{PLAN_SUFFIX}"


def sidecar_path(folder: Path, component: str) -> Path:
    return Path(folder) / f"{component}{SIDECAR_SUFFIX}"


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class EngineSidecar:
    """What one plan was built from and for. Written next to ``<component>.plan``.

    ``profiles`` holds one dict per optimisation profile, input name ->
    ``{"min": [...], "opt": [...], "max": [...]}``. ``build`` holds the build
    flags (precision, shapes, optimisation level, workspace...), enough to print
    the command that rebuilds the engine. ``onnx_sha256`` is the manifest's hash
    of the ONNX file the plan was built from (for generated graphs, such as the
    step graph, the hash of the generated model). ``plan_sha256`` and
    ``built_here`` let the runtime tell a plan built on this machine (which may
    then carry host code without ``--trust-engine-code``, :mod:`.trust`).
    """

    component: str
    plan: str
    plan_bytes: int
    tensorrt_version: str
    device: str
    compute_capability: str
    onnx_file: str
    onnx_sha256: str
    precision: str
    profiles: List[Dict[str, Dict[str, List[int]]]]
    build: Dict[str, Any]
    build_seconds: float
    created: str = field(default_factory=utc_now)
    io: List[Dict[str, Any]] = field(default_factory=list)  # name, mode, dtype as the engine reports them
    plan_sha256: str = ""  # of the plan file as written
    built_here: str = ""  # this machine's tag of plan_sha256 (:mod:`.trust`, :mod:`infiniteid.provenance`)
    format: str = SIDECAR_FORMAT
    format_version: int = SIDECAR_VERSION

    @property
    def version_compatible(self) -> bool:
        return bool(self.build.get("version_compatible", False))

    def static(self) -> bool:
        """Every input of every profile has min == max (shapes cannot change)."""
        return all(r["min"] == r["max"] for p in self.profiles for r in p.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "EngineSidecar":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
            raise EngineError(f"{where}: not an engine sidecar (format={d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("format_version") != SIDECAR_VERSION:
            raise EngineError(
                f"{where}: sidecar format version {d.get('format_version')!r} is not understood "
                f"(this runtime reads version {SIDECAR_VERSION})"
            )
        try:
            return cls(**d)
        except TypeError as e:
            raise EngineError(f"{where}: malformed sidecar ({e})") from None


def profiles_to_json(profiles: List[Profile]) -> List[Dict[str, Dict[str, List[int]]]]:
    return [
        {name: {"min": list(r[0]), "opt": list(r[1]), "max": list(r[2])} for name, r in p.items()}
        for p in profiles
    ]


def read_sidecar(path: Path) -> EngineSidecar:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: engine sidecar missing")
    return EngineSidecar.from_json(path.read_text(), str(path))


def write_atomic(path: Path, data: Union[bytes, bytearray, memoryview, str, Callable[[Any], None]]) -> None:
    """Write ``path`` so that it either has the full new content or is untouched.

    ``data`` is bytes-like, a str (written as UTF-8), or a function that writes
    into a binary file object (for large plans that should not be copied in
    memory). The temporary file lives in the same folder, so ``os.replace`` is an
    atomic rename on the same file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            elif isinstance(data, str):
                f.write(data.encode("utf-8"))
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_sidecar(folder: Path, sidecar: EngineSidecar) -> Path:
    path = sidecar_path(folder, sidecar.component)
    write_atomic(path, sidecar.to_json() + "\n")
    return path


def list_engine_folders(bundle: Union[str, Path]) -> List[Path]:
    """The bundle's engine folders, each checked by :func:`check_engine_folder`."""
    root = inside_bundle(bundle, ENGINES_DIR, ENGINES_DIR, where=bundle)
    if not root.is_dir():
        return []
    return sorted(check_engine_folder(bundle, p) for p in root.iterdir() if p.is_dir())


def check_engine_folder(bundle: Union[str, Path], folder: Path) -> Path:
    """``engines/<name>`` and every plan, sidecar and cache in it resolve inside the bundle.

    A :class:`~infiniteid.bundle.BundleError` names the first that does not (a
    symlink pointing out), before any of them is read. Returns the resolved folder.
    """
    rel = f"{ENGINES_DIR}/{Path(folder).name}"
    resolved = inside_bundle(bundle, rel, rel, where=bundle)
    if resolved.is_dir():
        for f in sorted(resolved.iterdir()):
            inside_bundle(bundle, f"{rel}/{f.name}", f"{rel}/{f.name}", where=bundle)
    return resolved


def describe_folder(folder: Path) -> Optional[str]:
    """A short description of an engine folder from any sidecar in it (None if it has none)."""
    for p in sorted(Path(folder).glob(f"*{SIDECAR_SUFFIX}")):
        try:
            s = read_sidecar(p)
        except EngineError:
            continue
        return f"{folder.name} (TensorRT {s.tensorrt_version}, {s.device}, sm {s.compute_capability})"
    return None
