"""The quantized bundle: every component as the export writes it, the U-Net as QDQ ONNX.

:func:`write_quantized_bundle` runs the export's own atomic bundle writer
(:func:`infiniteid.export.export_bundle`) with the U-Net's exporter replaced by
:func:`~.quantize.export_quantized_unet`, so the bundle layout, the tokenizers, the
manifest and its atomicity are the export's. The manifest's U-Net entry says
precision ``int8``/``fp8`` and holds the quantization config (and the calibration's
summary) under ``options.quantization``; inputs and outputs stay float32, so the
runtime feeds it as it feeds an fp32 U-Net.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn

from .. import contract as C
from ..bundle import Manifest
from ..export import ExportOptions, export_bundle
from .config import QuantConfig
from .quantize import export_quantized_unet


def write_quantized_bundle(
    pipeline: Any,
    qunet: nn.Module,
    out: Union[str, Path],
    qc: QuantConfig,
    options: Optional[ExportOptions] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    face_models: Optional[Union[str, Path]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Manifest:
    """Write the bundle ``out`` with ``qunet`` (from :func:`~.quantize.quantize_unet`) as its U-Net."""

    def unet_exporter(pipe, name, path, opts, *, root=None, info=None):
        return export_quantized_unet(pipe, qunet, path, opts, qc, root=root, info=info, extra=extra)

    return export_bundle(
        pipeline,
        out,
        options or ExportOptions(),
        overwrite=overwrite,
        progress=progress,
        face_models=face_models,
        exporters={C.UNET: unet_exporter},
    )
