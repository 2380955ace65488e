"""``Runtime``: Infinite-ID's two-stream generation from a bundle, without PyTorch.

This is :class:`infiniteid.model.pipeline.InfiniteIDPipeline` step for step, with
every network replaced by a backend call (``backend.run(component, feeds)``):

1. prompts -> the bundle's tokenizers -> ``text_encoder`` and ``text_encoder_2``
   -> prompt embeddings (both encoders' penultimate states side by side) and the
   pooled embedding; empty negative prompts become zeros where the model says so;
2. faces -> the face front end (insightface on onnxruntime: ArcFace embedding
   and aligned crop) or a precomputed face (anything with ``embedding`` and
   ``crop``) -> CLIP pixels -> ``id_encoder`` -> ``c_id``; the unconditional
   ``c_id`` is the ID encoder on a zero embedding and zero CLIP pixels;
   several faces are mixed or interpolated (:func:`infiniteid.generation.combine_identities`);
3. both streams start from the same seeded noise
   (:func:`infiniteid.generation.initial_noise`, or noise the caller passes, so
   runs are comparable across backends);
4. the denoising loop (:mod:`infiniteid.runtime.loop`): on the backend's device
   when it implements ``DeviceLoop``, on the host otherwise;
5. ``vae_decoder`` on the ID stream (and the text stream on request) -> uint8.

Every request keeps its own prompt, negative prompt, identity, ID scale,
guidance and seed; the batch shares :class:`~infiniteid.generation.BatchSettings`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import generation as gen
from ..bundle import BundleError
from ..contract import ID_ENCODER, TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER
from ..imageproc import ClipImageConfig, clip_pixels
from ..layout import BatchLayout, split_streams
from ..tokenize import MAX_LENGTH, PromptTokenizer
from .backend import Backend, DeviceLoop, make_backend
from .loader import Bundle
from .loop import LoopInputs, host_loop
from .ranges import check_feeds, identity_token_limit


@dataclass
class FaceInput:
    """A face already through the front end: ArcFace embedding ``(512,)`` and an RGB uint8 crop for CLIP.

    Any object with ``embedding`` and ``crop`` (or ``clip_crop``) attributes is
    accepted in its place, e.g. the PyTorch reference's ``FaceInput`` or the face
    front end's own result.
    """

    embedding: np.ndarray
    crop: np.ndarray


@dataclass
class RuntimeOutput:
    """One batch's results, in request order.

    ``images``: the ID stream as PIL images (what users want); ``arrays``: the same
    as uint8 ``(H, W, 3)``; ``text_images``/``text_arrays``: the text stream, when
    ``BatchSettings.return_text_stream`` is set; ``latents``: final ``[text; id]``
    latents; ``timings``: seconds per stage.
    """

    images: List[Any]
    arrays: List[np.ndarray]
    text_images: Optional[List[Any]] = None
    text_arrays: Optional[List[np.ndarray]] = None
    latents: Optional[np.ndarray] = None
    timings: Dict[str, float] = field(default_factory=dict)



def _as_face_input(face: Any) -> Optional[FaceInput]:
    """A precomputed face (duck-typed), or None when ``face`` is an image to detect in."""
    emb = getattr(face, "embedding", None)
    crop = getattr(face, "crop", None)
    if crop is None:
        crop = getattr(face, "clip_crop", None)
    if emb is None or crop is None:
        return None
    emb = np.asarray(emb, dtype=np.float32).reshape(-1)
    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise gen.InvalidRequest(f"a precomputed face crop must be RGB uint8 (H, W, 3), got {crop.dtype} {crop.shape}")
    return FaceInput(embedding=emb, crop=crop)


class Runtime:
    """Generation from a bundle on a swappable backend. See the module docstring.

    ``bundle``: a bundle folder or a loaded :class:`Bundle`. ``backend``: a backend
    name (``"ort"``, ``"trt"``) or a ready backend object. ``face_models``: the
    insightface model folder (overrides the one the manifest references); only
    needed when faces are given as images. The manifest's folder lies outside the
    bundle: it is used only when an export on this machine recorded it, or with
    ``trust_face_models=True``. ``backend_opts`` go to the backend
    (e.g. ``intra_op_threads`` for ``ort``).
    """

    def __init__(
        self,
        bundle: Union[str, Path, Bundle],
        backend: Union[str, Backend] = "ort",
        face_models: Optional[Union[str, Path]] = None,
        *,
        trust_face_models: bool = False,
        **backend_opts: Any,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        m = self.bundle.manifest
        if isinstance(backend, str):
            self.backend: Backend = make_backend(backend, self.bundle, **backend_opts)
        else:
            if backend_opts:
                raise TypeError("backend options only apply when the backend is given by name")
            self.backend = backend
        max_length = self._dim(TEXT_ENCODER, "input_ids", 1, MAX_LENGTH)
        tok1, tok2 = self.bundle.tokenizer_paths()[:2]
        self.tokenizer = self._tokenizer(tok1, max_length)
        self.tokenizer_2 = self._tokenizer(tok2, max_length)
        self.clip_image = self._clip_image_config()
        self.force_zeros_for_empty_prompt = bool(m.model.get("force_zeros_for_empty_prompt", True))
        res = m.resolution or {}
        self.resolution_multiple = int(res.get("multiple", gen.resolution_multiple(3)))
        self.min_size = int(res.get("min", 0) or 0)
        self.max_size = int(res.get("max", 0) or 0)
        self.default_height = int(res.get("default_height", 1024))
        self.default_width = int(res.get("default_width", 1024))
        self.face_models = Path(face_models).expanduser() if face_models is not None else None
        self.trust_face_models = bool(trust_face_models)
        self._face = None
        self._uncond_id: Optional[np.ndarray] = None

    # -- set-up helpers ----------------------------------------------------------
    def _dim(self, component: str, tensor: str, axis: int, default: int) -> int:
        d = self.bundle.component(component).tensor(tensor).shape[axis]
        return d if isinstance(d, int) else default

    def _tokenizer(self, path: Path, max_length: int) -> PromptTokenizer:
        from ..tokenize import TokenizerError

        try:
            return PromptTokenizer.from_file(path, max_length)
        except TokenizerError as e:
            raise BundleError(f"{path}: {e}") from None

    def _clip_image_config(self) -> ClipImageConfig:
        size = self._dim(ID_ENCODER, "clip_pixels", 2, 224)
        d = self.bundle.model.get("clip_image") or {}
        kwargs: Dict[str, Any] = {"size": int(d.get("size", size))}
        if "mean" in d:
            kwargs["mean"] = tuple(d["mean"])
        if "std" in d:
            kwargs["std"] = tuple(d["std"])
        cfg = ClipImageConfig(**kwargs)
        if cfg.size != size:
            raise BundleError(
                f"{self.bundle.path / 'manifest.json'}: clip_image size {cfg.size} differs from the ID encoder's input size {size}"
            )
        return cfg

    @property
    def face(self):
        """The face front end, created on first use from ``face_models`` or the manifest's folder."""
        if self._face is None:
            folder = self.face_models or self.bundle.face_models_folder(trust=self.trust_face_models)
            if folder is None:
                raise gen.InvalidRequest(
                    "faces were given as images but no face model folder is known: pass face_models "
                    "(--face-models DIR, an insightface folder such as antelopev2) or precomputed faces"
                )
            from ..face import FaceEmbedder

            self._face = FaceEmbedder.from_folder(folder, providers=self._face_providers())
        return self._face

    def _face_providers(self) -> List[Any]:
        """The face models run on onnxruntime too: on the backend's providers when it uses
        onnxruntime, else CUDA where a GPU is present, else the CPU (never a provider that
        is listed but cannot load, which onnxruntime-gpu does on machines without CUDA)."""
        providers = getattr(self.backend, "providers", None)
        if providers and getattr(self.backend, "name", "") == "ort":
            return list(providers)
        import onnxruntime as ort

        from .ort_backend import default_providers

        return default_providers(ort.get_available_providers())

    def _run(self, component: str, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """``backend.run`` after checking the feeds against the bundle's shape ranges (every backend alike)."""
        check_feeds(self.bundle.component(component), feeds)
        return self.backend.run(component, feeds)

    # -- encoders ------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """Prompts -> (embeds ``(N, 77, C)``, pooled ``(N, P)``), as the reference computes them."""
        prompts = list(prompts)
        self.tokenizer.warn_truncated(prompts)
        h1 = self._run(TEXT_ENCODER, {"input_ids": self.tokenizer(prompts)})["hidden_states"]
        out2 = self._run(TEXT_ENCODER_2, {"input_ids": self.tokenizer_2(prompts)})
        return np.concatenate([h1, out2["hidden_states"]], axis=-1), out2["text_embeds"]

    def encode_negative(self, negatives: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        embeds, pooled = self.encode_prompts(negatives)
        if self.force_zeros_for_empty_prompt:
            empty = np.array([not n for n in negatives])
            embeds = np.where(empty.reshape(-1, 1, 1), np.zeros_like(embeds), embeds)
            pooled = np.where(empty.reshape(-1, 1), np.zeros_like(pooled), pooled)
        return embeds, pooled

    def face_input(self, face: Any) -> FaceInput:
        """A face image (path, PIL, array) through the face front end, or a precomputed face."""
        ready = _as_face_input(face)
        if ready is not None:
            return ready
        r = self.face.embed(face)
        return FaceInput(embedding=np.asarray(r.embedding, dtype=np.float32), crop=np.asarray(r.clip_crop))

    def encode_faces(self, faces: Sequence[Any]) -> np.ndarray:
        """Faces -> ``c_id`` per face, ``(F, T_id, C)``."""
        inputs = [self.face_input(f) for f in faces]
        emb = np.stack([i.embedding for i in inputs]).astype(np.float32)
        pix = np.stack([clip_pixels(i.crop, self.clip_image) for i in inputs])
        return self._run(ID_ENCODER, {"face_embeds": emb, "clip_pixels": pix})["id_embeds"]

    def unconditional_identity(self) -> np.ndarray:
        """The unconditional ``c_id`` ``(T_id, C)``: the ID encoder on a zero embedding and zero
        CLIP pixels (an all-zero image after CLIP normalisation). Fixed per bundle, so cached."""
        if self._uncond_id is None:
            spec = self.bundle.component(ID_ENCODER)
            emb_dim = spec.tensor("face_embeds").shape[1]
            size = self.clip_image.size
            feeds = {
                "face_embeds": np.zeros((1, int(emb_dim)), dtype=np.float32),
                "clip_pixels": np.zeros((1, 3, size, size), dtype=np.float32),
            }
            self._uncond_id = self._run(ID_ENCODER, feeds)["id_embeds"][0]
        return self._uncond_id

    def identity_tokens(self, request: gen.GenerationRequest) -> Tuple[np.ndarray, np.ndarray]:
        """One request's ``(c_id, uncond c_id)``, each ``(T, C)``."""
        c_ids = list(self.encode_faces(request.faces))
        return gen.combine_identities(c_ids, self.unconditional_identity(), request.identity)

    # -- generation ----------------------------------------------------------------
    def check(self, requests: Sequence[gen.GenerationRequest], settings: gen.BatchSettings) -> None:
        """Refuse what this bundle cannot do, before any work."""
        if not requests:
            raise gen.InvalidRequest("no requests to generate")
        settings.validate(self.resolution_multiple)
        gen.check_resolution(settings.height, settings.width, self.resolution_multiple, self.min_size, self.max_size)
        one, most = identity_token_limit(self.bundle.component(UNET), self.bundle.model.get("id_tokens"))
        for k, r in enumerate(requests):
            r.validate()
            tokens = one * gen.identity_count(r)
            if tokens > most:
                raise gen.InvalidRequest(
                    f"request {k + 1} mixes {len(r.faces)} faces ({tokens} identity tokens); this bundle takes at most "
                    f"{most // one} faces per request ({most} tokens): pass fewer faces or re-export with "
                    f"--max-identities {len(r.faces)}"
                )
        max_images = self.bundle.manifest.max_images
        if len(requests) > max_images:
            raise gen.InvalidRequest(
                f"{len(requests)} requests in one batch, this bundle was exported for at most {max_images}"
            )
        for switch in ("mixed_attention", "adain"):
            baked = self.bundle.unet_option(switch)
            wanted = getattr(settings, switch)
            if baked is not None and bool(baked) != bool(wanted):
                state = "on" if baked else "off"
                raise gen.InvalidRequest(
                    f"this bundle's U-Net was exported with {switch.replace('_', ' ')} {state}; "
                    f"re-export with it {'on' if wanted else 'off'} to run this setting"
                )

    def conditioning(
        self,
        requests: Sequence[gen.GenerationRequest],
        settings: gen.BatchSettings,
        identities: Optional[Sequence[Tuple[np.ndarray, np.ndarray]]] = None,
    ) -> Dict[str, np.ndarray]:
        """U-Net inputs that stay fixed over the steps (assembled by :func:`gen.unet_conditioning`).

        ``identities``: one ``(c_id, uncond c_id)`` per request computed earlier (a server's
        ``c_id`` cache); by default each request's faces are encoded here."""
        prompt = self.encode_prompts([r.prompt for r in requests])
        negative = self.encode_negative([r.negative_prompt for r in requests]) if settings.cfg else None
        if identities is None:
            identities = [self.identity_tokens(r) for r in requests]
        elif len(identities) != len(requests):
            raise gen.InvalidRequest(f"{len(identities)} identities given for {len(requests)} requests")
        feeds = gen.unet_conditioning(requests, settings, prompt, negative, identities)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}

    def generate(
        self,
        requests: Sequence[gen.GenerationRequest],
        settings: Optional[gen.BatchSettings] = None,
        noise: Optional[np.ndarray] = None,
        progress: bool = True,
        identities: Optional[Sequence[Tuple[np.ndarray, np.ndarray]]] = None,
    ) -> RuntimeOutput:
        """One batch of requests sharing ``settings``. ``noise``: optional initial latents
        ``(N, 4, H/8, W/8)``; by default each request's seed draws its own. ``identities``:
        precomputed ``(c_id, uncond c_id)`` per request (see :meth:`conditioning`)."""
        from .schedulers import make_scheduler

        settings = settings or gen.BatchSettings(height=self.default_height, width=self.default_width)
        self.check(requests, settings)
        h, w = settings.height, settings.width
        if noise is None:
            noise = np.stack([gen.initial_noise(r.seed, h, w) for r in requests])
        noise = np.asarray(noise, dtype=np.float32)
        if tuple(noise.shape) != gen.latent_shape(len(requests), h, w):
            raise gen.InvalidRequest(f"noise must have shape {gen.latent_shape(len(requests), h, w)}, got {noise.shape}")
        groups = gen.identity_groups(requests)
        if len(groups) > 1:  # different ID-token counts cannot share a U-Net call: one sub-batch per count
            parts = [
                self.generate([requests[i] for i in g], settings, noise[g], progress,
                              None if identities is None else [identities[i] for i in g])
                for g in groups
            ]
            return gen.merge_outputs(groups, parts)
        layout = BatchLayout(images=len(requests), cfg=settings.cfg)

        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        feeds = self.conditioning(requests, settings, identities)
        check_feeds(self.bundle.component(UNET), feeds)
        timings["encode"] = time.perf_counter() - t0

        scheduler = make_scheduler(settings.scheduler, self.bundle.manifest.scheduler_config)
        scheduler.set_timesteps(settings.steps)
        latents = np.concatenate([noise, noise]) * np.float32(scheduler.init_noise_sigma)
        loop = LoopInputs(
            latents=latents.astype(np.float32),
            unet_feeds=feeds,
            timesteps=np.asarray(scheduler.timesteps),
            scheduler=scheduler,
            guidance=gen.guidance_array(requests),
            layout=layout,
            progress=progress,
        )
        t0 = time.perf_counter()
        if isinstance(self.backend, DeviceLoop):
            latents = np.asarray(self.backend.denoise(loop), dtype=np.float32)
        else:
            latents = host_loop(self.backend, loop)
        timings["denoise"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        text_latents, id_latents = split_streams(latents)
        arrays = self.decode(id_latents)
        text_arrays = self.decode(text_latents) if settings.return_text_stream else None
        timings["decode"] = time.perf_counter() - t0
        return RuntimeOutput(
            **gen.image_fields(arrays, text_arrays),
            latents=latents,
            timings=timings,
        )

    def decode(self, latents: np.ndarray) -> List[np.ndarray]:
        """Latents -> uint8 ``(H, W, 3)`` images through ``vae_decoder``.

        The reference divides by the VAE's scaling factor before decoding. The export
        folds that division into the decoder graph and says so in the component's
        options (``scaling_in_graph``); a bundle without that option gets it here.
        """
        x = np.asarray(latents, dtype=np.float32)
        if not self.bundle.component(VAE_DECODER).options.get("scaling_in_graph", False):
            x = x / np.float32(self.vae_scaling_factor)
        images = self._run(VAE_DECODER, {"latent": x})["images"]
        return list(gen.to_uint8(images))

    @property
    def vae_scaling_factor(self) -> float:
        m = self.bundle.model
        for key in ("vae_scaling_factor", "scaling_factor"):
            if key in m:
                return float(m[key])
        vae = m.get("vae") if isinstance(m.get("vae"), dict) else {}
        if "scaling_factor" in vae:
            return float(vae["scaling_factor"])
        raise BundleError(f"{self.bundle.path / 'manifest.json'}: model.vae_scaling_factor is missing")

    def __call__(self, prompt: str, face: Any, **kwargs: Any) -> RuntimeOutput:
        """One image: ``rt("a photo of a person", face_image, seed=1, steps=30, ...)``; as the reference's ``__call__``."""
        faces = list(face) if isinstance(face, (list, tuple)) else [face]
        req_keys = set(gen.GenerationRequest.__dataclass_fields__) - {"prompt", "faces"}
        req = gen.GenerationRequest(prompt=prompt, faces=faces, **{k: kwargs.pop(k) for k in list(kwargs) if k in req_keys})
        noise = kwargs.pop("noise", None)
        progress = kwargs.pop("progress", True)
        kwargs.setdefault("height", self.default_height)
        kwargs.setdefault("width", self.default_width)
        return self.generate([req], gen.BatchSettings(**kwargs), noise=noise, progress=progress)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
