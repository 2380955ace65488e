"""Building the pipeline's components: the tiny random model, or real weights from local folders.

Nothing here reaches a model hub: every ``from_pretrained`` is ``local_files_only``
and a missing folder or file is a :class:`WeightsError` that says what to put where.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..imageproc import ClipImageConfig
from ..tokenize import PromptTokenizer, configure_padding
from .adapter import AdapterError
from .id_encoder import IDEncoder, IDEncoderConfig, build_mapper
from .pipeline import Components
from .processors import install_processors
from .tiny import EOS, TINY_SCHEDULER_CONFIG, TinySizes, tiny_id_encoder, tiny_text_encoders, tiny_tokenizer, tiny_unet, tiny_vae

SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class WeightsError(ValueError):
    """Weights a user pointed at that are missing or not what we expect."""


def tiny_components(seed: int = 0, face: Any = None) -> Components:
    """The tiny model, bit-identical for a seed (built under a forked, seeded RNG)."""
    sizes = TinySizes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_tokenizer(EOS), tiny_tokenizer("!")
        te1, te2 = tiny_text_encoders(sizes, tok1)
        unet = tiny_unet(sizes)
        install_processors(unet)
        vae = tiny_vae()
        id_encoder = tiny_id_encoder(sizes)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        id_encoder=id_encoder,
        scheduler_config=dict(TINY_SCHEDULER_CONFIG),
        clip_image=ClipImageConfig(size=sizes.clip_image_size),
        face=face,
        sources={"model": f"tiny(seed={seed})"},
    )


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise WeightsError(f"{what} folder not found: {path}. {hint}")
    return path


def load_prompt_tokenizer(folder: Path) -> PromptTokenizer:
    """An SDXL tokenizer folder (``tokenizer.json``, or CLIP's ``vocab.json`` + ``merges.txt``)."""
    from transformers import CLIPTokenizerFast

    try:
        hf = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the tokenizer in {folder}: {e}") from None
    return PromptTokenizer(configure_padding(hf.backend_tokenizer, hf.pad_token, hf.model_max_length))


def load_components(
    base: Union[str, Path],
    image_encoder: Union[str, Path],
    adapter: Optional[Union[str, Path]],
    face_models: Optional[Union[str, Path]] = None,
    kind: str = "auto",
    face_tokens: int = 4,
) -> Components:
    """SDXL from a diffusers folder, the CLIP image encoder, and an ID adapter file: this
    project's format or a published IP-Adapter face file (``kind``: see
    :mod:`infiniteid.model.public_adapter`; ``auto`` reads it from the file).

    ``adapter=None`` gives a freshly initialised Infinite-ID mapper (``face_tokens``
    face tokens) and ``attn2`` projections: the starting point of training."""
    from .public_adapter import load_id_module

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    base = _require_dir(Path(base), "SDXL base", "Give a diffusers SDXL folder (model_index.json, unet/, vae/, ...).")
    missing = [s for s in SDXL_SUBFOLDERS if not (base / s).is_dir()]
    if missing:
        raise WeightsError(f"{base} is not a complete diffusers SDXL folder: missing {', '.join(missing)}")
    enc_dir = _require_dir(
        Path(image_encoder), "CLIP image encoder", "Give a transformers CLIP vision folder (config.json + weights)."
    )
    try:
        unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae", local_files_only=True)
        te1 = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder", local_files_only=True)
        te2 = CLIPTextModelWithProjection.from_pretrained(str(base), subfolder="text_encoder_2", local_files_only=True)
        vision = CLIPVisionModelWithProjection.from_pretrained(str(enc_dir), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise WeightsError(f"cannot load weights: {e}") from None

    install_processors(unet)
    if adapter is None:
        mapper = build_mapper(IDEncoderConfig(cross_attention_dim=unet.config.cross_attention_dim,
                                              clip_dim=vision.config.hidden_size, face_tokens=face_tokens))
    else:
        mapper = load_id_module(adapter, unet, kind)
    cfg = mapper.config
    if cfg.uses_clip and cfg.clip_dim != vision.config.hidden_size:
        raise AdapterError(
            f"the adapter (kind {cfg.kind}) expects CLIP image states of width {cfg.clip_dim}, the image encoder "
            f"in {enc_dir} gives {vision.config.hidden_size}: use the image encoder the adapter was trained with "
            "(ViT-H/14, width 1280, for the SDXL face adapters)"
        )
    index = json.loads((base / "model_index.json").read_text()) if (base / "model_index.json").is_file() else {}
    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    face = None
    if face_models is not None:
        from ..face import FaceEmbedder

        face = FaceEmbedder.from_folder(face_models)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=load_prompt_tokenizer(base / "tokenizer"),
        tokenizer_2=load_prompt_tokenizer(base / "tokenizer_2"),
        id_encoder=IDEncoder(vision, mapper),
        scheduler_config=scheduler_config,
        clip_image=ClipImageConfig.from_folder(enc_dir, vision.config.image_size),
        face=face,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        sources={"base": str(base), "image_encoder": str(enc_dir), "adapter": str(adapter) if adapter else "fresh"},
    )
