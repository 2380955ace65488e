"""Published IP-Adapter face files as Infinite-ID ID modules, read the way diffusers reads them.

A published file (``.bin`` torch pickle or ``.safetensors``, read only through
:func:`~infiniteid.model.weights_file.load_weights_file`) holds two groups:

* ``image_proj.*``: the projection to ID tokens. Its keys say the kind, tested in
  the order of diffusers' ``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``:
  ``proj.weight`` (plain IP-Adapter) and ``proj.3.weight`` (full-face) are CLIP
  image-embedding adapters, not face kinds, and are refused;
  ``perceiver_resampler.proj_in.weight`` is FaceID-Plus (v1 and v2 share one layout:
  the file name or ``--kind`` says which); ``norm.weight`` is FaceID; ``latents`` is
  plus(-face).
* ``ip_adapter.<n>.to_k_ip.weight`` / ``.to_v_ip.weight``: one pair per ``attn2``,
  numbered ``n = 1, 3, 5, ...`` along the U-Net's ``attn_processors`` order (the
  even numbers were the ``attn1`` slots of the original code), as diffusers'
  ``_convert_ip_adapter_attn_to_diffusers`` maps them to processor names.
  FaceID files may also carry a LoRA for every attention layer
  (``ip_adapter.<n>.to_{q,k,v,out}_lora.{down,up}.weight``, ``n`` counting all
  processors); it is kept as ``lora.<processor>.<key>`` and fused into the U-Net's
  projections on load (:func:`~infiniteid.model.adapter.fuse_lora`), as diffusers applies it.

:func:`convert_public` turns such a file into this project's adapter layout
(:mod:`infiniteid.model.adapter`) checked against a U-Net (a real one, or one
built on the meta device from ``unet/config.json`` alone: :func:`unet_from_config`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .adapter import LAYER_PREFIX, LORA_PREFIX, MAPPER_PREFIX, AdapterError
from .id_encoder import FACE_EMBED_DIM, IDEncoderConfig, ResamplerConfig
from .kinds import AUTO, FACEID, FACEID_PLUS, FACEID_PLUSV2, PLUS_FACE, PUBLIC_KINDS
from .weights_file import WeightsFileError, flatten, load_weights_file

PERCEIVER_HEAD_DIM = 64  # diffusers derives the head count as to_q rows // 64
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def layout_kind(image_proj: Dict[str, torch.Tensor], name: str) -> str:
    """The kind a published ``image_proj`` group's keys say (FaceID-Plus v1 and v2 both give ``ip-adapter-faceid-plus``)."""
    keys = set(image_proj)
    supported = ", ".join(PUBLIC_KINDS)
    if "proj.weight" in keys:
        raise AdapterError(f"{name} is a plain IP-Adapter (CLIP image embedding -> 4 tokens), not a face adapter; supported kinds: {supported}")
    if "proj.3.weight" in keys:
        raise AdapterError(f"{name} is IP-Adapter full-face (CLIP embedding MLP), not supported; supported kinds: {supported}")
    if "perceiver_resampler.proj_in.weight" in keys:
        return FACEID_PLUS
    if "norm.weight" in keys and "proj.0.weight" in keys:
        return FACEID
    if "latents" in keys:
        return PLUS_FACE
    raise AdapterError(f"{name}: unknown image_proj key layout (first keys: {', '.join(sorted(keys)[:4])})")


def resolve_kind(requested: Optional[str], image_proj: Dict[str, torch.Tensor], name: str) -> str:
    """``requested`` (a kind, or ``auto``/None) checked against the file's layout.

    FaceID-Plus v1 and v2 share one layout; ``auto`` takes v2 when the file name says
    ``plusv2`` (as published) and otherwise asks for ``--kind``.
    """
    found = layout_kind(image_proj, name)
    if requested in (None, AUTO):
        if found != FACEID_PLUS:
            return found
        if re.search(r"plus[-_]?v2", name.lower()):
            return FACEID_PLUSV2
        raise AdapterError(
            f"{name} has the FaceID-Plus layout, which v1 and v2 share, and its name does not say 'plusv2'; "
            f"pass --kind {FACEID_PLUSV2} (shortcut on) or --kind {FACEID_PLUS}"
        )
    if requested not in PUBLIC_KINDS:
        raise AdapterError(f"unknown adapter kind {requested!r}; published kinds: {', '.join(PUBLIC_KINDS)} (or auto)")
    family = FACEID_PLUS if requested == FACEID_PLUSV2 else requested
    if family != found:
        raise AdapterError(f"{name} has the image_proj key layout of {found}, not of {requested}")
    return requested


def split_groups(tree: Dict, name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(image_proj, ip_adapter)`` from a pickle's nested dicts or a safetensors' ``group.key`` names."""
    try:
        flat = flatten(tree)
    except WeightsFileError as e:
        raise AdapterError(f"{name}: {e}") from None
    groups: Dict[str, Dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    other = []
    for k, v in flat.items():
        head, _, rest = k.partition(".")
        if head in groups and rest:
            groups[head][rest] = v
        else:
            other.append(k)
    if not groups["image_proj"] or not groups["ip_adapter"]:
        raise AdapterError(
            f"{name}: unknown key layout, expected an IP-Adapter file with 'image_proj' and 'ip_adapter' groups "
            f"(first keys: {', '.join(sorted(flat)[:4]) or 'none'})"
        )
    if other:
        raise AdapterError(f"{name}: unexpected keys outside image_proj/ip_adapter (first: {sorted(other)[0]})")
    return groups["image_proj"], groups["ip_adapter"]


def _shape(sd: Dict[str, torch.Tensor], key: str, name: str) -> Tuple[int, ...]:
    if key not in sd:
        raise AdapterError(f"{name}: image_proj.{key} is missing (a truncated or edited file?)")
    return tuple(sd[key].shape)


def _perceiver_config(sd: Dict[str, torch.Tensor], prefix: str, name: str, num_queries: int) -> ResamplerConfig:
    dim = _shape(sd, f"{prefix}proj_in.weight", name)[0]
    inner = _shape(sd, f"{prefix}layers.0.0.to_q.weight", name)[0]
    if inner % PERCEIVER_HEAD_DIM:
        raise AdapterError(f"{name}: the Perceiver's width {inner} is not a multiple of {PERCEIVER_HEAD_DIM} heads' width")
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(f"{prefix}layers.") and k.endswith(".0.to_q.weight")})
    ff = _shape(sd, f"{prefix}layers.0.1.1.weight", name)[0]
    return ResamplerConfig(
        dim=dim, depth=depth, heads=inner // PERCEIVER_HEAD_DIM, dim_head=PERCEIVER_HEAD_DIM, num_queries=num_queries, ff_mult=ff // dim
    )


def config_from_layout(kind: str, sd: Dict[str, torch.Tensor], name: str, shortcut_scale: float = 1.0) -> IDEncoderConfig:
    """The mapper config a published ``image_proj`` group implies (shapes read off its tensors)."""
    if kind == PLUS_FACE:
        _, queries, _ = _shape(sd, "latents", name)
        cross = _shape(sd, "proj_out.weight", name)[0]
        clip_dim = _shape(sd, "proj_in.weight", name)[1]
        res = _perceiver_config(sd, "", name, queries)
        return IDEncoderConfig(kind=kind, cross_attention_dim=cross, clip_dim=clip_dim, resampler=res)
    hidden, face_dim = _shape(sd, "proj.0.weight", name)
    cross = _shape(sd, "norm.weight", name)[0]
    out = _shape(sd, "proj.2.weight", name)[0]
    if out % cross:
        raise AdapterError(f"{name}: image_proj.proj.2 gives {out} values, not a whole number of {cross}-wide tokens")
    cfg = dict(kind=kind, cross_attention_dim=cross, face_embed_dim=face_dim, face_hidden_dim=hidden, face_tokens=out // cross)
    if face_dim != FACE_EMBED_DIM:
        raise AdapterError(f"{name}: the face projection takes {face_dim}-d embeddings; ArcFace gives {FACE_EMBED_DIM}")
    if kind == FACEID:
        return IDEncoderConfig(**cfg)
    res = _perceiver_config(sd, "perceiver_resampler.", name, out // cross)
    if res.dim != cross:
        raise AdapterError(f"{name}: the Perceiver works at width {res.dim} but the face tokens are {cross} wide")
    clip_dim = _shape(sd, "perceiver_resampler.proj_in.weight", name)[1]
    return IDEncoderConfig(**cfg, clip_dim=clip_dim, resampler=res, shortcut_scale=float(shortcut_scale))


def mapper_state_dict(kind: str, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Published ``image_proj`` keys -> our mapper's. The modules carry the published names
    except the Perceiver attention's two LayerNorms (``norm1`` -> ``norm_x``, ``norm2`` ->
    ``norm_latents``) and plus-face's resampler, which sits under ``resampler.``."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"(layers\.\d+\.0\.)norm1\.", r"\1norm_x.", k)
        k = re.sub(r"(layers\.\d+\.0\.)norm2\.", r"\1norm_latents.", k)
        out[("resampler." if kind == PLUS_FACE else "") + k] = v
    return out


def attn2_names(unet: nn.Module) -> List[str]:
    """The processors that get ID projections, in diffusers' numbering order (every non-``attn1``)."""
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor")]


def _attention(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name[: -len(".processor")])


def convert_public(
    path: Union[str, Path], unet: nn.Module, kind: str = AUTO, shortcut_scale: float = 1.0
) -> Tuple[IDEncoderConfig, Dict[str, torch.Tensor]]:
    """A published file as ``(config, tensors in our adapter layout)``, checked against ``unet``.

    ``unet``: the SDXL U-Net the adapter will run on (its weights are not read, a
    meta-device one from :func:`unet_from_config` will do).
    """
    path = Path(path)
    try:
        tree = load_weights_file(path)
    except WeightsFileError as e:
        raise AdapterError(str(e)) from None
    image_proj, ip = split_groups(tree, path.name)
    kind = resolve_kind(kind, image_proj, path.name)
    cfg = config_from_layout(kind, image_proj, path.name, shortcut_scale)
    cross = unet.config.cross_attention_dim
    if cfg.cross_attention_dim != cross:
        hint = " (an SD 1.5 adapter?)" if cfg.cross_attention_dim == 768 else ""
        raise AdapterError(
            f"{path.name} was made for cross-attention width {cfg.cross_attention_dim}{hint}; this U-Net has {cross} (SDXL: 2048)"
        )
    tensors = {MAPPER_PREFIX + k: v for k, v in mapper_state_dict(kind, image_proj).items()}
    tensors.update(_layer_tensors(ip, unet, path.name))
    return cfg, tensors


def _layer_tensors(ip: Dict[str, torch.Tensor], unet: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    names = attn2_names(unet)
    ids, lora_ids, unknown = set(), set(), []
    for k in ip:
        m, lm = _IP_KEY.match(k), _LORA_KEY.match(k)
        if m:
            ids.add(int(m.group(1)))
        elif lm:
            lora_ids.add(int(lm.group(1)))
        else:
            unknown.append(k)
    if unknown:
        raise AdapterError(f"{name}: unknown key layout in ip_adapter (first: {sorted(unknown)[0]})")
    expected = {2 * i + 1 for i in range(len(names))}
    if ids != expected:
        raise AdapterError(
            f"{name} has ID projections for {len(ids)} cross-attention layers, this U-Net has {len(names)}: "
            "the adapter was made for another base model"
        )
    out: Dict[str, torch.Tensor] = {}
    for i, proc in enumerate(names):
        attn = _attention(unet, proc)
        for which in ("to_k_ip", "to_v_ip"):
            key = f"{2 * i + 1}.{which}.weight"
            t = ip.get(key)
            if t is None:
                raise AdapterError(f"{name}: ip_adapter.{key} is missing")
            want = (attn.inner_dim, unet.config.cross_attention_dim)
            if tuple(t.shape) != want:
                raise AdapterError(f"{name}: ip_adapter.{key} has shape {tuple(t.shape)}, this U-Net's {proc} needs {want}")
            out[f"{LAYER_PREFIX}{proc}.{which}.weight"] = t
    if lora_ids:
        out.update(_lora_tensors(ip, unet, name, lora_ids))
    return out


def _lora_tensors(ip: Dict[str, torch.Tensor], unet: nn.Module, name: str, ids: set) -> Dict[str, torch.Tensor]:
    """FaceID's in-file LoRA: ``n`` counts every processor (diffusers' ``_load_ip_adapter_loras``)."""
    procs = list(unet.attn_processors)
    if max(ids) >= len(procs):
        raise AdapterError(f"{name}: LoRA for {max(ids) + 1} attention layers, this U-Net has {len(procs)}")
    out = {}
    for n in sorted(ids):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            for part in ("down", "up"):
                key = f"{n}.{proj}_lora.{part}.weight"
                if key not in ip:
                    raise AdapterError(f"{name}: ip_adapter.{key} is missing")
                out[f"{LORA_PREFIX}{procs[n]}.{proj}_lora.{part}.weight"] = ip[key]
    return out


def unet_from_config(config: Union[str, Path, dict]) -> nn.Module:
    """An SDXL U-Net on the meta device from its ``config.json`` (no weights read, no memory used)."""
    import json

    from diffusers import UNet2DConditionModel

    if not isinstance(config, dict):
        p = Path(config)
        try:
            config = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read the U-Net config {p}: {e}") from None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def describe(cfg: IDEncoderConfig, tensors: Dict[str, torch.Tensor], clip_tokens: Optional[int] = None) -> str:
    """One line about a converted adapter: kind, ID tokens, layers."""
    from .id_encoder import build_mapper

    with torch.device("meta"):
        mapper = build_mapper(cfg)
    layers = len({k[len(LAYER_PREFIX):].rsplit(".", 2)[0] for k in tensors if k.startswith(LAYER_PREFIX)})
    lora = len({k[len(LORA_PREFIX):].rsplit(".", 3)[0] for k in tensors if k.startswith(LORA_PREFIX)})
    tokens = mapper.num_tokens(clip_tokens or 257)
    extra = f", LoRA on {lora} attention layers (fused on load)" if lora else ""
    return f"kind {cfg.kind}, {tokens} ID tokens of width {cfg.cross_attention_dim}, {layers} attn2 layers{extra}"


def load_id_module(path: Union[str, Path], unet: nn.Module, kind: str = AUTO, shortcut_scale: float = 1.0):
    """The ID mapper from an adapter file in either form: this project's format (any version)
    or a published IP-Adapter file; fills the U-Net's installed ``attn2`` projections."""
    from .adapter import fill_unet, is_adapter_file, load_adapter, read_adapter_config

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    if is_adapter_file(path):
        stored = read_adapter_config(path).kind
        if kind not in (None, AUTO) and kind != stored:
            raise AdapterError(f"{path} is a converted {stored} adapter, not {kind}")
        return load_adapter(path, unet)
    cfg, tensors = convert_public(path, unet, kind, shortcut_scale)
    return fill_unet(path, cfg, tensors, unet)
