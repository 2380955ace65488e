"""Mixed attention: torch reference, Triton kernel, ONNX custom node, TensorRT plugin.

``from infiniteid.kernels import mixed_attention`` is the entry point (see
:mod:`.dispatch`). Submodules are imported lazily so that importing the package
pulls in neither triton nor tensorrt (nor torch, for the plugin-only modules).

* :mod:`.reference`: pure-torch oracle (explicit concatenation).
* :mod:`.fold`: the exact fold of AdaIN-mean into attention, in plain torch.
* :mod:`.triton_mixed`: the Triton flash-attention kernel (its device code, torch-free,
  in :mod:`.triton_device`).
* :mod:`.onnx_op`: the ``infiniteid::MixedAttention`` ONNX node and its function body.
* :mod:`.plugin_ptx`, :mod:`.trt_plugin`: the kernel as a TensorRT AOT plugin.
"""
from __future__ import annotations

from typing import Any

__all__ = ["mixed_attention", "choose_backend", "BACKENDS"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
