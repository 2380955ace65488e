"""The backend interface: named inputs in, named outputs out, as the manifest says.

Every backend (onnxruntime, TensorRT) runs the bundle's components by name with
the tensor names of :mod:`infiniteid.contract`. The runtime's generation loop
talks only to this interface, so a backend is swappable and two backends can be
compared tensor by tensor (``infiniteid check``).

A backend that can keep the latents on its device for the whole denoising loop
(TensorRT) may also implement :class:`DeviceLoop`; the runtime uses it when
present and falls back to the host loop otherwise. Torch-free.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Mapping, Protocol, runtime_checkable

import numpy as np

Feeds = Mapping[str, np.ndarray]
Outputs = Dict[str, np.ndarray]

#: backend name -> "module:class"; imported lazily so that a missing optional
#: dependency (tensorrt, cuda-python) only matters when that backend is asked for.
BACKENDS = {
    "ort": "infiniteid.runtime.ort_backend:OrtBackend",
    "trt": "infiniteid.runtime.trt_backend:TrtBackend",
}


class BackendError(RuntimeError):
    """A backend that cannot run here, or a run that failed; the message says why."""


@runtime_checkable
class Backend(Protocol):
    """Runs bundle components. ``run`` takes and returns host numpy arrays."""

    name: str

    def run(self, component: str, feeds: Feeds) -> Outputs:
        """Run one component; ``feeds`` maps every input name to an array."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


@runtime_checkable
class DeviceLoop(Protocol):
    """Optional: the whole denoising loop on the device, host copies only at the ends."""

    def denoise(self, loop: Any) -> np.ndarray:
        """Run the loop described by ``loop`` (the runtime's ``LoopInputs``); return final latents."""
        ...


def default_backend(bundle: Any = None) -> str:
    """The backend this machine can run: ``"trt"`` where TensorRT is installed, a CUDA device is
    present and (given a loaded ``bundle``) the bundle has engines; ``"ort"`` otherwise."""
    import importlib.util

    from .ort_backend import cuda_device_count

    has_trt = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_lean"))
    if not has_trt or cuda_device_count() == 0:
        return "ort"
    if bundle is not None and not bundle.engine_dirs():
        return "ort"
    return "trt"


def make_backend(name: str, bundle: Any, **options: Any) -> Backend:
    """Instantiate backend ``name`` for a loaded bundle; unknown names are a clear error."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(bundle, **options)
