"""Write a pipeline's components as the local folders that real weights come in.

``InfiniteIDPipeline.from_pretrained`` reads an SDXL diffusers folder, a CLIP image
encoder folder and an adapter file. Writing the tiny model in exactly that layout
lets tests (and users checking an install) exercise the real-weight loading path
end to end with nothing downloaded.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .adapter import save_adapter
from .pipeline import Components
from .processors import remove_processors


@dataclass(frozen=True)
class WeightPaths:
    base: Path  # diffusers SDXL layout
    image_encoder: Path  # transformers CLIP vision folder
    adapter: Path  # the adapter .safetensors


def _save_tokenizer(tokenizer, folder: Path, pad_token: str, bos: str, eos: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": tokenizer.max_length,
                "bos_token": bos,
                "eos_token": eos,
                "unk_token": eos,
                "pad_token": pad_token,
            },
            indent=2,
        )
    )


def save_weight_folders(c: Components, root: Union[str, Path]) -> WeightPaths:
    """``root/base`` (SDXL layout), ``root/image_encoder``, ``root/adapter.safetensors``."""
    from .tiny import BOS, EOS

    root = Path(root)
    base = root / "base"
    unet = copy.deepcopy(c.unet)
    remove_processors(unet)  # the processors' weights go to the adapter, not to unet/
    unet.save_pretrained(base / "unet")
    c.vae.save_pretrained(base / "vae")
    c.text_encoder.save_pretrained(base / "text_encoder")
    c.text_encoder_2.save_pretrained(base / "text_encoder_2")
    for name, tok in (("tokenizer", c.tokenizer), ("tokenizer_2", c.tokenizer_2)):
        pad = tok.tokenizer.id_to_token(tok.pad_id)
        _save_tokenizer(tok, base / name, pad, BOS, EOS)
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **c.scheduler_config}, indent=2)
    )
    (base / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": c.force_zeros_for_empty_prompt})
    )
    encoder = root / "image_encoder"
    c.id_encoder.image_encoder.save_pretrained(encoder)
    size = c.clip_image.size
    (encoder / "preprocessor_config.json").write_text(
        json.dumps(
            {"crop_size": {"height": size, "width": size}, "image_mean": list(c.clip_image.mean), "image_std": list(c.clip_image.std)}
        )
    )
    adapter = root / "adapter.safetensors"
    save_adapter(adapter, c.id_encoder.mapper, c.unet)
    return WeightPaths(base=base, image_encoder=encoder, adapter=adapter)
