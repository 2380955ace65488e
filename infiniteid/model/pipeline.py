"""``InfiniteIDPipeline``: the PyTorch reference of Infinite-ID's two-stream inference.

Every other backend (onnxruntime, TensorRT) is checked against this code, so it
stays a plain, readable loop:

1. encode prompts (two CLIP text encoders) and identities (face front end ->
   ArcFace embedding and aligned crop -> ID encoder -> ``c_id``);
2. both streams start from the same seeded noise (:func:`initial_noise`);
3. each step runs one U-Net call over ``[text_uncond, text_cond, id_uncond,
   id_cond]`` (:mod:`infiniteid.layout`), guides each stream, and steps the
   scheduler once over the stacked latents ``[text; id]``;
4. the VAE (fp32) decodes the ID stream (and the text stream on request).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import generation as gen
from ..arrays import concat
from ..imageproc import ClipImageConfig, clip_pixels
from ..layout import BatchLayout, guide, split_streams, unet_batch
from ..tokenize import PromptTokenizer
from .id_encoder import IDEncoder
from .processors import INFERENCE, KWARG, IDConditioning, install_processors
from .schedulers import make_torch_scheduler


@dataclass
class Components:
    """Everything the pipeline runs. ``face`` is the face front end (may be None when
    callers pass precomputed face embeddings and crops)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: PromptTokenizer
    tokenizer_2: PromptTokenizer
    id_encoder: IDEncoder
    scheduler_config: dict
    clip_image: ClipImageConfig
    face: Any = None
    force_zeros_for_empty_prompt: bool = True
    sources: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)  # LoRAs fused into the weights (infiniteid.model.lora.FusedLora)


@dataclass
class FaceInput:
    """A face already through the front end: ArcFace embedding (512,) and an RGB crop for CLIP."""

    embedding: np.ndarray
    crop: np.ndarray


@dataclass
class GenerationOutput:
    """One batch's results, in request order; the same fields as the runtime's ``RuntimeOutput``.

    ``images``: the ID stream as PIL images; ``arrays``: the same as uint8 ``(H, W, 3)``;
    ``text_images``/``text_arrays``: the text stream, when asked for; ``latents``: final
    ``[text; id]`` latents.
    """

    images: List[Any]
    arrays: List[np.ndarray]
    text_images: Optional[List[Any]] = None
    text_arrays: Optional[List[np.ndarray]] = None
    latents: Optional[torch.Tensor] = None



class InfiniteIDPipeline:
    """Two-stream SDXL with Infinite-ID's processors. See the module docstring."""

    def __init__(
        self,
        components: Components,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: Union[bool, str, dict] = False,
    ):
        self.c = components
        self.device = torch.device(device)
        self.dtype = dtype
        c = components
        for m in (c.unet, c.text_encoder, c.text_encoder_2, c.id_encoder):
            _place(m, self.device, dtype)
        # SDXL's VAE overflows in fp16: it always runs in fp32.
        _place(c.vae, self.device, torch.float32)
        if not any(type(p).__name__ == "MixedSelfAttnProcessor" for p in c.unet.attn_processors.values()):
            install_processors(c.unet)
        self.resolution_multiple = gen.resolution_multiple(len(c.unet.config.down_block_types))
        # The U-Net's native size (1024 for SDXL, 128 for the tiny model): the default height and width.
        self.default_height = self.default_width = int(c.unet.config.sample_size) * gen.VAE_SCALE_FACTOR
        if compile:
            kwargs = compile if isinstance(compile, dict) else {"mode": None if compile is True else compile}
            self.compile_unet(**kwargs)

    def compile_unet(self, mode: Optional[str] = None, **kwargs: Any) -> None:
        """``torch.compile`` the U-Net in place (``mode``: None, "reduce-overhead", "max-autotune";
        other keywords go to ``torch.compile``). ``InfiniteIDPipeline(..., compile=True | MODE | {kwargs})``
        does the same at construction.

        The processors and the ``infinite_id`` keyword trace without graph breaks;
        the Triton kernel (``kernel_backend="triton"``, or "auto" on a GPU) stays one
        custom operator. The first call of each batch shape compiles (seconds to
        minutes); later calls with the same shapes reuse it.
        """
        self.c.unet.compile(mode=mode, **kwargs)

    # -- loading --------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, face: Any = None) -> "InfiniteIDPipeline":
        """The tiny random-weight model (see :mod:`infiniteid.model.tiny`)."""
        from .loading import tiny_components

        return cls(tiny_components(seed, face=face))

    @classmethod
    def from_pretrained(
        cls,
        base: Union[str, Path],
        image_encoder: Union[str, Path],
        adapter: Union[str, Path],
        face_models: Optional[Union[str, Path]] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        kind: str = "auto",
        compile: Union[bool, str, dict] = False,
    ) -> "InfiniteIDPipeline":
        """Local folders only: an SDXL diffusers folder, a CLIP image encoder folder, an adapter file
        (this project's format, or a published IP-Adapter face file of ``kind``)."""
        from .loading import load_components

        return cls(load_components(base, image_encoder, adapter, face_models, kind=kind), device=device, dtype=dtype, compile=compile)

    # -- encoders ---------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeds ``(N, 77, C)``, pooled ``(N, P)``): both encoders' penultimate
        hidden states side by side, and the second encoder's projected pooled output."""
        self.c.tokenizer.warn_truncated(list(prompts))
        ids1 = torch.from_numpy(self.c.tokenizer(prompts)).to(self.device)
        ids2 = torch.from_numpy(self.c.tokenizer_2(prompts)).to(self.device)
        h1 = self.c.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = self.c.text_encoder_2(ids2, output_hidden_states=True)
        return concat([h1, out2.hidden_states[-2]], axis=-1), out2.text_embeds

    def encode_negative(self, negatives: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = self.encode_prompts(negatives)
        if self.c.force_zeros_for_empty_prompt:
            empty = torch.tensor([not n for n in negatives], device=self.device).view(-1, 1)
            embeds = torch.where(empty.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty, torch.zeros_like(pooled), pooled)
        return embeds, pooled

    def face_input(self, face: Any) -> FaceInput:
        """A face image (path, PIL, array) through the face front end, or a ready FaceInput."""
        if isinstance(face, FaceInput):
            return face
        if self.c.face is None:
            raise ValueError("this pipeline has no face front end; pass FaceInput(embedding, crop) instead of images")
        r = self.c.face.embed(face)
        return FaceInput(embedding=r.embedding, crop=r.clip_crop)

    @torch.no_grad()
    def encode_faces(self, faces: Sequence[Any]) -> torch.Tensor:
        """Faces -> ``c_id`` per face, ``(F, T_id, C)``."""
        inputs = [self.face_input(f) for f in faces]
        emb = torch.from_numpy(np.stack([i.embedding for i in inputs]).astype(np.float32))
        pix = torch.from_numpy(np.stack([clip_pixels(i.crop, self.c.clip_image) for i in inputs]))
        return self.c.id_encoder(emb.to(self.device, self.dtype), pix.to(self.device, self.dtype))

    @torch.no_grad()
    def unconditional_identity(self) -> torch.Tensor:
        return self.c.id_encoder.unconditional(1)[0]

    def identity_tokens(self, request: gen.GenerationRequest) -> Tuple[torch.Tensor, torch.Tensor]:
        """One request's ``(c_id, uncond c_id)``, each ``(T, C)``."""
        c_ids = list(self.encode_faces(request.faces))
        return gen.combine_identities(c_ids, self.unconditional_identity(), request.identity)

    # -- generation -------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[gen.GenerationRequest],
        settings: Optional[gen.BatchSettings] = None,
        noise: Optional[np.ndarray] = None,
        progress: bool = True,
    ) -> GenerationOutput:
        """One batch of requests sharing ``settings``. ``noise``: optional initial latents
        ``(N, 4, H/8, W/8)``; by default each request's seed draws its own."""
        if not requests:
            raise gen.InvalidRequest("no requests to generate")
        settings = settings or gen.BatchSettings(height=self.default_height, width=self.default_width)
        settings.validate(self.resolution_multiple)
        for r in requests:
            r.validate()
        h, w = settings.height, settings.width
        layout = BatchLayout(images=len(requests), cfg=settings.cfg)
        if noise is None:
            noise = np.stack([gen.initial_noise(r.seed, h, w) for r in requests])
        if tuple(noise.shape) != gen.latent_shape(len(requests), h, w):
            raise gen.InvalidRequest(f"noise must have shape {gen.latent_shape(len(requests), h, w)}, got {noise.shape}")
        groups = gen.identity_groups(requests)
        if len(groups) > 1:  # different ID-token counts cannot share a U-Net call: one sub-batch per count
            noise = np.asarray(noise)
            parts = [self.generate([requests[i] for i in g], settings, noise[g], progress) for g in groups]
            return gen.merge_outputs(groups, parts)

        cond = self.conditioning(requests, settings)
        scheduler = make_torch_scheduler(settings.scheduler, self.c.scheduler_config)
        scheduler.set_timesteps(settings.steps)
        n = torch.from_numpy(np.asarray(noise, dtype=np.float32)).to(self.device)
        latents = concat([n, n]) * scheduler.init_noise_sigma  # both streams, same noise
        guidance = torch.from_numpy(gen.guidance_array(requests)).to(self.device)

        for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
            x = scheduler.scale_model_input(unet_batch(latents, layout), t).to(self.dtype)
            eps = self.c.unet(
                x,
                t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                cross_attention_kwargs={KWARG: cond[KWARG]},
            ).sample.float()
            latents = scheduler.step(guide(eps, layout, guidance), t, latents).prev_sample

        text_latents, id_latents = split_streams(latents)
        arrays = self.decode(id_latents)
        text_arrays = self.decode(text_latents) if settings.return_text_stream else None
        return GenerationOutput(
            **gen.image_fields(arrays, text_arrays),
            latents=latents,
        )

    def conditioning(self, requests, settings: gen.BatchSettings) -> dict:
        """U-Net inputs that stay fixed over the steps (assembled by :func:`gen.unet_conditioning`)."""
        prompt = self.encode_prompts([r.prompt for r in requests])
        negative = self.encode_negative([r.negative_prompt for r in requests]) if settings.cfg else None
        f = gen.unet_conditioning(requests, settings, prompt, negative, [self.identity_tokens(r) for r in requests])
        tensor = lambda x: torch.from_numpy(x).to(self.device, self.dtype)  # noqa: E731
        return {
            "encoder_hidden_states": f["encoder_hidden_states"].to(self.dtype),
            "text_embeds": f["text_embeds"].to(self.dtype),
            "time_ids": tensor(f["time_ids"]),
            KWARG: IDConditioning(
                id_embeds=f["id_embeds"].to(self.dtype),
                id_scale=tensor(f["id_scale"]),
                mixed_attention=settings.mixed_attention,
                adain=settings.adain,
                mode=INFERENCE,
            ),
        }

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> List[np.ndarray]:
        vae = self.c.vae
        x = vae.decode(latents.float() / vae.config.scaling_factor).sample
        return list(gen.to_uint8(x.cpu().numpy()))

    def __call__(self, prompt: str, face: Any, **kwargs: Any) -> GenerationOutput:
        """One image: ``pipe("a photo of a person", face_image, seed=1, steps=30, ...)``.

        Keyword arguments are those of :class:`GenerationRequest` (``negative_prompt``,
        ``id_scale``, ``guidance``, ``seed``, ``identity``) and :class:`BatchSettings`.
        ``face`` may be a list to mix identities.
        """
        faces = list(face) if isinstance(face, (list, tuple)) else [face]
        req_keys = set(gen.GenerationRequest.__dataclass_fields__) - {"prompt", "faces"}
        req = gen.GenerationRequest(prompt=prompt, faces=faces, **{k: kwargs.pop(k) for k in list(kwargs) if k in req_keys})
        noise = kwargs.pop("noise", None)
        progress = kwargs.pop("progress", True)
        kwargs.setdefault("height", self.default_height)
        kwargs.setdefault("width", self.default_width)
        return self.generate([req], gen.BatchSettings(**kwargs), noise=noise, progress=progress)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move for inference; cast only when needed (diffusers warns on every dtype cast)."""
    p = next(module.parameters())
    module.to(device)
    if p.dtype != dtype:
        module.to(dtype)
    module.eval().requires_grad_(False)


def settings_record(request: gen.GenerationRequest, settings: gen.BatchSettings) -> str:
    """Every setting of a generation as JSON (written next to images)."""
    return json.dumps({"request": gen.describe(request), "settings": settings.to_dict()}, indent=2)
