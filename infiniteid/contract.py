"""The graph contract: component names, tensor names, dtypes and symbolic shapes.

The ONNX export writes graphs with exactly these inputs and outputs; the runtime's
backends (onnxruntime, TensorRT) bind tensors by these names; the manifest records
them per bundle. Torch-free, so the runtime can import it.

Symbolic dimensions (strings) name what varies; every other dimension is fixed by
the model and filled in from the model's config at export time:

* ``batch``: U-Net batch, both streams: ``[text_uncond, text_cond, id_uncond, id_cond]``
  (see :mod:`infiniteid.layout`); ``pairs`` = ``batch / 2`` = the ID-stream half;
* ``images``: prompts / faces / latents fed to the other encoders;
* ``latent_height``, ``latent_width``: pixels / 8;
* ``id_tokens``: identity tokens per sample (grows when identities are mixed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

Dim = Union[int, str]

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
ID_ENCODER = "id_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, ID_ENCODER, UNET, VAE_DECODER)


@dataclass(frozen=True)
class TensorContract:
    name: str
    dtype: str  # "float32" | "int64"; float tensors become float16 in fp16 graphs
    shape: Tuple[Dim, ...]


@dataclass(frozen=True)
class ComponentContract:
    name: str
    inputs: Tuple[TensorContract, ...]
    outputs: Tuple[TensorContract, ...]
    fp16_ok: bool = True  # the VAE stays fp32 unless asked: SDXL's VAE overflows in fp16

    def input(self, name: str) -> TensorContract:
        return next(t for t in self.inputs if t.name == name)


def contracts(
    *,
    text_hidden: int,
    text_hidden_2: int,
    pooled_dim: int,
    cross_attention_dim: int,
    clip_image_size: int,
    face_embed_dim: int = 512,
    max_length: int = 77,
    latent_channels: int = 4,
) -> Dict[str, ComponentContract]:
    """All components' contracts for a model of the given widths (SDXL: 768, 1280, 1280, 2048, 224)."""
    f, i = "float32", "int64"
    T = TensorContract
    return {
        TEXT_ENCODER: ComponentContract(
            TEXT_ENCODER,
            inputs=(T("input_ids", i, ("images", max_length)),),
            outputs=(T("hidden_states", f, ("images", max_length, text_hidden)),),
        ),
        TEXT_ENCODER_2: ComponentContract(
            TEXT_ENCODER_2,
            inputs=(T("input_ids", i, ("images", max_length)),),
            outputs=(
                T("hidden_states", f, ("images", max_length, text_hidden_2)),
                T("text_embeds", f, ("images", pooled_dim)),
            ),
        ),
        ID_ENCODER: ComponentContract(
            ID_ENCODER,
            inputs=(
                T("face_embeds", f, ("images", face_embed_dim)),
                T("clip_pixels", f, ("images", 3, clip_image_size, clip_image_size)),
            ),
            outputs=(T("id_embeds", f, ("images", "id_tokens", cross_attention_dim)),),
        ),
        UNET: ComponentContract(
            UNET,
            inputs=(
                T("sample", f, ("batch", latent_channels, "latent_height", "latent_width")),
                T("timestep", f, (1,)),
                T("encoder_hidden_states", f, ("batch", max_length, cross_attention_dim)),
                T("text_embeds", f, ("batch", pooled_dim)),
                T("time_ids", f, ("batch", 6)),
                T("id_embeds", f, ("pairs", "id_tokens", cross_attention_dim)),
                T("id_scale", f, ("pairs",)),
            ),
            outputs=(T("noise_pred", f, ("batch", latent_channels, "latent_height", "latent_width")),),
        ),
        VAE_DECODER: ComponentContract(
            VAE_DECODER,
            inputs=(T("latent", f, ("images", latent_channels, "latent_height", "latent_width")),),
            outputs=(T("images", f, ("images", 3, "height", "width")),),
            fp16_ok=False,
        ),
    }
