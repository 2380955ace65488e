"""ONNX export of every component and the bundle writer.

Public API::

    from infiniteid.export import ExportOptions, export_bundle, export_tiny_bundle, export_component

    export_tiny_bundle("out/tiny")                               # the tiny seeded model
    export_bundle(pipeline, "out/sdxl", ExportOptions(precision="fp16"), face_models="~/antelopev2")
    export_component(pipeline, "unet", "unet.onnx", ExportOptions())   # one graph

Modules: :mod:`.options` (what an export bakes in and declares), :mod:`.model_info`
(widths, token counts, shape ranges), :mod:`.graphs` (one wrapper module per
component), :mod:`.onnx_graph` (trace, clean up, save one graph),
:mod:`.bundle_writer` (the bundle folder and its manifest), :mod:`.output_folder`
(output checks, lock, atomic staging; torch-free).

The package imports PyTorch only when a name that needs it is used, so
:class:`ExportOptions` and :mod:`.output_folder` (the command's argument and
output-folder checks) cost nothing before the real work.
"""
from importlib import import_module
from typing import Any

from .options import ExportOptions

_LAZY = {
    "export_bundle": ".bundle_writer",
    "export_tiny_bundle": ".bundle_writer",
    "ExportGraphError": ".graphs",
    "ModelInfo": ".model_info",
    "export_component": ".onnx_graph",
}

__all__ = ["ExportOptions", "ExportGraphError", "ModelInfo", "export_bundle", "export_component", "export_tiny_bundle"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
