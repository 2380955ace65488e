"""Seeded LoRA files in the layouts SDXL LoRAs are published in, sized for a given model.

* ``peft``: what diffusers' ``save_lora_weights`` writes: ``unet.<module>.lora_A.weight``
  (rank, in) and ``.lora_B.weight`` (out, rank), ``text_encoder.text_model.<module>...``;
* ``kohya``: sd-scripts / A1111 files: ``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` (delta = up @ down * alpha / rank);
  ``lora_te1_text_model_...`` and ``lora_te2_text_model_...`` for the text encoders. U-Net
  modules named as diffusers names them, or (``sgm=True``) in the original SGM U-Net's
  numbering that kohya's SDXL trainer writes (``lora_unet_input_blocks_3_1_...``).

Layers adapted: every attention projection, feed-forward and ``proj_in``/``proj_out``
Linear of the U-Net's transformer blocks, one resnet convolution (a 3x3 Conv2d LoRA),
and every attention and MLP Linear of the text encoders.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def target_layers(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(module name, module) of the U-Net layers the test LoRAs adapt."""
    return [
        (name, m)
        for name, m in unet.named_modules()
        if name.endswith(UNET_LAYERS) or name.endswith((".proj_in", ".proj_out")) or name == "down_blocks.1.resnets.0.conv1"
    ]


def _pair(m: nn.Module, rank: int, g: torch.Generator, amplitude: float):
    """(down, up) with ``up @ down`` of about ``amplitude`` times the layer's own weights' scale."""
    w = m.weight.detach()
    scale = amplitude * float(w.std())
    if isinstance(m, nn.Conv2d):
        down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * scale * (m.in_channels * 9 / rank) ** 0.5
    else:
        down = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
        up = torch.randn(m.out_features, rank, generator=g) * scale * (m.in_features / rank) ** 0.5
    return down.contiguous(), up.contiguous()


def _text_name(name: str) -> str:
    """Published text-encoder LoRAs name modules under CLIPTextModel's ``text_model``."""
    return name if name.startswith("text_model.") else "text_model." + name


def peft_lora(unet: nn.Module, *, seed: int, rank: int = 4, amplitude: float = 0.5,
              text_encoders: Tuple[nn.Module, ...] = ()) -> Dict[str, torch.Tensor]:
    """A LoRA in diffusers' own (peft) layout."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for name, m in target_layers(unet):
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = _pair(m, rank, g, amplitude)
    for prefix, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
        for name, m in te.named_modules():
            if name.endswith(TEXT_LAYERS):
                key = f"{prefix}.{_text_name(name)}"
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = _pair(m, rank, g, amplitude)
    return sd


def sgm_name(name: str, layers_per_block: int) -> str:
    """A diffusers U-Net module name in the original SGM U-Net's numbering, which kohya's
    sd-scripts uses for SDXL (``input_blocks.3.1...`` for ``down_blocks.1.attentions.0...``)."""
    per = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = {"conv1": "in_layers.2", "conv2": "out_layers.3"}.get(rest, rest)
        return f"input_blocks.{1 + b * per + j}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", name)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if m:
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    raise ValueError(f"no SGM name for {name}")


def kohya_lora(unet: nn.Module, *, seed: int, rank: int = 4, alpha: float = 2.0, amplitude: float = 0.5,
               text_encoders: Tuple[nn.Module, ...] = (), sgm: bool = False) -> Dict[str, torch.Tensor]:
    """A LoRA in the kohya layout (``alpha`` != rank, so the alpha scaling is exercised);
    ``sgm``: U-Net keys in the SGM numbering of kohya's SDXL trainer, else in diffusers' names."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    boost = rank / alpha  # keep the delta's size independent of alpha

    def put(key: str, m: nn.Module) -> None:
        down, up = _pair(m, rank, g, amplitude)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up * boost
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))

    for name, m in target_layers(unet):
        put("lora_unet_" + (sgm_name(name, unet.config.layers_per_block) if sgm else name).replace(".", "_"), m)
    for prefix, te in zip(("lora_te1_", "lora_te2_"), text_encoders):
        for name, m in te.named_modules():
            if name.endswith(TEXT_LAYERS):
                put(prefix + _text_name(name).replace(".", "_"), m)
    return sd


def save_lora(sd: Dict[str, torch.Tensor], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path
