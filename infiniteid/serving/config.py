"""``ServerConfig``: what ``infiniteid serve`` is told, checked before anything loads."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional


class ConfigError(ValueError):
    """A server setting that cannot work; the message names the option."""


@dataclass
class ServerConfig:
    """Server settings. Sizes are in bytes or pixels; times in seconds unless named ``_ms``.

    ``max_batch`` 0 means the bundle's ``max_images``. ``queue``: requests admitted
    and not yet in a running batch; more are refused with 429. ``timeout``: a
    request's whole time in the server; past it the request is answered 504 and
    dropped from the queue. ``default_steps``: steps when a request names none.
    """

    bundle: Path
    backend: str = "ort"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 0
    batch_window_ms: float = 25.0
    queue: int = 32
    timeout: float = 120.0
    face_models: Optional[Path] = None
    threads: Optional[int] = None
    cache_bytes: int = 256 << 20
    max_upload_bytes: int = 16 << 20
    max_pixels: int = 36_000_000
    max_prompt_chars: int = 2000
    max_faces: int = 4
    default_steps: int = 30
    warmup: bool = True
    verify_hashes: bool = True
    encode_threads: int = 2
    backend_opts: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "ServerConfig":
        checks = (
            ("port", 0 <= self.port <= 65535, "an integer in [0, 65535] (0 picks a free port)"),
            ("max_batch", self.max_batch >= 0, ">= 0 (0: the bundle's max_images)"),
            ("batch_window_ms", 0 <= self.batch_window_ms <= 10_000, "in [0, 10000] ms"),
            ("queue", self.queue >= 1, ">= 1"),
            ("timeout", self.timeout > 0, "> 0 seconds"),
            ("cache_bytes", self.cache_bytes >= 0, ">= 0 (0 turns the c_id cache off)"),
            ("max_upload_bytes", self.max_upload_bytes >= 1024, ">= 1024"),
            ("max_pixels", self.max_pixels >= 64 * 64, ">= 4096"),
            ("max_prompt_chars", self.max_prompt_chars >= 1, ">= 1"),
            ("max_faces", self.max_faces >= 1, ">= 1"),
            ("default_steps", 1 <= self.default_steps <= 1000, "in [1, 1000]"),
            ("encode_threads", self.encode_threads >= 1, ">= 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        if self.backend not in ("ort", "trt"):
            raise ConfigError(f"backend must be 'ort' or 'trt', got {self.backend!r}")
        return self

    def runtime_options(self) -> Dict[str, Any]:
        opts = dict(self.backend_opts)
        if self.threads is not None:
            opts["intra_op_threads"] = self.threads
        return opts

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}

