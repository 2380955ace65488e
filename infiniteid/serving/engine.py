"""``ServingEngine``: the runtime as a server uses it.

* start-up: the bundle is loaded, its sha256 hashes verified
  (:meth:`~infiniteid.runtime.loader.Bundle.verify_hashes`; the log says what it
  read and how long it took; TensorRT engines too, once the backend has picked its
  folder), the backend created, and one warm-up generation run (``/readyz`` turns
  ready after it);
* identities: each face's ``c_id`` comes from the :class:`~.cache.IdentityCache` or
  from the face front end + ID encoder (called from request threads, off the
  batch's critical path, one at a time);
* batches: :meth:`run_batch` is only ever called from the batcher's single thread,
  so one batch at a time runs on the backend.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import astuple, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import generation as gen
from ..contract import ID_ENCODER
from ..runtime.generator import FaceInput, Runtime, RuntimeOutput
from .cache import IdentityCache, pixel_key
from .config import ServerConfig
from .forms import GenerateFields, RequestError
from .metrics import ServerMetrics

log = logging.getLogger("infiniteid.serving")

Identity = Tuple[np.ndarray, np.ndarray]


def encoder_hash(rt: Runtime) -> str:
    """What a cached ``c_id`` depends on besides the pixels: the ID encoder graph and
    weights (their manifest hashes) and the face model folder."""
    spec = rt.bundle.component(ID_ENCODER)
    folder = rt.face_models or rt.bundle.face_models_folder()
    parts = (spec.sha256, spec.external_sha256 or "", str(folder or ""))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class Prepared:
    """A request ready to queue: runtime request, batch settings, its identity, and the key
    of the batches it may join."""

    request: gen.GenerationRequest
    settings: gen.BatchSettings
    identity: Identity
    key: Tuple[Any, ...]


class ServingEngine:
    def __init__(self, runtime: Runtime, config: ServerConfig, metrics: ServerMetrics):
        self.rt = runtime
        self.config = config
        self.metrics = metrics
        bundle_max = runtime.bundle.manifest.max_images
        self.max_batch = min(config.max_batch or bundle_max, bundle_max)
        self.cache = IdentityCache(config.cache_bytes)
        self.encoder_hash = encoder_hash(runtime)
        self._id_lock = threading.Lock()
        self.startup: Dict[str, float] = {}

    @classmethod
    def load(cls, config: ServerConfig, metrics: ServerMetrics) -> "ServingEngine":
        """Load and verify the bundle, create the backend; logs what each step cost."""
        from ..runtime.loader import Bundle

        t0 = time.perf_counter()
        bundle = Bundle.load(config.bundle)
        t_load = time.perf_counter() - t0
        log.info("bundle %s loaded in %.2f s", config.bundle, t_load)
        hashed = None
        if config.verify_hashes and config.backend == "ort":  # before any graph is opened
            hashed = bundle.verify_hashes()
        t0 = time.perf_counter()
        rt = Runtime(bundle, backend=config.backend, face_models=config.face_models, **config.runtime_options())
        t_backend = time.perf_counter() - t0
        log.info("backend %s ready in %.2f s", config.backend, t_backend)
        if config.verify_hashes and hashed is None:  # the engine folder is the backend's choice: then, before any request
            hashed = bundle.verify_hashes(engine_folder=getattr(rt.backend, "folder", None))
        if hashed is not None:
            log.info("bundle %s: %s", config.bundle, hashed)
        else:
            log.warning("bundle %s: sha256 hashes NOT verified (--no-verify-hashes)", config.bundle)
        engine = cls(rt, config, metrics)
        engine.startup.update(load_s=t_load, backend_s=t_backend)
        if hashed is not None:
            engine.startup["verify_hashes_s"] = hashed.seconds
        return engine

    # -- per request (request threads) ----------------------------------------------
    def prepare(self, fields: GenerateFields, faces: Sequence[np.ndarray]) -> Prepared:
        """Check the request against the bundle, then build its identity (cache or encoder)."""
        rt = self.rt
        guidance = float(fields.guidance)
        settings = gen.BatchSettings(
            height=fields.height or rt.default_height,
            width=fields.width or rt.default_width,
            steps=fields.steps or self.config.default_steps,
            scheduler=fields.scheduler or gen.DEFAULT_SCHEDULER,
            mixed_attention=fields.mixed_attention,
            adain=fields.adain,
            cfg=guidance != 1.0,
        )
        request = gen.GenerationRequest(
            prompt=fields.prompt, faces=list(faces), negative_prompt=fields.negative_prompt,
            id_scale=fields.id_scale, guidance=guidance, seed=fields.seed,
            identity=gen.IdentityMix(mode=fields.identity_mode, alpha=fields.alpha),
        )
        try:
            rt.check([request], settings)
        except gen.InvalidRequest as e:
            raise RequestError(422, str(e), _field_of(str(e))) from None
        identity = self.identity(faces, request.identity)
        return Prepared(request, settings, identity, astuple(settings) + (identity[0].shape[0],))

    def identity(self, faces: Sequence[np.ndarray], mix: gen.IdentityMix) -> Identity:
        c_ids = [self.face_identity(f) for f in faces]
        return gen.combine_identities(c_ids, self.rt.unconditional_identity(), mix)

    def face_identity(self, rgb: np.ndarray) -> np.ndarray:
        """One face's ``c_id`` ``(T_id, C)``: from the cache, else detection + ArcFace + CLIP + ID encoder."""
        from ..face.errors import FaceError

        key = pixel_key(rgb, self.encoder_hash)
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.inc()
            return hit
        self.metrics.cache_misses.inc()
        with self._id_lock:
            t0 = time.perf_counter()
            try:
                self.metrics.face_frontend.inc()
                face = self.rt.face_input(rgb)
            except FaceError as e:
                raise RequestError(422, f"face: {e}", "face") from None
            c_id = self.rt.encode_faces([face])[0]
            self.metrics.stage.labels("identity").observe(time.perf_counter() - t0)
        self.cache.put(key, c_id)
        self.metrics.cache_bytes.set(self.cache.bytes)
        return c_id

    # -- per batch (the batcher's one thread) ----------------------------------------
    def run_batch(self, items: Sequence[Prepared]) -> RuntimeOutput:
        out = self.rt.generate([i.request for i in items], items[0].settings, progress=False,
                               identities=[i.identity for i in items])
        for stage, key in (("encode", "encode"), ("denoise", "denoise"), ("vae", "decode")):
            if key in out.timings:
                self.metrics.stage.labels(stage).observe(out.timings[key])
        return out

    def warmup(self) -> float:
        """One generation at the bundle's default size on a precomputed (blank) face, so the
        first user request does not pay for lazy initialisation. Returns its seconds."""
        rt = self.rt
        dim = int(rt.bundle.component(ID_ENCODER).tensor("face_embeds").shape[1])
        face = FaceInput(embedding=np.zeros(dim, np.float32), crop=np.zeros((64, 64, 3), np.uint8))
        t0 = time.perf_counter()
        rt.generate([gen.GenerationRequest("warm-up", faces=[face])],
                    gen.BatchSettings(height=rt.default_height, width=rt.default_width, steps=1), progress=False)
        seconds = time.perf_counter() - t0
        self.startup["warmup_s"] = seconds
        log.info("warm-up generation done in %.2f s", seconds)
        return seconds

    def describe(self) -> Dict[str, Any]:
        rt = self.rt
        return {
            "bundle": str(rt.bundle.path),
            "backend": rt.backend.name,
            "max_batch": self.max_batch,
            "default_height": rt.default_height,
            "default_width": rt.default_width,
            "resolution_multiple": rt.resolution_multiple,
            "min_size": rt.min_size,
            "max_size": rt.max_size,
            "default_steps": self.config.default_steps,
            "startup": {k: round(v, 3) for k, v in self.startup.items()},
        }

    def close(self) -> None:
        self.rt.close()


def _field_of(message: str) -> Optional[str]:
    """The request field a runtime check names first (its messages start with the name)."""
    names = ("height", "width", "steps", "scheduler", "seed", "guidance", "interpolation", "identity",
             "ID scale", "prompt", "negative prompt")
    low = message.lower()
    for n in names:
        if low.startswith(n.lower()):
            return {"ID scale": "id_scale", "negative prompt": "negative_prompt",
                    "interpolation": "face", "identity": "identity_mode"}.get(n, n)
    for n in ("height", "width", "mixed attention", "adain"):
        if n in low:
            return n.replace(" ", "_")
    return None
