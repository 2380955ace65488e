"""The bundle: the one artefact that passes from export to runtime.

A bundle is a folder::

    manifest.json                  what is here (this module's Manifest)
    tokenizer/tokenizer.json       prompt tokenizers, padding and truncation set
    tokenizer_2/tokenizer.json
    onnx/<component>.onnx          one graph per component (+ <component>.onnx.data
                                   external weights past 2 GB)
    engines/<gpu>-sm<cc>-trt<ver>/ TensorRT plans built on the target machine

The manifest is versioned (:data:`FORMAT_VERSION`). A reader refuses a manifest
whose format or version it does not know, and every error names the file and
what is wrong (:class:`BundleError`). Torch-free: the runtime reads bundles.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .contract import COMPONENTS, Dim
from .manifest_schema import manifest_problem

FORMAT = "infiniteid-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
ENGINES_DIR = "engines"
TOKENIZER_FILES = ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json")
DTYPES = ("float32", "float16", "int64", "int32")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass
class TensorSpec:
    """One graph input or output.

    ``shape`` keeps symbolic dims as strings (see :mod:`infiniteid.contract`);
    ``min``/``opt``/``max`` are the concrete shape range the export declares,
    which the TensorRT build turns into an optimisation profile.
    """

    name: str
    dtype: str
    shape: List[Dim]
    min: List[int]
    opt: List[int]
    max: List[int]

    def validate(self, where: str) -> None:
        if self.dtype not in DTYPES:
            raise BundleError(f"{where}: tensor {self.name!r} has unknown dtype {self.dtype!r}")
        n = len(self.shape)
        if not (len(self.min) == len(self.opt) == len(self.max) == n):
            raise BundleError(f"{where}: tensor {self.name!r} has shape ranges of the wrong rank")
        for lo, mid, hi, d in zip(self.min, self.opt, self.max, self.shape):
            if not (1 <= lo <= mid <= hi):
                raise BundleError(f"{where}: tensor {self.name!r} has an invalid range {self.min}..{self.opt}..{self.max}")
            if isinstance(d, int) and not (lo == mid == hi == d):
                raise BundleError(f"{where}: tensor {self.name!r} fixes dim {d} but declares range {lo}..{hi}")


@dataclass
class ComponentSpec:
    """One ONNX graph of the bundle.

    ``size``/``external_size`` (bytes) let :func:`check_files` catch a truncated or
    replaced file without hashing gigabytes; ``0`` means "not recorded".
    ``options`` are the export options baked into the graph, e.g. the U-Net's
    ``mixed_attention``/``adain``/``max_identities`` and the VAE decoder's
    ``scaling_in_graph`` (its input is the raw final latent).
    """

    name: str
    file: str  # relative to the bundle, e.g. "onnx/unet.onnx"
    precision: str  # "fp32" | "fp16"
    sha256: str  # of the .onnx file
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    external_data: Optional[str] = None  # relative path of the weights file, e.g. "onnx/unet.onnx.data"
    options: Dict[str, Any] = field(default_factory=dict)  # export options baked in
    size: int = 0  # bytes of the .onnx file
    external_sha256: Optional[str] = None  # of the external weights file
    external_size: int = 0  # bytes of the external weights file

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"component {self.name!r} has no tensor {name!r}")


@dataclass
class Manifest:
    """Everything a runtime needs to know about a bundle.

    ``model`` (written by the export): ``kind`` ("sdxl" | "tiny" | "custom"), the widths
    ``text_hidden``, ``text_hidden_2``, ``pooled_dim``, ``cross_attention_dim``,
    ``latent_channels``, ``face_embed_dim``; ``clip_image`` (``size``, ``mean``,
    ``std``); token counts ``max_length`` (prompt) and ``id_tokens`` (one
    identity's ``c_id``); ``vae_scale_factor`` (pixels per latent side, 8) and
    ``vae_scaling_factor`` (latent scale, 0.13025 for SDXL); ``resolution_multiple``;
    ``force_zeros_for_empty_prompt``; ``id_encoder`` (the mapper config).
    ``resolution``: ``multiple``, ``min``, ``max``, ``default_height``, ``default_width``.
    ``sources``: source weight file (or ``state_dict/<module>`` for in-memory
    weights) -> sha256. ``face_models``: ``{"path": folder, "files": {name: sha256},
    "recorded_here": tag}``, the user's insightface folder, referenced and never
    copied; the runtime follows it only when the tag shows it was recorded by an
    export on the same machine (:func:`face_models_recorded_here`). ``loras``: the LoRAs
    fused into the graphs' weights at export, in order (``file``, ``sha256``,
    ``scale``, ``components``, ``layers``). ``scheduler_override``: the keys the
    export set over the base model's scheduler config (``scheduler_config`` is the
    result), e.g. ``{"timestep_spacing": "trailing"}`` for a few-step base; None when none.
    """

    components: Dict[str, ComponentSpec]
    model: Dict[str, Any]
    scheduler_config: Dict[str, Any]
    resolution: Dict[str, int]  # multiple, min, max, default_height, default_width
    max_images: int
    sources: Dict[str, str]  # source weights -> sha256
    tools: Dict[str, str]  # tool -> version
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = ""
    face_models: Optional[Dict[str, Any]] = None  # the user's insightface folder, referenced, never copied
    tokenizers: Tuple[str, ...] = TOKENIZER_FILES
    loras: List[Dict[str, Any]] = field(default_factory=list)  # fused LoRAs: file, sha256, scale, components, layers
    scheduler_override: Optional[Dict[str, Any]] = None  # keys the export set over the base's scheduler config

    # -- io ---------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: not an InfiniteID-RT bundle manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where}: manifest format version {d.get('format_version')!r} is not understood by this runtime "
                f"(it reads version {FORMAT_VERSION}); re-export the bundle with this version"
            )
        problem = manifest_problem(d, cls)
        if problem:
            raise BundleError(f"{where}: {problem}")
        try:
            comps = {
                k: ComponentSpec(
                    **{
                        **v,
                        "inputs": [TensorSpec(**t) for t in v["inputs"]],
                        "outputs": [TensorSpec(**t) for t in v["outputs"]],
                    }
                )
                for k, v in d["components"].items()
            }
            m = cls(**{**d, "components": comps, "tokenizers": tuple(d.get("tokenizers", TOKENIZER_FILES))})
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        m.validate(where)
        return m

    def validate(self, where: str = MANIFEST) -> None:
        missing = [c for c in COMPONENTS if c not in self.components]
        if missing:
            raise BundleError(f"{where}: components missing: {', '.join(missing)}")
        for name, c in self.components.items():
            if c.name != name:
                raise BundleError(f"{where}: component key {name!r} names {c.name!r}")
            if c.precision not in ("fp32", "fp16", "int8", "fp8"):
                raise BundleError(f"{where}: component {name!r} has unknown precision {c.precision!r}")
            for t in c.inputs + c.outputs:
                t.validate(f"{where}: {name}")
        if self.max_images < 1:
            raise BundleError(f"{where}: max_images must be >= 1")


# -- the face-model folder: a user path, followed only when recorded on this machine -----------
FACE_MODELS_KIND = "face-models"


def _face_models_fields(record: Dict[str, Any]) -> str:
    return json.dumps({"path": record.get("path"), "files": record.get("files")}, sort_keys=True)


def tag_face_models(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` (``{"path", "files"}``) with ``recorded_here``: this machine's tag (:mod:`.provenance`)."""
    from . import provenance

    return {**record, "recorded_here": provenance.tag(FACE_MODELS_KIND, _face_models_fields(record))}


def face_models_recorded_here(record: Optional[Dict[str, Any]]) -> bool:
    """The manifest's face-model record was written by an export on this machine (its tag verifies)."""
    from . import provenance

    if not isinstance(record, dict):
        return False
    return provenance.made_here(FACE_MODELS_KIND, _face_models_fields(record), record.get("recorded_here"))


def file_digest(path: Path, chunk: int = 1 << 20, on_bytes: Optional[Callable[[int], None]] = None) -> str:
    """sha256 of a file, streamed (ONNX files with external data are large); ``on_bytes(n)`` per chunk read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
            if on_bytes is not None:
                on_bytes(len(b))
    return h.hexdigest()


def read_manifest(bundle: Union[str, Path]) -> Manifest:
    """Parse and validate ``bundle/manifest.json`` (does not check the other files)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing; this folder is not a bundle (or its export did not finish)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(d, str(path))


def write_manifest(bundle: Union[str, Path], manifest: Manifest) -> Path:
    """Validate ``manifest`` and write it as ``bundle/manifest.json`` (the export's last file).

    Written to a temporary name and renamed, so a reader sees no manifest or a whole one.
    """
    path = Path(bundle) / MANIFEST
    manifest.validate(str(path))
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(path)
    return path


# -- containment: a bundle names files inside its own folder, nothing else ------------------
def inside_bundle(root: Union[str, Path], rel: Any, key: str, *, base: Optional[Path] = None,
                  where: Optional[Union[str, Path]] = None) -> Path:
    """The resolved path of ``rel`` if it lies inside the bundle folder ``root``; else a :class:`BundleError`.

    The one containment check for every path a bundle names: manifest entries
    (component files, external weights, tokenizers), the locations inside ONNX
    files, engine folders, plans and sidecars. ``rel`` is taken relative to
    ``base`` (default ``root``; an ONNX file's folder for its external data) and
    must be a relative path that, with every symlink followed, stays inside
    ``root``. Nothing is opened: only the path is resolved. ``key`` names the
    entry in the message (e.g. ``components.unet.file``); ``where`` is the file
    that names it (default ``root/manifest.json``).
    """
    root = Path(root).resolve()
    where = where if where is not None else root / MANIFEST
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise BundleError(f"{where}: {key} must be a path relative to the bundle folder, got {rel!r}")
    if Path(rel).is_absolute() or Path(rel).drive:
        raise BundleError(f"{where}: {key} is the absolute path {rel!r}; a bundle may only name files inside "
                          f"its own folder ({root}), so it is refused")
    full = (Path(base) if base is not None else root).resolve() / rel
    resolved = full.resolve()
    if not resolved.is_relative_to(root):
        named = key if key == rel else f"{key} = {rel!r}"
        raise BundleError(f"{where}: {named} resolves to {resolved}, outside the bundle folder {root} "
                          "(through '..' or a symlink); a bundle may only name files inside its folder, "
                          "so it is refused")
    return resolved


def _check_size(path: Path, recorded: int, what: str) -> None:
    if recorded and path.stat().st_size != recorded:
        raise BundleError(
            f"{path}: {what} has {path.stat().st_size} bytes, the manifest records {recorded}; "
            "the file is truncated or was replaced after export (re-export the bundle)"
        )


def manifest_paths(bundle: Union[str, Path], manifest: Manifest) -> Dict[str, Path]:
    """Manifest key -> resolved path of every file the manifest names, each checked by :func:`inside_bundle`.

    Keys: ``tokenizers[<i>]``, ``components.<name>.file``, ``components.<name>.external_data``.
    The manifest's face-model folder is not a bundle file (see the runtime's rule for it).
    """
    out: Dict[str, Path] = {}
    for i, rel in enumerate(manifest.tokenizers):
        out[f"tokenizers[{i}]"] = inside_bundle(bundle, rel, f"tokenizers[{i}]")
    for name, c in manifest.components.items():
        out[f"components.{name}.file"] = inside_bundle(bundle, c.file, f"components.{name}.file")
        if c.external_data:
            key = f"components.{name}.external_data"
            out[key] = inside_bundle(bundle, c.external_data, key)
    return out


def check_files(bundle: Union[str, Path], manifest: Manifest, verify_hashes: bool = False) -> Optional["HashReport"]:
    """Every file the manifest names exists with its recorded size (and, with ``verify_hashes``, hash:
    :func:`verify_file_hashes`, whose report is returned)."""
    bundle = Path(bundle)
    paths = manifest_paths(bundle, manifest)  # every path first: nothing outside the bundle is touched
    for i, rel in enumerate(manifest.tokenizers):
        if not paths[f"tokenizers[{i}]"].is_file():
            raise BundleError(f"{paths[f'tokenizers[{i}]']}: tokenizer file missing from the bundle")
    for c in manifest.components.values():
        p = paths[f"components.{c.name}.file"]
        if not p.is_file():
            raise BundleError(f"{p}: ONNX file of component {c.name!r} missing from the bundle")
        _check_size(p, c.size, f"the ONNX file of component {c.name!r}")
        data = paths.get(f"components.{c.name}.external_data")
        if data is not None:
            if not data.is_file():
                raise BundleError(f"{data}: external weights of component {c.name!r} missing")
            _check_size(data, c.external_size, f"the external weights of component {c.name!r}")
    return verify_file_hashes(bundle, manifest) if verify_hashes else None


# -- hashes: what verifying costs is reported, so a server can decide and say ---------------------
@dataclass
class HashReport:
    """What a hash verification read: files, bytes and wall time (all hashes matched)."""

    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def add(self, other: "HashReport") -> "HashReport":
        return HashReport(self.files + other.files, self.bytes + other.bytes, self.seconds + other.seconds)

    def __str__(self) -> str:
        return (f"verified the sha256 of {self.files} files ({self.bytes / 1e9:.2f} GB) in {self.seconds:.2f} s "
                f"({self.gb_per_s:.2f} GB/s)")


def verify_hashes_of(files: List[Tuple[Path, str, str]],
                     on_bytes: Optional[Callable[[int], None]] = None) -> HashReport:
    """Hash ``(path, expected sha256, where it is recorded)`` triples; a :class:`BundleError` names the first
    that differs."""
    t0 = time.perf_counter()
    total = 0
    for path, want, recorded_in in files:
        if file_digest(path, on_bytes=on_bytes) != want:
            raise BundleError(f"{path}: sha256 differs from the {recorded_in}; the file changed after it was "
                              "written (restore it, or re-export / rebuild)")
        total += path.stat().st_size
    return HashReport(files=len(files), bytes=total, seconds=time.perf_counter() - t0)


def hashed_files(bundle: Union[str, Path], manifest: Manifest) -> List[Tuple[Path, str, str]]:
    """Every bundle file the manifest records a sha256 for, as ``(path, sha256, "manifest")`` (paths contained)."""
    paths = manifest_paths(bundle, manifest)
    out = []
    for c in manifest.components.values():
        out.append((paths[f"components.{c.name}.file"], c.sha256, "manifest"))
        data = paths.get(f"components.{c.name}.external_data")
        if data is not None and c.external_sha256:
            out.append((data, c.external_sha256, "manifest"))
    return out


def verify_file_hashes(bundle: Union[str, Path], manifest: Manifest,
                       on_bytes: Optional[Callable[[int], None]] = None) -> HashReport:
    """Check every recorded sha256 of the bundle's files; returns what it cost (:class:`HashReport`).

    ``on_bytes(n)`` is called as data is read (for a progress bar).
    """
    return verify_hashes_of(hashed_files(bundle, manifest), on_bytes)
