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


def concat(xs: Sequence[T], axis: int = 0) -> T:
    """Concatenate numpy arrays or torch tensors along ``axis``."""
    if not len(xs):
        raise ValueError("nothing to concatenate")
    if isinstance(xs[0], np.ndarray):
        return np.concatenate(list(xs), axis=axis)  # type: ignore[return-value]
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(xs[0], torch.Tensor):
        raise TypeError(f"expected numpy arrays or torch tensors, got {type(xs[0]).__name__}")
    return torch.cat(list(xs), dim=axis)


def stack(xs: Sequence[T], axis: int = 0) -> T:
    """Stack numpy arrays or torch tensors along a new ``axis``."""
    if not len(xs):
        raise ValueError("nothing to stack")
    if isinstance(xs[0], np.ndarray):
        return np.stack(list(xs), axis=axis)  # type: ignore[return-value]
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(xs[0], torch.Tensor):
        raise TypeError(f"expected numpy arrays or torch tensors, got {type(xs[0]).__name__}")
    return torch.stack(list(xs), dim=axis)
