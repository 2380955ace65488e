"""Calibration: INT8 / FP8 U-Nets from real pipeline runs, and how much they lose.

Public API::

    from infiniteid.calibration import (CaptureConfig, QuantConfig, read_prompts, capture,
                                        quantize_unet, write_quantized_bundle, accuracy_report)

    prompts = read_prompts()                                   # the shipped prompt set
    data = capture(pipeline, faces, "out/capture", CaptureConfig(prompts.prompts, steps=20, samples=32))
    qunet = quantize_unet(pipeline.c.unet, data, QuantConfig(precision="int8", alpha=0.8))
    write_quantized_bundle(pipeline, qunet, "out/sdxl-int8", QuantConfig(precision="int8"))
    print(accuracy_report(pipeline, "out/sdxl-int8", held_out_prompts, faces).table())

Modules (imports only downward: :mod:`infiniteid.model`, :mod:`infiniteid.export`,
nvidia-modelopt): :mod:`.config` (typed settings, the prompt set, held-out split),
:mod:`.capture` (U-Net inputs of reference runs as seeded, resumable shards),
:mod:`.quantize` (modelopt INT8 SmoothQuant / FP8, QDQ ONNX export, standard float8
Q/DQ), :mod:`.qbundle` (the quantized bundle through the export's writer),
:mod:`.report` (per-step noise error, PSNR/SSIM, ArcFace identity, worst quantizers).
The command is :mod:`infiniteid.commands.calibrate`.
"""
from .capture import CaptureSet, capture, face_files
from .config import CalibrationError, CaptureConfig, QuantConfig, read_prompts, split_held_out
from .qbundle import write_quantized_bundle
from .quantize import export_quantized_unet, fake_quant_graph, modelopt_config, quantize_unet
from .report import AccuracyReport, accuracy_report, layer_errors

__all__ = [
    "AccuracyReport",
    "CalibrationError",
    "CaptureConfig",
    "CaptureSet",
    "QuantConfig",
    "accuracy_report",
    "capture",
    "export_quantized_unet",
    "face_files",
    "fake_quant_graph",
    "layer_errors",
    "modelopt_config",
    "quantize_unet",
    "read_prompts",
    "split_held_out",
    "write_quantized_bundle",
]
