"""Writing a bundle: every component's graph, the tokenizers, then the manifest.

Atomic by construction. Everything is written into a hidden temporary sibling of
the output folder (``.<name>.partial-<random>``); ``manifest.json`` is the last file
written into it; only then is it renamed to the output name. So:

* an export that fails or is interrupted leaves no folder under the output name,
  and its temporary sibling (removed on failure; left behind only if the process is
  killed) has no manifest, so :func:`~infiniteid.bundle.read_manifest` refuses it;
* an existing output folder is refused unless ``overwrite``; even then only a
  folder that is a bundle (or empty) is replaced, never an arbitrary directory;
* one export per output folder at a time (a lock beside it), and staging folders
  that killed exports of the same output left behind are removed
  (:mod:`.output_folder`, torch-free, so the command checks all this first);
* temporary files of the libraries involved (onnxslim, onnx) go into the
  temporary sibling too: nothing is written outside the output folder.
"""
from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import contract as C
from ..bundle import (MANIFEST, ONNX_DIR, TOKENIZER_FILES, BundleError, Manifest, file_digest, tag_face_models,
                      write_manifest)
from .model_info import ModelInfo
from .onnx_graph import export_component
from .options import ExportOptions
from .output_folder import check_output_folder, output_lock, staging

# Weight and config files a diffusers / transformers folder is loaded from; variant
# copies (``*.fp16.safetensors``) and single-file checkpoints are not read by the loader.
_SOURCE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_VARIANT_MARKS = (".fp16.", ".bf16.", ".fp8.")
_SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_TOOLS = ("torch", "onnx", "onnxslim", "onnxruntime-gpu", "onnxruntime", "diffusers", "transformers", "tokenizers", "nvidia-modelopt", "infiniteid-rt")


def export_bundle(
    pipeline: Any,
    out: Union[str, Path],
    options: Optional[ExportOptions] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    face_models: Optional[Union[str, Path]] = None,
    exporters: Optional[Mapping[str, Callable[..., Any]]] = None,
) -> Manifest:
    """Export every component of ``pipeline`` and write the bundle folder ``out``.

    ``face_models``: the user's insightface folder, recorded in the manifest by path
    and hash (never copied). ``exporters``: per component, a replacement for
    :func:`export_component` with its signature (the calibration writes its quantized
    U-Net this way). Returns the written manifest.
    """
    out = Path(out).expanduser().absolute()
    info = ModelInfo.from_pipeline(pipeline)
    opts = (options or ExportOptions()).resolve(info.resolution_multiple, info.default_size)
    check_output_folder(out, overwrite)
    faces = face_models_record(face_models) if face_models is not None else None

    with output_lock(out), staging(out, overwrite) as tmp:
        (tmp / ONNX_DIR).mkdir()
        components = {}
        bar = tqdm(C.COMPONENTS, desc="exporting", unit="graph", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            export = (exporters or {}).get(name, export_component)
            components[name] = export(pipeline, name, tmp / ONNX_DIR / f"{name}.onnx", opts, root=tmp, info=info)
            if opts.on_component is not None:
                opts.on_component(name)
        bar.close()
        for rel, tok in zip(TOKENIZER_FILES, (pipeline.c.tokenizer, pipeline.c.tokenizer_2)):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            tok.save(tmp / rel)
        manifest = Manifest(
            components=components,
            model=model_record(pipeline, info),
            scheduler_config=_plain({**pipeline.c.scheduler_config, **(opts.scheduler_override or {})}),
            resolution={
                "multiple": info.resolution_multiple,
                "min": int(opts.min_resolution),
                "max": int(opts.max_resolution),
                "default_height": int(opts.height),
                "default_width": int(opts.width),
            },
            max_images=opts.max_batch,
            sources=source_digests(pipeline),
            tools=tool_versions(opts.opset),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            face_models=faces,
            loras=[_plain(r.to_dict()) for r in pipeline.c.loras],
            scheduler_override=_plain(opts.scheduler_override) if opts.scheduler_override else None,
        )
        write_manifest(tmp, manifest)
    return manifest


def export_tiny_bundle(
    out: Union[str, Path],
    *,
    seed: int = 0,
    options: Optional[ExportOptions] = None,
    overwrite: bool = False,
    progress: bool = False,
    face_models: Optional[Union[str, Path]] = None,
) -> Manifest:
    """The tiny random-weight model (``InfiniteIDPipeline.tiny(seed)``) as a bundle."""
    from ..model.pipeline import InfiniteIDPipeline

    return export_bundle(
        InfiniteIDPipeline.tiny(seed), out, options, overwrite=overwrite, progress=progress, face_models=face_models
    )


# -- manifest sections ------------------------------------------------------------
def model_record(pipeline: Any, info: ModelInfo) -> Dict[str, Any]:
    """The manifest's ``model`` section (see :class:`infiniteid.bundle.Manifest`)."""
    c = pipeline.c
    d = info.to_dict()
    d.pop("default_size")
    d.update(
        clip_image=_plain(c.clip_image.to_dict()),
        force_zeros_for_empty_prompt=bool(c.force_zeros_for_empty_prompt),
        id_encoder=_plain(c.id_encoder.mapper.config.to_dict()),
    )
    return d


def _weight_files(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in _SOURCE_SUFFIXES and not any(m in p.name for m in _VARIANT_MARKS):
            yield p


def source_digests(pipeline: Any) -> Dict[str, str]:
    """sha256 of the weights the pipeline was loaded from.

    Paths in ``Components.sources`` are hashed file by file (for an SDXL folder only
    the sub-folders the loader reads); a source that is not a path (the tiny model)
    is recorded as it is, plus a digest of each module's state dict, so two exports
    of the same seed can be compared.
    """
    out: Dict[str, str] = {}
    for key, src in pipeline.c.sources.items():
        p = Path(str(src))
        if p.is_file():
            out[f"{key}/{p.name}"] = file_digest(p)
        elif p.is_dir():
            parts = [p / s for s in _SDXL_PARTS if (p / s).is_dir()] or [p]
            for folder in parts:
                for f in _weight_files(folder):
                    out[f"{key}/{f.relative_to(p).as_posix()}"] = file_digest(f)
        else:
            out[key] = str(src)
    if not any(Path(str(s)).exists() for s in pipeline.c.sources.values()):
        from .graphs import component_modules

        for name, module in component_modules(pipeline).items():
            out[f"state_dict/{name}"] = state_dict_digest(module)
    return out


def state_dict_digest(module: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in order)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def face_models_record(folder: Union[str, Path]) -> Dict[str, Any]:
    """The user's insightface folder by absolute path and the sha256 of its ONNX files, tagged as recorded here."""
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise BundleError(f"face model folder not found: {folder}")
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise BundleError(f"{folder}: no .onnx face models in it (expected an insightface pack such as antelopev2)")
    return tag_face_models({"path": str(folder), "files": {f.name: file_digest(f) for f in files}})


def tool_versions(opset: int) -> Dict[str, str]:
    out = {"python": platform.python_version(), "onnx_opset": str(opset)}
    for dist in _TOOLS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _plain(x: Any) -> Any:
    """JSON-safe copy of a config (tuples to lists, frozen dicts to dicts)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)
