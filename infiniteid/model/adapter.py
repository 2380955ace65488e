"""The ID-adapter file: Infinite-ID's trainable weights in one ``.safetensors``.

Format (version 1):

* tensors ``mapper.<name>``: the ID mapper's state dict (face mapper, CLIP mapper);
* tensors ``attn2.<processor>.to_k_ip.weight`` / ``.to_v_ip.weight``: the identity
  projections of every ``attn2``, keyed by diffusers' processor name, e.g.
  ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``;
* metadata (safetensors' string header): ``format`` = ``infiniteid-adapter``,
  ``format_version`` = ``1``, ``id_encoder`` = the mapper config as JSON
  (kind, dims, token counts), ``cross_attention_dim``, ``num_id_layers``.

Saving then loading is bit-exact: tensors are stored in their own dtype.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .id_encoder import IDEncoderConfig, IDMapper, build_mapper
from .processors import id_processors

FORMAT = "infiniteid-adapter"
FORMAT_VERSION = 1
MAPPER_PREFIX = "mapper."
LAYER_PREFIX = "attn2."


class AdapterError(ValueError):
    """An adapter file that is missing, of another format, or does not fit the U-Net."""


def save_adapter(path: Union[str, Path], mapper: IDMapper, unet: nn.Module) -> None:
    """Write the mapper and the U-Net's ``to_k_ip``/``to_v_ip`` weights to ``path``."""
    procs = id_processors(unet)
    if not procs:
        raise AdapterError("the U-Net has no Infinite-ID processors installed; call install_processors first")
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in mapper.state_dict().items():
        tensors[MAPPER_PREFIX + k] = v.detach().cpu().contiguous()
    for name, proc in procs.items():
        for k, v in proc.state_dict().items():
            tensors[f"{LAYER_PREFIX}{name}.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "id_encoder": json.dumps(mapper.config.to_dict(), sort_keys=True),
        "cross_attention_dim": str(mapper.config.cross_attention_dim),
        "num_id_layers": str(len(procs)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_adapter_config(path: Union[str, Path]) -> IDEncoderConfig:
    """The mapper config stored in an adapter's header (validates the format)."""
    return IDEncoderConfig.from_dict(json.loads(_metadata(Path(path))["id_encoder"]))


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
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise AdapterError(
            f"{path} has adapter format version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return meta


def load_adapter(path: Union[str, Path], unet: nn.Module) -> IDMapper:
    """Fill the U-Net's installed ``attn2`` projections from ``path``; return the mapper.

    The U-Net must carry Infinite-ID's processors (see ``install_processors``) and
    match the file layer for layer and shape for shape.
    """
    path = Path(path)
    meta = _metadata(path)
    cfg = IDEncoderConfig.from_dict(json.loads(meta["id_encoder"]))
    tensors = load_file(str(path))
    procs = id_processors(unet)
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
    p = next(unet.parameters())
    return mapper.to(device=p.device, dtype=p.dtype)


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
