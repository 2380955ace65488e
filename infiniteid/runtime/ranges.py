"""The bundle's shape ranges, enforced on every backend.

An export declares, per graph tensor, the ``min``..``max`` shape it supports (the
manifest's ``TensorSpec``); TensorRT engines are built for exactly that range.
onnxruntime would run far outside it (a request mixing more faces than the bundle
allows, a larger batch), and the same request would then fail only on the
engines. The runtime checks every feed against the range before any backend runs
it (:func:`check_feeds`), so one bundle accepts the same requests on every backend.

:func:`identity_token_limit` gives the most identity tokens one request may carry
(``max_identities`` faces), so a request is refused before its faces are detected.
Torch-free.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

from ..bundle import ComponentSpec
from ..generation import InvalidRequest

EXPORT_HINT = "the range the bundle was exported with (infiniteid export --max-batch / --max-identities / --max-resolution)"


def check_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Every given feed of component ``spec`` within its declared ``min``..``max``; else :class:`InvalidRequest`."""
    for t in spec.inputs:
        if t.name not in feeds:
            continue
        shape = tuple(np.shape(feeds[t.name]))
        if len(shape) != len(t.shape):
            continue  # rank mistakes are the backend's to report (it names dtype and rank)
        for axis, (n, lo, hi, dim) in enumerate(zip(shape, t.min, t.max, t.shape)):
            if not lo <= n <= hi:
                name = f"'{dim}' (axis {axis})" if isinstance(dim, str) else f"axis {axis}"
                raise InvalidRequest(
                    f"{spec.name} input {t.name!r}: {name} is {n}, this bundle takes {lo}..{hi} ({EXPORT_HINT})"
                )


def identity_token_limit(unet: ComponentSpec, id_tokens: Optional[int] = None) -> Tuple[int, int]:
    """``(tokens of one identity, most tokens one request may carry)`` from the U-Net's ``id_embeds`` range."""
    t = unet.tensor("id_embeds")
    one = int(id_tokens) if id_tokens else int(t.min[1])
    return one, int(t.max[1])
