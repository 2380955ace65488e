"""Identity-enhanced training's objective, and the seeded batches it eats.

:class:`IdentityTrainingModel` is the one ``nn.Module`` the trainer wraps (DDP and
mixed precision through Accelerate). Its forward is the paper's loss:

* ``c_id = mapper(face embedding, CLIP states of the reference crop)``; with
  probability ``id_dropout`` a sample's ``c_id`` becomes the unconditional tokens
  (the mapper on a zero embedding and on the CLIP states of an all-zero image), so
  guidance works at inference;
* the target photo's latents are noised at a timestep drawn uniformly (the
  paper's) or from a logit-normal density (:class:`TimestepSampling`), through the
  DDPM forward process of the model's own scheduler config;
* the frozen U-Net runs with every ``attn2`` in training mode (identity tokens
  only, text cross-attention off; :data:`~infiniteid.model.processors.TRAINING`)
  and the empty prompt as its text inputs;
* loss: MSE between the prediction and the noise (or the velocity, for a
  ``v_prediction`` model).

Trainable: the ID mapper and every ``attn2``'s ``to_k_ip``/``to_v_ip``; everything
else is frozen (:meth:`IdentityTrainingModel.trainable_named_parameters`).

:func:`make_batch` draws sample ``k`` of optimizer step ``s`` from a generator
seeded with ``(seed, s, k)`` alone, so which process computes it, and whether the
run was resumed, changes nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..generation import sdxl_time_ids
from ..imageproc import ClipImageConfig, clip_pixels
from ..model.id_encoder import IDEncoder
from ..model.pipeline import Components
from ..model.processors import KWARG, TRAINING, IDConditioning, id_processors
from .config import TimestepSampling
from .data import PreparedData, sample_indices


class IdentityTrainingModel(nn.Module):
    """Frozen SDXL U-Net + ID encoder (frozen CLIP, trainable mapper) -> the training loss."""

    def __init__(self, components: Components, resolution: int):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = components.unet
        self.id_encoder: IDEncoder = components.id_encoder
        if not id_processors(self.unet):
            raise ValueError("the U-Net has no Infinite-ID processors installed")
        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"training supports epsilon and v_prediction models, not {self.prediction_type!r}")
        embeds, pooled = _empty_prompt(components)
        self.register_buffer("empty_embeds", embeds, persistent=False)
        self.register_buffer("empty_pooled", pooled, persistent=False)
        self.register_buffer("time_ids", torch.from_numpy(sdxl_time_ids(resolution, resolution)), persistent=False)
        self.requires_grad_(False)
        for _, p in self.trainable_named_parameters():
            p.requires_grad_(True)

    def trainable_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """The ID mapper's and every ``attn2`` projection's parameters, in a fixed order."""
        out = [(f"mapper.{n}", p) for n, p in self.id_encoder.mapper.named_parameters()]
        for name, proc in id_processors(self.unet).items():
            out += [(f"attn2.{name}.{n}", p) for n, p in proc.named_parameters()]
        return out

    @torch.no_grad()
    def clip_states(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.id_encoder.clip_states(pixels)

    def identity_tokens(self, face_embeds: torch.Tensor, clip_pixels_: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """``c_id`` per sample, the unconditional tokens where ``drop`` is set."""
        mapper = self.id_encoder.mapper
        c_id = mapper(face_embeds, self.clip_states(clip_pixels_))
        zero_face = torch.zeros_like(face_embeds[:1])
        uncond = mapper(zero_face, self.clip_states(torch.zeros_like(clip_pixels_[:1])))
        return torch.where(drop.view(-1, 1, 1), uncond.expand_as(c_id), c_id)

    def forward(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        face_embeds: torch.Tensor,
        clip_pixels: torch.Tensor,
        drop: torch.Tensor,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The loss of one micro-batch. ``prompt_embeds``/``pooled_prompt`` replace the
        empty prompt (only tests use them: in training mode the prompt must not matter)."""
        b = latents.shape[0]
        dtype = next(self.unet.parameters()).dtype
        c_id = self.identity_tokens(face_embeds.to(dtype), clip_pixels.to(dtype), drop)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        embeds = self.empty_embeds.expand(b, -1, -1) if prompt_embeds is None else prompt_embeds
        pooled = self.empty_pooled.expand(b, -1) if pooled_prompt is None else pooled_prompt
        pred = self.unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=embeds.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": self.time_ids.expand(b, -1).to(dtype)},
            cross_attention_kwargs={KWARG: IDConditioning(id_embeds=c_id, mode=TRAINING)},
        ).sample
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def _empty_prompt(c: Components) -> Tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's embeddings ``(1, 77, C)`` and pooled vector ``(1, P)`` (what
    the U-Net gets as text in training: text cross-attention is off)."""
    ids1 = torch.from_numpy(c.tokenizer([""]))
    ids2 = torch.from_numpy(c.tokenizer_2([""]))
    h1 = c.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
    out2 = c.text_encoder_2(ids2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1).float(), out2.text_embeds.float()


def sample_seed(seed: int, step: int, k: int) -> np.random.Generator:
    """The generator of global sample ``k`` of optimizer step ``step``."""
    return np.random.default_rng([seed, step, k])


def draw_timestep(rng: np.random.Generator, num_train_timesteps: int,
                  sampling: Optional[TimestepSampling] = None) -> int:
    """One training timestep from the sample's generator (one draw of ``rng`` either way,
    so the pair, drop and noise of a sample do not depend on the scheme)."""
    if sampling is None or sampling.scheme == "uniform":
        return int(rng.integers(num_train_timesteps))
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(int(rng.integers(2**63)))
    u = compute_density_for_timestep_sampling(sampling.scheme, 1, logit_mean=sampling.logit_mean,
                                              logit_std=sampling.logit_std, generator=g)
    return min(int(float(u[0]) * num_train_timesteps), num_train_timesteps - 1)


def make_batch(
    data: PreparedData,
    partners: Sequence[np.ndarray],
    sample_ids: Sequence[int],
    step: int,
    seed: int,
    clip_cfg: ClipImageConfig,
    num_train_timesteps: int,
    id_dropout: float,
    timesteps: Optional[TimestepSampling] = None,
) -> Dict[str, torch.Tensor]:
    """The inputs of :meth:`IdentityTrainingModel.forward` for global samples ``sample_ids``."""
    rows = []
    for k in sample_ids:
        rng = sample_seed(seed, step, int(k))
        target, ref = sample_indices(rng, partners)
        t = draw_timestep(rng, num_train_timesteps, timesteps)
        drop = bool(rng.random() < id_dropout)
        noise = rng.standard_normal(data.latents.shape[1:], dtype=np.float32)
        rows.append((target, ref, t, drop, noise))
    return {
        "latents": torch.from_numpy(np.stack([data.latents[r[0]] for r in rows])),
        "noise": torch.from_numpy(np.stack([r[4] for r in rows])),
        "timesteps": torch.tensor([r[2] for r in rows], dtype=torch.long),
        "face_embeds": torch.from_numpy(np.stack([data.embeddings[r[1]] for r in rows])),
        "clip_pixels": torch.from_numpy(np.stack([clip_pixels(data.clip_crops[r[1]], clip_cfg) for r in rows])),
        "drop": torch.tensor([r[3] for r in rows], dtype=torch.bool),
    }


def micro_batch_ids(step_batch: int, processes: int, rank: int, micro: int, batch_size: int) -> List[int]:
    """Global sample ids of one process's micro-batch: micro-step ``micro`` of every
    process comes before micro-step ``micro + 1``, so the global batch of a step is
    ``0 .. batch_size * processes * grad_accum - 1`` whatever the split."""
    start = (micro * processes + rank) * batch_size
    assert start + batch_size <= step_batch
    return list(range(start, start + batch_size))
