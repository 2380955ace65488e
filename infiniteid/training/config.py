"""The training config: one JSON file, typed sections, every field documented.

``TrainConfig.from_file(path)`` reads it; an unknown key (a typo such as
``optim.lr_rate``) or a value of the wrong kind is a :class:`ConfigError` that
names the key, never a silent default. Paths are relative to the config file.

Example (``infiniteid train --example-config`` prints a complete one)::

    {
      "output_dir": "runs/tiny",
      "data": {"root": "world/train", "face_models": "world/face-models", "resolution": 64},
      "model": {"kind": "tiny"},
      "max_steps": 2000, "batch_size": 8, "checkpoint_every": 500
    }
"""
from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key."""


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps are drawn. ``"uniform"`` (the paper's, and DDPM's):
    every step of ``0 .. T-1`` alike. ``"logit_normal"`` (SD3's density, through
    diffusers' :func:`~diffusers.training_utils.compute_density_for_timestep_sampling`):
    ``t = floor(sigmoid(x) * T)`` with ``x ~ N(logit_mean, logit_std)``; a positive
    mean favours the noisy steps, where the coarse layout (and so most of a face's
    identity) is decided."""

    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class DataConfig:
    """Where the photos are and how they become training pairs.

    ``root``: one folder per identity, each with that person's photos (png, jpg,
    jpeg, webp, bmp) and, optionally, a caption per photo (``photo.txt`` beside
    ``photo.png``; kept in the cache for evaluation, unused by the objective, which
    sees no text). ``face_models``: an insightface model folder (detector +
    ArcFace recogniser) for the face front end. ``resolution``: the square side the
    denoising targets are centre-cropped and resized to. ``cache_dir``: where the
    face front end's results and the target latents are cached (default
    ``<output_dir>/cache``); they are computed once and reused until the photos,
    the face models, the model or the resolution change. ``det_thresh``: the face
    detector's minimum score.
    """

    root: str = ""
    face_models: str = ""
    resolution: int = 1024
    cache_dir: Optional[str] = None
    det_thresh: float = 0.5

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("data.root is required: a folder with one sub-folder of photos per identity")
        if not self.face_models:
            raise ConfigError("data.face_models is required: an insightface model folder (detector + ArcFace)")
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise ConfigError(f"data.resolution must be an integer >= 8, got {self.resolution!r}")
        if not 0.0 < float(self.det_thresh) < 1.0:
            raise ConfigError(f"data.det_thresh must be between 0 and 1, got {self.det_thresh!r}")


@dataclass
class ModelConfig:
    """What is trained. ``kind``: ``"tiny"`` (the seeded tiny model of
    :mod:`infiniteid.model.tiny`, ``seed``) or ``"sdxl"`` (``base``: a diffusers
    SDXL folder; ``image_encoder``: a transformers CLIP vision folder).
    ``init_adapter``: an adapter file to start from (default: fresh mapper and
    projections). ``face_tokens``: the face mapper's token count ``n`` for a fresh
    adapter. ``ip_init``: how a fresh adapter's ``to_k_ip``/``to_v_ip`` start:
    ``"text"`` (copies of each ``attn2``'s ``to_k``/``to_v``, as IP-Adapter's training
    does: the identity tokens are read like text from the first step) or ``"random"``.
    The SDXL weights, text encoders, VAE and CLIP image encoder stay frozen.
    """

    kind: str = "tiny"
    seed: int = 0
    base: Optional[str] = None
    image_encoder: Optional[str] = None
    init_adapter: Optional[str] = None
    face_tokens: int = 4
    ip_init: str = "text"

    def validate(self) -> None:
        if self.ip_init not in ("text", "random"):
            raise ConfigError(f"model.ip_init must be 'text' or 'random', got {self.ip_init!r}")
        if self.kind not in ("tiny", "sdxl"):
            raise ConfigError(f"model.kind must be 'tiny' or 'sdxl', got {self.kind!r}")
        if self.kind == "sdxl" and not (self.base and self.image_encoder):
            raise ConfigError("model.kind 'sdxl' needs model.base (SDXL diffusers folder) and model.image_encoder")
        if not isinstance(self.face_tokens, int) or self.face_tokens < 1:
            raise ConfigError(f"model.face_tokens must be a positive integer, got {self.face_tokens!r}")


@dataclass
class OptimConfig:
    """AdamW (the paper's: lr 1e-4, weight decay 0.01) with a linear warm-up to a
    constant rate. ``max_grad_norm``: gradient clipping (0 turns it off)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay, optim.max_grad_norm and optim.warmup_steps must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


@dataclass
class TrainConfig:
    """One training run.

    ``output_dir``: checkpoints (``checkpoints/step-NNNNNN/``), the final adapter
    (``adapter.safetensors``, EMA weights when EMA is on) and the JSON logs
    (``logs/run-*.jsonl``). ``seed``: draws every pair, noise, timestep and
    ``c_id`` drop from ``(seed, step, sample)``, so a run is reproducible, a resumed
    run equals an uninterrupted one, and N processes equal one process with the
    same global batch. ``batch_size``: samples per process per micro-step; the
    global batch is ``batch_size x processes x grad_accum``. ``max_steps``:
    optimizer steps. ``id_dropout``: probability of replacing a sample's ``c_id``
    by the unconditional tokens (so classifier-free guidance works).
    ``mixed_precision``: ``"no"``, ``"bf16"`` or ``"fp16"`` (Accelerate's autocast; fp16 with loss scaling).
    ``gradient_checkpointing``: recompute U-Net activations in the backward pass.
    ``ema_decay``: keep an exponential moving average of the trainable weights
    (e.g. 0.999; ``null`` = off). ``checkpoint_every``: steps between checkpoints
    (0 = only at the end); ``keep_checkpoints``: how many to keep (0 = all).
    ``log_every``: steps between log records. ``timestep_sampling``: how each
    sample's timestep is drawn: ``"uniform"`` (the paper's) or ``"logit_normal"``
    (``t = T * sigmoid(x)``, ``x ~ N(logit_mean, logit_std)``; ``logit_mean > 0``
    favours the noisy steps, where a face's layout is decided).
    """

    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    id_dropout: float = 0.05
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: Optional[float] = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def validate(self) -> "TrainConfig":
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        for k in ("batch_size", "grad_accum", "max_steps", "log_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        for k in ("checkpoint_every", "keep_checkpoints", "seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{k} must be an integer >= 0, got {v!r}")
        if not 0.0 <= float(self.id_dropout) < 1.0:
            raise ConfigError(f"id_dropout must be in [0, 1), got {self.id_dropout!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {self.timestep_sampling!r}")
        if not self.logit_std > 0:
            raise ConfigError(f"logit_std must be > 0, got {self.logit_std!r}")
        if self.ema_decay is not None and not 0.0 < float(self.ema_decay) < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay!r}")
        self.data.validate()
        self.model.validate()
        self.optim.validate()
        return self

    # -- files ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, base_dir: Optional[Path] = None) -> "TrainConfig":
        cfg = _build(cls, d, "")
        if base_dir is not None:
            cfg._resolve_paths(Path(base_dir))
        return cfg.validate()

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, base_dir=path.parent)

    def to_dict(self) -> dict:
        return asdict(self)

    def _resolve_paths(self, base: Path) -> None:
        rel = lambda p: p if p is None or Path(p).is_absolute() else str(base / p)  # noqa: E731
        self.output_dir = rel(self.output_dir) if self.output_dir else self.output_dir
        self.data.root = rel(self.data.root) if self.data.root else self.data.root
        self.data.face_models = rel(self.data.face_models) if self.data.face_models else self.data.face_models
        self.data.cache_dir = rel(self.data.cache_dir)
        for k in ("base", "image_encoder", "init_adapter"):
            setattr(self.model, k, rel(getattr(self.model, k)))

    @property
    def timesteps(self) -> TimestepSampling:
        """The run's :class:`TimestepSampling`."""
        return TimestepSampling(self.timestep_sampling, float(self.logit_mean), float(self.logit_std))

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.output_dir) / "cache"


def _build(cls, d: Any, where: str):
    """A dataclass from a dict: unknown keys and wrongly typed values are errors naming the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'the config'} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; known keys{' in ' + where[:-1] if where else ''}: "
                          f"{', '.join(sorted(known))}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if is_dataclass(t):
            kwargs[k] = _build(t, v, f"{where}{k}.")
        else:
            kwargs[k] = _check_type(v, t, f"{where}{k}")
    return cls(**kwargs)


def _check_type(v: Any, t: Any, key: str) -> Any:
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Union:  # Optional[X]
        if v is None:
            return None
        t = next(a for a in args if a is not type(None))
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is int and isinstance(v, bool) or not isinstance(v, t):
        raise ConfigError(f"{key} must be {t.__name__}, got {json.dumps(v)}")
    return v


def example_config() -> dict:
    """A complete config with every default (for ``infiniteid train --example-config``)."""
    cfg = TrainConfig(output_dir="runs/example")
    cfg.data.root, cfg.data.face_models = "data/identities", "models/antelopev2"
    return cfg.to_dict()
