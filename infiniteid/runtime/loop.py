"""The denoising loop: what it needs (:class:`LoopInputs`) and the host version of it.

One step of Infinite-ID's loop, for latents ``[text images; id images]``:

1. expand the latents to U-Net rows ``[text_uncond, text_cond, id_uncond, id_cond]``
   (:func:`infiniteid.layout.unet_batch`) and scale them for the scheduler;
2. one U-Net call over both streams with the fixed conditioning feeds;
3. classifier-free guidance per stream (:func:`infiniteid.layout.guide`);
4. one scheduler step over the stacked latents.

:func:`host_loop` does this with host numpy arrays through any backend's ``run``.
A backend that keeps the latents on its device (TensorRT) implements
:class:`~infiniteid.runtime.backend.DeviceLoop` and receives the same
:class:`LoopInputs`; the scheduler object offers ``step_coefficients(i)`` so the
step can be done on the device. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
from tqdm.auto import tqdm

from ..contract import UNET
from ..layout import BatchLayout, guide, unet_batch
from .backend import Backend


@dataclass
class LoopInputs:
    """Everything one batch's denoising loop needs; the same for every backend.

    ``latents``: float32 ``(2 * images, 4, H/8, W/8)``, rows ``[text; id]``, already
    multiplied by the scheduler's ``init_noise_sigma``.
    ``unet_feeds``: the U-Net inputs that stay fixed over the steps
    (``encoder_hidden_states``, ``text_embeds``, ``time_ids``, ``id_embeds``,
    ``id_scale``), in the batch layout; ``sample`` and ``timestep`` change per step.
    ``timesteps``: the scheduler's timesteps, in order (``scheduler.timesteps``).
    ``scheduler``: a numpy scheduler after ``set_timesteps``; steps are addressed
    by their index ``i`` into ``timesteps``.
    ``guidance``: per-image guidance scale, ``(images, 1, 1, 1)`` float32, applied
    to each pair (ID sample ``k`` and text sample ``k`` share image ``k``'s scale).
    ``layout``: which U-Net rows are which stream and guidance half.
    """

    latents: np.ndarray
    unet_feeds: Dict[str, np.ndarray]
    timesteps: np.ndarray
    scheduler: Any
    guidance: np.ndarray
    layout: BatchLayout
    progress: bool = True
    callback: Optional[Callable[[int, np.ndarray], None]] = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def timestep_feed(self, i: int) -> np.ndarray:
        """The U-Net's ``timestep`` input at step ``i``: float32 ``(1,)``."""
        return np.array([self.timesteps[i]], dtype=np.float32)


def _prev_sample(result: Any) -> np.ndarray:
    """A scheduler step's new latents (an array, or an object with ``prev_sample``)."""
    return np.asarray(getattr(result, "prev_sample", result), dtype=np.float32)


def host_loop(backend: Backend, loop: LoopInputs) -> np.ndarray:
    """Run the loop on the host through ``backend.run``; returns the final ``[text; id]`` latents."""
    latents = np.asarray(loop.latents, dtype=np.float32)
    sched = loop.scheduler
    for i in tqdm(range(loop.steps), desc="denoising", disable=not loop.progress, leave=False):
        x = np.asarray(sched.scale_model_input(unet_batch(latents, loop.layout), i), dtype=np.float32)
        feeds = dict(loop.unet_feeds, sample=x, timestep=loop.timestep_feed(i))
        eps = backend.run(UNET, feeds)["noise_pred"].astype(np.float32, copy=False)
        latents = _prev_sample(sched.step(guide(eps, loop.layout, loop.guidance), i, latents))
        if loop.callback is not None:
            loop.callback(i, latents)
    return latents
