"""ONNX export of every component and the bundle writer.

Public API::

    from infiniteid.export import ExportOptions, export_bundle, export_tiny_bundle, export_component

    export_tiny_bundle("out/tiny")                               # the tiny seeded model
    export_bundle(pipeline, "out/sdxl", ExportOptions(precision="fp16"), face_models="~/antelopev2")
    export_component(pipeline, "unet", "unet.onnx", ExportOptions())   # one graph

Modules: :mod:`.options` (what an export bakes in and declares), :mod:`.model_info`
(widths, token counts, shape ranges), :mod:`.graphs` (one wrapper module per
component), :mod:`.onnx_graph` (trace, clean up, save one graph),
:mod:`.bundle_writer` (the atomic bundle folder and its manifest).
"""
from .bundle_writer import export_bundle, export_tiny_bundle
from .graphs import ExportGraphError
from .model_info import ModelInfo
from .onnx_graph import export_component
from .options import ExportOptions

__all__ = ["ExportOptions", "ExportGraphError", "ModelInfo", "export_bundle", "export_component", "export_tiny_bundle"]
