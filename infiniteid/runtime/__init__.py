"""The torch-free runtime: load a bundle, run it on onnxruntime or TensorRT.

::

    from infiniteid.runtime import Runtime
    from infiniteid.generation import GenerationRequest, BatchSettings

    rt = Runtime("bundle/", backend="ort", face_models="antelopev2/")
    out = rt.generate([GenerationRequest("a person in comic book style", faces=["me.jpg"])],
                      BatchSettings(height=1024, width=1024, steps=30))
    out.images[0].save("me.png")

This package never imports torch, diffusers or transformers (a test checks it in a
fresh interpreter). Names are imported lazily, so ``import infiniteid.runtime``
costs nothing until one is used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Bundle": "infiniteid.runtime.loader",
    "Runtime": "infiniteid.runtime.generator",
    "RuntimeOutput": "infiniteid.runtime.generator",
    "FaceInput": "infiniteid.runtime.generator",
    "LoopInputs": "infiniteid.runtime.loop",
    "host_loop": "infiniteid.runtime.loop",
    "OrtBackend": "infiniteid.runtime.ort_backend",
    "Backend": "infiniteid.runtime.backend",
    "BackendError": "infiniteid.runtime.backend",
    "DeviceLoop": "infiniteid.runtime.backend",
    "make_backend": "infiniteid.runtime.backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'infiniteid.runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
