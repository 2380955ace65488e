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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

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
    weights) -> sha256. ``face_models``: ``{"path": folder, "files": {name: sha256}}``,
    the user's insightface folder, referenced and never copied.
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


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (ONNX files with external data are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
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


def _check_size(path: Path, recorded: int, what: str) -> None:
    if recorded and path.stat().st_size != recorded:
        raise BundleError(
            f"{path}: {what} has {path.stat().st_size} bytes, the manifest records {recorded}; "
            "the file is truncated or was replaced after export (re-export the bundle)"
        )


def check_files(bundle: Union[str, Path], manifest: Manifest, verify_hashes: bool = False) -> None:
    """Every file the manifest names exists with its recorded size (and, optionally, hash)."""
    bundle = Path(bundle)
    for rel in manifest.tokenizers:
        if not (bundle / rel).is_file():
            raise BundleError(f"{bundle / rel}: tokenizer file missing from the bundle")
    for c in manifest.components.values():
        p = bundle / c.file
        if not p.is_file():
            raise BundleError(f"{p}: ONNX file of component {c.name!r} missing from the bundle")
        _check_size(p, c.size, f"the ONNX file of component {c.name!r}")
        data = bundle / c.external_data if c.external_data else None
        if data is not None:
            if not data.is_file():
                raise BundleError(f"{data}: external weights of component {c.name!r} missing")
            _check_size(data, c.external_size, f"the external weights of component {c.name!r}")
        if verify_hashes:
            if file_digest(p) != c.sha256:
                raise BundleError(f"{p}: sha256 differs from the manifest; the file changed after export")
            if data is not None and c.external_sha256 and file_digest(data) != c.external_sha256:
                raise BundleError(f"{data}: sha256 differs from the manifest; the file changed after export")
