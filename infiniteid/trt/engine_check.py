"""Refuse engines that would not run, or would run the wrong model, before TensorRT sees them.

TensorRT itself answers a mismatched plan with ``None`` and a log line about
"serialization assertion" or "incompatible device". The runtime checks first,
from the sidecars (:mod:`.names`), and says what to do:

* another TensorRT version (a version-compatible plan may run on any newer
  TensorRT, a later major version included);
* another GPU (compute capability; the folder name also carries the GPU's name);
* another model: the ONNX file's sha256 in the manifest changed since the build
  (the bundle was re-exported);
* a plan file that is missing or has another size than the build wrote.

Every refusal ends with the ``infiniteid build`` command that rebuilds the
engines with the flags they were built with. Torch- and TensorRT-free.
"""
from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..bundle import Manifest
from ..runtime.backend import BackendError
from .names import (
    DeviceInfo,
    EngineError,
    EngineSidecar,
    describe_folder,
    engine_folder_name,
    list_engine_folders,
    plan_path,
    read_sidecar,
    sidecar_path,
    slug,
)


def component_digest(spec: Any) -> str:
    """What an engine is built from: the ONNX file's sha256, combined with its external weights' if any.

    An export whose weights live in ``<component>.onnx.data`` can change the
    weights without changing the ``.onnx`` file, so both count.
    """
    ext = getattr(spec, "external_sha256", None)
    if not ext:
        return spec.sha256
    return hashlib.sha256(f"{spec.sha256}+{ext}".encode()).hexdigest()


class EngineMismatch(BackendError):
    """Engines that cannot be used here; the message ends with the command that rebuilds them."""


@dataclass(frozen=True)
class Target:
    """Where engines are about to run: the GPU and the TensorRT library loaded."""

    device: DeviceInfo
    trt_version: str

    @property
    def folder_name(self) -> str:
        return engine_folder_name(self.device, self.trt_version)


def build_command(bundle: Any, flags: Optional[Mapping[str, Any]] = None) -> str:
    """The ``infiniteid build`` command line for ``flags`` (as stored in a sidecar's ``build``).
    Every value is shell-quoted: a sidecar is a file on disk, and its text is printed for a user
    to paste into a shell."""
    f = dict(flags or {})
    q = lambda v: shlex.quote(str(v))  # noqa: E731
    parts = ["infiniteid", "build", q(bundle)]
    if f.get("precision"):
        parts += ["--precision", q(f["precision"])]
    shapes = f.get("shapes", "static")
    parts += ["--shapes", q(shapes)]
    if shapes == "static":
        for key in ("height", "width", "images"):
            if f.get(key) is not None:
                parts += [f"--{key}", q(f[key])]
        if f.get("cfg") is False:
            parts.append("--no-cfg")
    if f.get("opt_level") is not None:
        parts += ["--opt-level", q(f["opt_level"])]
    if f.get("workspace_gb"):
        ws = f["workspace_gb"]
        parts += ["--workspace", f"{ws:g}" if isinstance(ws, (int, float)) else q(ws)]
    if f.get("timing_cache"):
        parts += ["--timing-cache", q(f["timing_cache"])]
    if f.get("version_compatible"):
        parts.append("--version-compatible")
    return " ".join(parts)


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def version_ok(built: str, running: str, version_compatible: bool) -> bool:
    """Same TensorRT version; or, for a version-compatible plan, a running TensorRT not older than the build.

    TensorRT documents version-compatible plans as loading on later TensorRT
    versions, across a major version too (10 -> 11): no major rule here, the
    deserialiser has the last word (and its refusal is reported with the
    rebuild command).
    """
    if built == running:
        return True
    if not version_compatible:
        return False
    return _version_tuple(running) >= _version_tuple(built)


def find_engine_folder(bundle: Path, target: Target, flags_hint: Optional[Mapping[str, Any]] = None) -> Path:
    """The bundle's engine folder for ``target``; if there is none, say which ones exist and how to build."""
    bundle = Path(bundle)
    folder = bundle / "engines" / target.folder_name
    if folder.is_dir():
        return folder
    compatible = _version_compatible_folder(bundle, target)
    if compatible is not None:
        return compatible
    others = [describe_folder(p) or p.name for p in list_engine_folders(bundle)]
    have = f"; the bundle has engines for: {', '.join(others)}" if others else "; the bundle has no engines yet"
    raise EngineMismatch(
        f"{bundle}: no TensorRT engines for this machine ({target.device.name}, sm {target.device.cc}, "
        f"TensorRT {target.trt_version}; expected folder engines/{target.folder_name}){have}. "
        f"Build them here with: {build_command(bundle, flags_hint)}"
    )


def _version_compatible_folder(bundle: Path, target: Target) -> Optional[Path]:
    """A folder for this GPU whose plans are version-compatible with this TensorRT (newest build first)."""
    prefix = f"{slug(target.device.name)}-sm{target.device.sm}-trt"
    found = []
    for p in list_engine_folders(bundle):
        if not p.name.startswith(prefix):
            continue
        sidecars = []
        for f in sorted(p.glob("*.json")):
            try:
                sidecars.append(read_sidecar(f))
            except EngineError:
                pass
        if sidecars and all(s.version_compatible and version_ok(s.tensorrt_version, target.trt_version, True)
                            for s in sidecars):
            found.append((_version_tuple(sidecars[0].tensorrt_version), p))
    return max(found)[1] if found else None


def check_sidecar(
    sidecar: EngineSidecar,
    component: str,
    onnx_sha256: str,
    target: Target,
    bundle: Path,
    folder: Path,
) -> List[str]:
    """Refuse a mismatched engine (raises :class:`EngineMismatch`); returns warnings worth printing."""
    where = sidecar_path(folder, component)
    fix = f"Rebuild with: {build_command(bundle, sidecar.build)}"
    if sidecar.component != component:
        raise EngineMismatch(f"{where}: describes component {sidecar.component!r}, not {component!r}. {fix}")
    if not version_ok(sidecar.tensorrt_version, target.trt_version, sidecar.version_compatible):
        raise EngineMismatch(
            f"{where}: the {component} engine was built with TensorRT {sidecar.tensorrt_version}, "
            f"this machine runs TensorRT {target.trt_version}; "
            + ("a version-compatible plan loads only on that TensorRT or a newer one. " if sidecar.version_compatible
               else "a plan only loads on the TensorRT version that built it. ")
            + fix
        )
    if sidecar.compute_capability != target.device.cc:
        raise EngineMismatch(
            f"{where}: the {component} engine was built for {sidecar.device} (compute capability "
            f"{sidecar.compute_capability}), this GPU is {target.device.name} ({target.device.cc}). {fix}"
        )
    if sidecar.onnx_sha256 != onnx_sha256:
        raise EngineMismatch(
            f"{where}: the {component} engine was built from another ONNX file (sha256 "
            f"{sidecar.onnx_sha256[:12]}..., the bundle now has {onnx_sha256[:12]}...): the bundle was "
            f"re-exported after the build. {fix}"
        )
    plan = plan_path(folder, component)
    if not plan.is_file():
        raise EngineMismatch(f"{plan}: engine file missing. {fix}")
    size = plan.stat().st_size
    if size != sidecar.plan_bytes:
        raise EngineMismatch(
            f"{plan}: has {size} bytes, the build wrote {sidecar.plan_bytes}: the file is damaged or "
            f"incomplete. {fix}"
        )
    warnings: List[str] = []
    if slug(sidecar.device) != slug(target.device.name):
        warnings.append(
            f"{where}: built on {sidecar.device}, running on {target.device.name} (same compute capability "
            f"{target.device.cc}); it will run, but tactics were tuned for the other GPU"
        )
    return warnings


def load_sidecars(
    bundle: Path,
    folder: Path,
    manifest: Manifest,
    components: Iterable[str],
    target: Target,
    extra_hashes: Optional[Mapping[str, str]] = None,
) -> Tuple[Dict[str, EngineSidecar], List[str]]:
    """Read and check the sidecar of every component (and of generated graphs in ``extra_hashes``).

    ``extra_hashes`` maps a generated graph's name (e.g. ``"step"``) to the hash
    it must have been built from.
    """
    bundle, folder = Path(bundle), Path(folder)
    expected: Dict[str, str] = {c: component_digest(manifest.components[c]) for c in components}
    expected.update(extra_hashes or {})
    out: Dict[str, EngineSidecar] = {}
    warnings: List[str] = []
    for comp, digest in expected.items():
        try:
            sc = read_sidecar(sidecar_path(folder, comp))
        except EngineError as e:
            hint = _any_flags(folder)
            raise EngineMismatch(f"{e}. Build the engines with: {build_command(bundle, hint)}") from None
        warnings += check_sidecar(sc, comp, digest, target, bundle, folder)
        out[comp] = sc
    return out, warnings


def _any_flags(folder: Path) -> Optional[Dict[str, Any]]:
    """Build flags of any readable sidecar in ``folder`` (to suggest the same build)."""
    for p in sorted(Path(folder).glob("*.json")):
        try:
            return read_sidecar(p).build
        except EngineError:
            continue
    return None
