"""``IdentityCache``: a face's ``c_id`` kept for its next request (LRU, bounded in bytes).

The key is a hash of the *decoded* pixels (shape and RGB bytes, so the same photo
re-encoded as JPEG at another quality is a different key, and the same pixels sent
as PNG or BMP are the same key) together with the bundle's ID-encoder hash and the
face model folder: a cached ``c_id`` is never served for another encoder.
A hit skips detection, ArcFace, CLIP and the ID encoder.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np


def pixel_key(rgb: np.ndarray, encoder_hash: str) -> str:
    h = hashlib.sha256()
    h.update(encoder_hash.encode())
    h.update(repr((rgb.shape, str(rgb.dtype))).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


class IdentityCache:
    """Thread-safe LRU of arrays, bounded by their total ``nbytes`` (0 turns it off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[np.ndarray]:
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        value = np.array(value, copy=True)
        value.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
