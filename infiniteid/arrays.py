"""Array helpers that work on numpy arrays and torch tensors alike, without importing torch.

The batch layout and the identity mixing are written once and used by the PyTorch
reference (tensors) and by the torch-free runtime (numpy arrays). A tensor can only
exist if torch is already imported, so torch is looked up in ``sys.modules``.
"""
from __future__ import annotations

import sys
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def _torch_for(xs: Sequence[T]):
    """None for numpy arrays, the torch module for tensors; anything else is an error."""
    if not len(xs):
        raise ValueError("no arrays given")
    if isinstance(xs[0], np.ndarray):
        return None
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(xs[0], torch.Tensor):
        raise TypeError(f"expected numpy arrays or torch tensors, got {type(xs[0]).__name__}")
    return torch


def concat(xs: Sequence[T], axis: int = 0) -> T:
    """Concatenate numpy arrays or torch tensors along ``axis``."""
    torch = _torch_for(xs)
    return np.concatenate(list(xs), axis=axis) if torch is None else torch.cat(list(xs), dim=axis)  # type: ignore[return-value]


def stack(xs: Sequence[T], axis: int = 0) -> T:
    """Stack numpy arrays or torch tensors along a new ``axis``."""
    torch = _torch_for(xs)
    return np.stack(list(xs), axis=axis) if torch is None else torch.stack(list(xs), dim=axis)  # type: ignore[return-value]
