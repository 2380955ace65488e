"""Which onnxruntime execution providers can really run here. Torch-free, no onnxruntime import.

``onnxruntime-gpu`` lists the CUDA provider as available on every machine; on one
without a GPU (or driver) a session asked for it prints red provider-load errors
and falls back to the CPU. So the CUDA provider is chosen only where the CUDA
driver reports a device. The runtime's onnxruntime backend and the face front end
both choose their default providers here.
"""
from __future__ import annotations

import ctypes
from typing import List, Sequence

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (0 without a driver)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


def usable_providers(available: Sequence[str]) -> List[str]:
    """CUDA then CPU where onnxruntime offers CUDA and a GPU is present, else CPU only."""
    if CUDA in available and cuda_device_count() > 0:
        return [CUDA, CPU]
    return [CPU]
