"""Image preprocessing for the CLIP image encoder, in numpy + PIL (shared by all backends).

CLIP takes a square crop resized so its short side is ``size``, centre-cropped,
scaled to [0, 1] and normalised with the encoder's mean and std. The values come
from the image encoder folder's ``preprocessor_config.json`` when there is one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipImageConfig:
    size: int = 224
    mean: Tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    std: Tuple[float, float, float] = field(default=OPENAI_CLIP_STD)

    @classmethod
    def from_folder(cls, folder: Path, default_size: int) -> "ClipImageConfig":
        """Read ``preprocessor_config.json`` if present; else OpenAI CLIP's values at ``default_size``."""
        p = Path(folder) / "preprocessor_config.json"
        if not p.is_file():
            return cls(size=default_size)
        d = json.loads(p.read_text())
        crop = d.get("crop_size", default_size)
        size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
        return cls(size=int(size), mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(d.get("image_std", OPENAI_CLIP_STD)))

    def to_dict(self) -> dict:
        return asdict(self)


def clip_pixels(image: np.ndarray, cfg: ClipImageConfig) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB -> float32 ``(3, size, size)`` CLIP input."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    im = Image.fromarray(image.astype(np.uint8))
    w, h = im.size
    scale = cfg.size / min(w, h)
    im = im.resize((max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - cfg.size) // 2, (h - cfg.size) // 2
    im = im.crop((left, top, left + cfg.size, top + cfg.size))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    return x.transpose(2, 0, 1).copy()
