"""The ID-adapter file: the ID module's weights (Infinite-ID's own, or a converted public kind) in one ``.safetensors``.

Format (version 2; version 1 files still load):

* tensors ``mapper.<name>``: the ID mapper's state dict (its kind's modules);
* tensors ``attn2.<processor>.to_k_ip.weight`` / ``.to_v_ip.weight``: the identity
  projections of every ``attn2``, keyed by diffusers' processor name, e.g.
  ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``;
* optional tensors ``lora.<processor>.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``
  (version 2): a LoRA that came inside a published FaceID file, fused into the
  U-Net's attention projections on load;
* metadata (safetensors' string header): ``format`` = ``infiniteid-adapter``,
  ``format_version`` = ``2``, ``kind`` = the mapper kind (``infiniteid``,
  ``ip-adapter-plus-face``, ...; new in version 2), ``id_encoder`` = the mapper
  config as JSON (kind, dims, token counts), ``cross_attention_dim``,
  ``num_id_layers``, and ``source`` when the file was converted from a published one.

Version 1 had no ``kind`` entry and only Infinite-ID's own mapper; its files load
as kind ``infiniteid``. Published IP-Adapter files are converted by
:mod:`infiniteid.model.public_adapter`.

Saving then loading is bit-exact: tensors are stored in their own dtype.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save_file
from safetensors import safe_open

from .id_encoder import IDEncoderConfig, IDMapper, build_mapper
from .processors import id_processors
from .weights_file import WeightsFileError, load_weights_file

FORMAT = "infiniteid-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
MAPPER_PREFIX = "mapper."
LAYER_PREFIX = "attn2."
LORA_PREFIX = "lora."


class AdapterError(ValueError):
    """An adapter file that is missing, of another format, or does not fit the U-Net."""


def save_adapter(path: Union[str, Path], mapper: IDMapper, unet: nn.Module) -> None:
    """Write the mapper and the U-Net's ``to_k_ip``/``to_v_ip`` weights to ``path``."""
    procs = id_processors(unet)
    if not procs:
        raise AdapterError("the U-Net has no Infinite-ID processors installed; call install_processors first")
    layers = {name: proc.state_dict() for name, proc in procs.items()}
    write_adapter(path, mapper.config, adapter_tensors(mapper.state_dict(), layers))


def adapter_tensors(mapper_sd: Dict[str, torch.Tensor], layers: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The file's flat tensor layout from the mapper's state dict and ``{processor name: {"to_k_ip.weight": ..}}``."""
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in mapper_sd.items():
        tensors[MAPPER_PREFIX + k] = v.detach().cpu().contiguous()
    for name, sd in layers.items():
        for k, v in sd.items():
            tensors[f"{LAYER_PREFIX}{name}.{k}"] = v.detach().cpu().contiguous()
    return tensors


def write_adapter(path: Union[str, Path], cfg: IDEncoderConfig, tensors: Dict[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Write ``tensors`` (the flat layout of :func:`adapter_tensors`) with ``cfg`` in the header, atomically."""
    cfg.validate()
    layers = {k[len(LAYER_PREFIX):].rsplit(".", 2)[0] for k in tensors if k.startswith(LAYER_PREFIX)}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": cfg.kind,
        "id_encoder": json.dumps(cfg.to_dict(), sort_keys=True),
        "cross_attention_dim": str(cfg.cross_attention_dim),
        "num_id_layers": str(len(layers)),
    }
    if source is not None:
        meta["source"] = source
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_adapter_config(path: Union[str, Path]) -> IDEncoderConfig:
    """The mapper config stored in an adapter's header (validates the format)."""
    return _config(Path(path), _metadata(Path(path)))


def is_adapter_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a ``.safetensors`` file whose header says it is in this format (any version)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def _config(path: Path, meta: Dict[str, str]) -> IDEncoderConfig:
    try:
        d = json.loads(meta["id_encoder"])
        cfg = IDEncoderConfig.from_dict(d)
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{path}: the header's ID encoder config is unreadable ({e})") from None
    kind = meta.get("kind", "infiniteid")  # version 1 files: Infinite-ID's mapper, no kind entry
    if kind != cfg.kind:
        raise AdapterError(f"{path}: the header says kind {kind!r} but its ID encoder config says {cfg.kind!r}")
    return cfg


def _metadata(path: Path) -> Dict[str, str]:
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path} is not a readable .safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an Infinite-ID adapter (header format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise AdapterError(
            f"{path} has adapter format version {meta.get('format_version')!r}; this version reads "
            f"{' and '.join(READABLE_VERSIONS)}"
        )
    return meta


def load_adapter(path: Union[str, Path], unet: nn.Module) -> IDMapper:
    """Fill the U-Net's installed ``attn2`` projections from ``path``; return the mapper.

    The U-Net must carry Infinite-ID's processors (see ``install_processors``) and
    match the file layer for layer and shape for shape.
    """
    path = Path(path)
    cfg = _config(path, _metadata(path))
    try:
        tensors = load_weights_file(path)
    except WeightsFileError as e:
        raise AdapterError(str(e)) from None
    return fill_unet(path, cfg, tensors, unet)


def fill_unet(path: Path, cfg: IDEncoderConfig, tensors: Dict[str, torch.Tensor], unet: nn.Module) -> IDMapper:
    """Build the mapper from ``mapper.*`` tensors and fill the U-Net's ``attn2.*`` projections (strict).

    ``lora.*`` tensors are fused into the U-Net's own weights: load an adapter once
    into a freshly loaded U-Net (as the pipeline does), never twice into one.
    """
    procs = id_processors(unet)
    if not procs:
        raise AdapterError("the U-Net has no Infinite-ID processors installed; call install_processors first")
    if cfg.cross_attention_dim != unet.config.cross_attention_dim:
        raise AdapterError(
            f"{path} was made for cross-attention width {cfg.cross_attention_dim}, "
            f"the U-Net has {unet.config.cross_attention_dim}"
        )
    mapper = build_mapper(cfg)
    mapper_sd = {k[len(MAPPER_PREFIX):]: v for k, v in tensors.items() if k.startswith(MAPPER_PREFIX)}
    _load_strict(mapper, mapper_sd, path, "the ID mapper")
    in_file = {k[len(LAYER_PREFIX):].rsplit(".", 2)[0] for k in tensors if k.startswith(LAYER_PREFIX)}
    missing, extra = sorted(set(procs) - in_file), sorted(in_file - set(procs))
    if missing or extra:
        raise AdapterError(
            f"{path} does not fit this U-Net: {len(missing)} attn2 layers missing from the file"
            f"{' (first: ' + missing[0] + ')' if missing else ''}, {len(extra)} unknown"
            f"{' (first: ' + extra[0] + ')' if extra else ''}"
        )
    for name, proc in procs.items():
        prefix = f"{LAYER_PREFIX}{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _load_strict(proc, sd, path, name)
    fuse_lora(tensors, unet, str(path))
    p = next(unet.parameters())
    return mapper.to(device=p.device, dtype=p.dtype)


def fuse_lora(tensors: Dict[str, torch.Tensor], unet: nn.Module, name: str) -> int:
    """Fuse ``lora.*`` tensors into the U-Net's attention projections; returns the layers fused.

    ``W += up @ down`` for ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (scale 1: FaceID's
    in-file LoRA has no alpha, and diffusers loads it at weight 1.0).
    """
    layers = sorted({k[len(LORA_PREFIX):].rsplit(".", 3)[0] for k in tensors if k.startswith(LORA_PREFIX)})
    for proc in layers:
        try:
            attn = unet.get_submodule(proc[: -len(".processor")])
        except AttributeError:
            raise AdapterError(f"{name}: LoRA for {proc}, which this U-Net does not have") from None
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            linear = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            key = f"{LORA_PREFIX}{proc}.{proj}_lora"
            if f"{key}.down.weight" not in tensors or f"{key}.up.weight" not in tensors:
                raise AdapterError(f"{name}: {key}.down/up.weight missing (a truncated or edited file?)")
            down = tensors[f"{key}.down.weight"].to(torch.float32)
            up = tensors[f"{key}.up.weight"].to(torch.float32)
            if (up.shape[0], down.shape[1]) != tuple(linear.weight.shape) or up.shape[1] != down.shape[0]:
                raise AdapterError(
                    f"{name}: LoRA {proc} {proj} has shapes {tuple(up.shape)} x {tuple(down.shape)}, "
                    f"the layer is {tuple(linear.weight.shape)}"
                )
            with torch.no_grad():
                w = linear.weight
                w.copy_((w.to(torch.float32) + up @ down).to(w.dtype))
    return len(layers)


def _load_strict(module: nn.Module, sd: Dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    if set(own) != set(sd):
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        raise AdapterError(f"{path}: weights of {what} do not match (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise AdapterError(f"{path}: {what}.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
