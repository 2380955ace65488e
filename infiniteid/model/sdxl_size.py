"""Random-weight components with SDXL base 1.0's real architecture, for speed and size work.

Weights do not change how long a kernel runs, so a benchmark or an export check at
SDXL's size needs the architecture, not the checkpoint (which nothing here may
download). The configs below are SDXL base 1.0's ``unet``, ``vae``,
``text_encoder`` (CLIP ViT-L/14 text), ``text_encoder_2`` (OpenCLIP ViT-bigG/14
text) and the CLIP ViT-H/14 image encoder of the ID module, with Infinite-ID's
mapper at its defaults (``IDEncoderConfig()``: 2048-wide tokens, 261 of them).
Tokenizers are the tiny ones: they only turn prompts into ids below the vocabulary
size, which costs the same whatever the vocabulary.
"""
from __future__ import annotations

from typing import Union

import torch

from ..imageproc import ClipImageConfig
from .id_encoder import IDEncoder, IDEncoderConfig, build_mapper
from .pipeline import Components
from .processors import install_processors
from .tiny import BOS, EOS, TINY_SCHEDULER_CONFIG, tiny_tokenizer

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)

#: (hidden, intermediate, heads, layers, projection, activation)
CLIP_L_TEXT = (768, 3072, 12, 12, 768, "quick_gelu")
OPENCLIP_BIGG_TEXT = (1280, 5120, 20, 32, 1280, "gelu")
CLIP_H_VISION = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
    projection_dim=1024, image_size=224, patch_size=14, hidden_act="gelu",
)
VOCAB = 49408


def sdxl_size_components(device: Union[str, torch.device] = "cpu", seed: int = 0) -> Components:
    """Every component at SDXL's size with Infinite-ID's processors installed (fp32 weights).

    Weights are initialised on ``device`` (2.6 B U-Net parameters initialise in
    seconds on a GPU, minutes on a CPU); cast with the pipeline's ``dtype``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    tok1, tok2 = tiny_tokenizer(EOS), tiny_tokenizer("!")
    ids = dict(
        bos_token_id=tok1.tokenizer.token_to_id(BOS), eos_token_id=tok1.tokenizer.token_to_id(EOS),
        pad_token_id=tok1.pad_id, vocab_size=VOCAB,
    )

    def text_config(hidden, inter, heads, layers, proj, act) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                              num_hidden_layers=layers, projection_dim=proj, hidden_act=act, **ids)

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
        install_processors(unet)
        vae = AutoencoderKL(**SDXL_VAE).eval()
        te1 = CLIPTextModel(text_config(*CLIP_L_TEXT)).eval()
        te2 = CLIPTextModelWithProjection(text_config(*OPENCLIP_BIGG_TEXT)).eval()
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H_VISION)).eval()
        id_encoder = IDEncoder(vision, build_mapper(IDEncoderConfig())).eval()
    return Components(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        id_encoder=id_encoder, scheduler_config=dict(TINY_SCHEDULER_CONFIG), clip_image=ClipImageConfig(size=224),
        sources={"model": f"sdxl-size random weights (seed={seed})"},
    )
