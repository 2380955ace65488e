"""Tiny, seeded, random-weight stand-ins for every SDXL / Infinite-ID component.

They have SDXL's *structure* (two CLIP text encoders whose hidden sizes add up to
the cross-attention width, a pooled projection, ``text_time`` added conditioning,
an 8x VAE, a CLIP vision tower, ArcFace-sized face embeddings) at a size that
runs a 4-step generation in seconds on two CPU cores. Tests and the demo use
them; their images are noise-like because the weights are random.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..tokenize import PromptTokenizer, configure_padding
from .id_encoder import IDEncoder, IDEncoderConfig, build_mapper
from .tiny_geometry import UNET_DOWN_BLOCKS, UNET_SAMPLE_SIZE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words the tiny tokenizer is trained on: enough to give prompts real, varied ids.
_CORPUS = (
    "a photo of a man woman person in comic book style oil painting watercolor portrait "
    "wearing a red blue green hat jacket dress glasses smiling standing sitting in the "
    "city forest beach snow at night sunset studio lighting cinematic close up of face "
    "astronaut chef knight wizard cyberpunk anime sketch pencil drawing high quality "
    "detailed blurry low resolution bad anatomy"
)

TINY_SCHEDULER_CONFIG = {
    # SDXL base's scheduler_config.json (the DDIM/Euler/DPM common keys).
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def _bpe_vocab_and_merges():
    """A deterministic CLIP-style BPE over the corpus words.

    Trained BPE breaks ties between equally frequent pairs in hash order, so two
    trainings number tokens differently; the tiny model must be bit-identical for a
    seed, so the vocabulary is built by rule instead: single characters (plain and
    word-final), then every word grown left to right one character per merge.
    Words outside the corpus fall apart into characters, as CLIP's BPE does.
    """
    words = sorted(set(_CORPUS.split()))
    chars = sorted({c for w in words for c in w} | set(",.:;'()-?!"))  # punctuation: no unknowns in prompts
    vocab = [BOS, EOS, "!"] + [t for c in chars for t in (c, c + "</w>")]
    merges = []
    for w in words:
        for k in range(2, len(w) + 1):
            last = w[k - 1] + ("</w>" if k == len(w) else "")
            merges.append((w[: k - 1], last))
    merges = sorted(set(merges), key=lambda m: (len(m[0]) + len(m[1]), m))
    vocab += [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab))
    return {t: i for i, t in enumerate(vocab)}, merges


def tiny_tokenizer(pad_token: str = EOS) -> PromptTokenizer:
    """A CLIP-like BPE tokenizer (lower-casing, ``</w>`` word ends, BOS/EOS); deterministic."""
    vocab, merges = _bpe_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return PromptTokenizer(configure_padding(tok, pad_token))


@dataclass
class TinySizes:
    """The tiny model's widths; SDXL's real values in comments."""

    text_hidden: int = 32  # 768 and 1280
    cross_attention_dim: int = 64  # 2048 = 768 + 1280
    pooled: int = 32  # 1280
    time_embed: int = 8  # 256
    clip_image_size: int = 32  # 224
    clip_patch: int = 8  # 14
    clip_hidden: int = 32  # 1280
    vocab: int = 320  # 49408; covers tiny_tokenizer()'s vocabulary


def tiny_text_encoders(sizes: TinySizes, tokenizer: PromptTokenizer):
    assert tokenizer.tokenizer.get_vocab_size() <= sizes.vocab, "TinySizes.vocab must cover the tiny tokenizer"
    eos_id = tokenizer.tokenizer.token_to_id(EOS)
    cfg = CLIPTextConfig(
        bos_token_id=tokenizer.tokenizer.token_to_id(BOS),
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_id,
        hidden_size=sizes.text_hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=sizes.vocab,
        projection_dim=sizes.pooled,
        hidden_act="gelu",
    )
    return CLIPTextModel(cfg).eval(), CLIPTextModelWithProjection(cfg).eval()


def tiny_unet(sizes: TinySizes) -> UNet2DConditionModel:
    """SDXL-shaped: 2 levels, cross-attention on the lower one, ``text_time`` conditioning."""
    return UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=UNET_DOWN_BLOCKS,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=sizes.time_embed,
        projection_class_embeddings_input_dim=sizes.pooled + 6 * sizes.time_embed,
        cross_attention_dim=sizes.cross_attention_dim,
        norm_num_groups=8,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """4 blocks, so 8x like SDXL's VAE, with SDXL's scaling factor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    ).eval()


def tiny_id_encoder(sizes: TinySizes) -> IDEncoder:
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=sizes.clip_hidden,
            intermediate_size=37,
            projection_dim=sizes.pooled,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=sizes.clip_image_size,
            patch_size=sizes.clip_patch,
        )
    ).eval()
    cfg = IDEncoderConfig(cross_attention_dim=sizes.cross_attention_dim, clip_dim=sizes.clip_hidden, face_hidden_dim=64)
    return IDEncoder(vision, build_mapper(cfg)).eval()

