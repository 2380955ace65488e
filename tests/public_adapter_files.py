"""Published IP-Adapter face files, written as their authors' code writes them, with seeded random values.

Key names and shapes follow the original IP-Adapter code (``Resampler`` for plus-face,
``ProjPlusModel`` + ``FacePerceiverResampler`` for FaceID-Plus, ``MLPProjModel`` for
FaceID; ``ip_layers = ModuleList(unet.attn_processors.values())``, so an ``attn2``'s
projections are numbered by its position among *all* processors, and FaceID's LoRA
sits on every processor). Written independently of ``infiniteid.model.public_adapter``
so that diffusers' loader, not our own reading of the layout, is the reference.

Dimensions are the published ones where they do not depend on the U-Net (ArcFace 512,
FaceID MLP 1024, Perceiver depth 4, head width 64, 16 plus-face queries, 4 FaceID
tokens, ff x4) and sized for the tiny U-Net and tiny CLIP where they do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

HEAD = 64
DEPTH = 4
FF_MULT = 4
PLUS_QUERIES = 16
FACE_TOKENS = 4
FACE_DIM = 512
FACE_HIDDEN = 1024
LORA_RANK = 4

FILE_NAMES = {
    "ip-adapter-plus-face": "ip-adapter-plus-face_sdxl_vit-h.bin",
    "ip-adapter-faceid-plusv2": "ip-adapter-faceid-plusv2_sdxl.bin",
    "ip-adapter-faceid": "ip-adapter-faceid_sdxl.bin",
}


class _Values:
    """Seeded values of sensible size: weights ~ N(0, 1/fan_in), LayerNorm gains ~ 1."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def randn(self, *shape, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g) * std).to(self.dtype)

    def linear(self, sd: Dict, key: str, out: int, inp: int, bias: bool = True) -> None:
        sd[f"{key}.weight"] = self.randn(out, inp, std=inp**-0.5)
        if bias:
            sd[f"{key}.bias"] = self.randn(out, std=0.02)

    def norm(self, sd: Dict, key: str, dim: int) -> None:
        sd[f"{key}.weight"] = 1 + self.randn(dim, std=0.1)
        sd[f"{key}.bias"] = self.randn(dim, std=0.1)


def _perceiver_layers(v: _Values, sd: Dict, prefix: str, dim: int) -> None:
    for i in range(DEPTH):
        p = f"{prefix}layers.{i}"
        v.norm(sd, f"{p}.0.norm1", dim)
        v.norm(sd, f"{p}.0.norm2", dim)
        v.linear(sd, f"{p}.0.to_q", dim, dim, bias=False)
        v.linear(sd, f"{p}.0.to_kv", 2 * dim, dim, bias=False)
        v.linear(sd, f"{p}.0.to_out", dim, dim, bias=False)
        v.norm(sd, f"{p}.1.0", dim)
        v.linear(sd, f"{p}.1.1", dim * FF_MULT, dim, bias=False)
        v.linear(sd, f"{p}.1.3", dim, dim * FF_MULT, bias=False)


def image_proj(kind: str, cross_dim: int, clip_dim: int, v: _Values) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    if kind == "ip-adapter-plus-face":
        dim = 2 * HEAD  # SDXL: 1280 = 20 heads of 64
        sd["latents"] = v.randn(1, PLUS_QUERIES, dim, std=dim**-0.5)
        v.linear(sd, "proj_in", dim, clip_dim)
        v.linear(sd, "proj_out", cross_dim, dim)
        v.norm(sd, "norm_out", cross_dim)
        _perceiver_layers(v, sd, "", dim)
        return sd
    v.linear(sd, "proj.0", FACE_HIDDEN, FACE_DIM)
    v.linear(sd, "proj.2", cross_dim * FACE_TOKENS, FACE_HIDDEN)
    v.norm(sd, "norm", cross_dim)
    if kind == "ip-adapter-faceid-plusv2":
        v.linear(sd, "perceiver_resampler.proj_in", cross_dim, clip_dim)
        v.linear(sd, "perceiver_resampler.proj_out", cross_dim, cross_dim)
        v.norm(sd, "perceiver_resampler.norm_out", cross_dim)
        _perceiver_layers(v, sd, "perceiver_resampler.", cross_dim)
    return sd


def ip_adapter(kind: str, unet, v: _Values, lora: bool) -> Dict[str, torch.Tensor]:
    """``to_k_ip``/``to_v_ip`` per ``attn2``; FaceID kinds' LoRA on every processor when ``lora``."""
    sd: Dict[str, torch.Tensor] = {}
    cross = unet.config.cross_attention_dim
    for n, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name[: -len(".processor")])
        hidden = attn.inner_dim
        is_cross = not name.endswith("attn1.processor")
        if is_cross:
            v.linear(sd, f"{n}.to_k_ip", hidden, cross, bias=False)
            v.linear(sd, f"{n}.to_v_ip", hidden, cross, bias=False)
        if lora and kind != "ip-adapter-plus-face":
            kv_in = cross if is_cross else hidden
            for proj, inp in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                sd[f"{n}.{proj}_lora.down.weight"] = v.randn(LORA_RANK, inp, std=inp**-0.5)
                sd[f"{n}.{proj}_lora.up.weight"] = v.randn(hidden, LORA_RANK, std=0.2 * LORA_RANK**-0.5)
    return sd


def write_public_adapter(
    folder: Path, kind: str, unet, clip_dim: int, seed: int = 0, fmt: str = "bin", lora: bool = False, dtype=torch.float16
) -> Path:
    """Write ``kind``'s published file into ``folder``; returns its path. ``fmt``: ``bin`` (a torch
    pickle of ``{"image_proj": .., "ip_adapter": ..}``, as published) or ``safetensors`` (flat
    ``image_proj.*`` / ``ip_adapter.*`` keys, as diffusers and converters write them)."""
    v = _Values(seed, dtype)
    groups = {"image_proj": image_proj(kind, unet.config.cross_attention_dim, clip_dim, v), "ip_adapter": ip_adapter(kind, unet, v, lora)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = FILE_NAMES[kind]
    if fmt == "bin":
        path = folder / name
        torch.save(groups, path)
    else:
        path = folder / name.replace(".bin", ".safetensors")
        save_file({f"{g}.{k}": t.contiguous() for g, sd in groups.items() for k, t in sd.items()}, str(path))
    return path
