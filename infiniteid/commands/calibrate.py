"""``infiniteid calibrate``: an INT8 or FP8 bundle from calibration on real pipeline runs.

1. capture the U-Net's inputs from the PyTorch reference generating the calibration
   prompts x faces (seeded shards; an interrupted capture resumes);
2. quantize the U-Net with nvidia-modelopt (INT8 SmoothQuant or FP8 E4M3) and write a
   bundle whose U-Net is QDQ ONNX (``infiniteid build`` makes TensorRT engines of it;
   the runtime runs it on onnxruntime too);
3. measure it against the unquantized model on held-out prompts and faces (the accuracy
   report: table on screen, JSON beside the bundle). ``--report-only`` redoes only this.

Every eighth prompt is held out of calibration for the report; with two or more face
images, so is the last face. Local folders only; nothing is downloaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import UserError
from .export import add_shape_arguments, shape_options

EPILOG = """\
examples:
  infiniteid calibrate --tiny --precision int8 --faces faces/ --face-models synthetic-models/ --bundle-out out/tiny-int8
  infiniteid calibrate --base ~/models/sdxl-base-1.0 --image-encoder ~/models/clip-vit-h-14 \\
      --adapter ~/models/infiniteid.safetensors --face-models ~/.insightface/models/antelopev2 \\
      --faces my-faces/ --precision fp8 --bundle-out out/sdxl-fp8 --steps 30 --samples 64
  infiniteid calibrate --tiny --face-models m/ --faces faces/ --bundle-out out/tiny-int8 --report-only

Prompts: the shipped set of 70 (portraits, scenes, roles, styles) unless --prompts FILE
(one prompt a line, '#' for comments). The capture goes to --capture-dir (default
BUNDLE-OUT-calibration next to the bundle) and is resumed when rerun with the same settings.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="quantize the U-Net to INT8 or FP8 from real pipeline runs; write the bundle and an accuracy report",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model (real weights, local folders only)")
    src.add_argument("--base", type=Path, help="diffusers SDXL folder")
    src.add_argument("--image-encoder", type=Path, help="CLIP image encoder folder (transformers format)")
    src.add_argument("--adapter", type=Path, help="Infinite-ID adapter .safetensors file")
    src.add_argument("--tiny", action="store_true", help="the tiny seeded random-weight model instead (CPU, minutes)")
    src.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    src.add_argument("--device", default=None, help="torch device for the reference (default: cuda if available)")
    p.add_argument("--precision", required=True, metavar="int8|fp8", help="int8 (SmoothQuant) or fp8 (E4M3)")
    p.add_argument("--faces", type=Path, required=True, metavar="DIR", help="folder of face images (one person each)")
    p.add_argument("--face-models", type=Path, required=True, metavar="DIR",
                   help="insightface folder with the detector and ArcFace .onnx files")
    p.add_argument("--bundle-out", type=Path, required=True, metavar="DIR", help="quantized bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --bundle-out")
    c = p.add_argument_group("calibration data")
    c.add_argument("--prompts", type=Path, metavar="FILE", help="prompt file (default: the shipped set)")
    c.add_argument("--steps", type=int, default=20, help="denoising steps per calibration run (default 20)")
    c.add_argument("--samples", type=int, default=32, help="calibration runs, prompts x faces (default 32)")
    c.add_argument("--calib-seed", type=int, default=0, help="seed of the first calibration run (default 0)")
    c.add_argument("--capture-dir", type=Path, metavar="DIR", help="where captured U-Net inputs go (default BUNDLE-OUT-calibration)")
    q = p.add_argument_group("quantization (nvidia-modelopt)")
    q.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant alpha for int8 (default 0.8)")
    q.add_argument("--calibrator", default="max", metavar="max|percentile", help="activation ranges (default max)")
    q.add_argument("--percentile", type=float, default=99.99, help="with --calibrator percentile (default 99.99)")
    q.add_argument("--keep-id-projections", action="store_true",
                   help="keep the ID keys/values projections (to_k_ip, to_v_ip) in high precision")
    q.add_argument("--calib-steps", type=int, help="use at most N captured U-Net calls (default all)")
    q.add_argument("--base-precision", choices=("fp16", "fp32"), default="fp16",
                   help="precision of the encoders and of the U-Net around its Q/DQ pairs (default fp16: what "
                        "TensorRT's fp16 engines run; the VAE stays fp32)")
    r = p.add_argument_group("accuracy report")
    r.add_argument("--report-only", action="store_true", help="only measure the existing --bundle-out")
    r.add_argument("--no-report", action="store_true", help="skip the accuracy report")
    r.add_argument("--report-samples", type=int, default=4, help="held-out generations to measure (default 4)")
    r.add_argument("--report-steps", type=int, default=None, help="steps of each (default: --steps)")
    r.add_argument("--report-json", type=Path, metavar="FILE", help="where the JSON goes (default BUNDLE-OUT/accuracy.json)")
    add_shape_arguments(p)
    p.add_argument("--no-mixed-attention", action="store_true", help="ablation bundle: no mixed attention")
    p.add_argument("--no-adain", action="store_true", help="ablation bundle: mixed attention without AdaIN-mean")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


REAL_FLAGS = ("base", "image_encoder", "adapter")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_sources(args: argparse.Namespace) -> None:
    given = [f for f in REAL_FLAGS if getattr(args, f) is not None]
    if args.tiny:
        if given:
            raise UserError(f"--tiny uses the tiny model; drop {', '.join(_flag(f) for f in given)}")
        return
    missing = [f for f in REAL_FLAGS if getattr(args, f) is None]
    if missing:
        raise UserError(
            f"missing {', '.join(_flag(f) for f in missing)}: calibration (and its report) runs the unquantized "
            "source model (or pass --tiny for the tiny random-weight model)"
        )
    for flag, want_dir in (("base", True), ("image_encoder", True), ("adapter", False)):
        path = Path(getattr(args, flag)).expanduser()
        if not (path.is_dir() if want_dir else path.is_file()):
            raise UserError(f"{_flag(flag)}: {'folder' if want_dir else 'file'} not found: {path}")


def _configs(args: argparse.Namespace):
    from ..calibration import CaptureConfig, QuantConfig

    qc = QuantConfig(
        precision=args.precision,
        alpha=args.alpha,
        calibrator=args.calibrator,
        percentile=args.percentile,
        keep_id_projections=args.keep_id_projections,
        calib_steps=args.calib_steps,
    ).validate()
    for flag in ("steps", "samples", "report_samples"):
        v = getattr(args, flag)
        if v < 1:
            raise UserError(f"{_flag(flag)} must be a positive integer, got {v}")
    if args.report_steps is not None and args.report_steps < 1:
        raise UserError(f"--report-steps must be a positive integer, got {args.report_steps}")
    return qc, CaptureConfig


def _export_options(args: argparse.Namespace):
    from ..export import ExportOptions

    opts = ExportOptions(precision=args.base_precision, **shape_options(args))
    opts.validate()
    return opts


def _pipeline(args: argparse.Namespace, face: Any):
    import torch

    from ..model.pipeline import InfiniteIDPipeline

    if args.tiny:
        return InfiniteIDPipeline.tiny(args.seed, face=face)
    from ..model.adapter import AdapterError
    from ..model.loading import WeightsError, load_components

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        components = load_components(args.base, args.image_encoder, args.adapter)
    except (WeightsError, AdapterError) as e:
        raise UserError(str(e)) from None
    components.face = face
    return InfiniteIDPipeline(components, device=device, dtype=torch.float32)  # calibration statistics in fp32


def run(args: argparse.Namespace) -> int:
    from ..calibration import CalibrationError

    try:
        return _run(args)
    except CalibrationError as e:
        raise UserError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from ..bundle import read_manifest
    from ..calibration import capture, face_files, read_prompts, split_held_out
    from ..export.bundle_writer import check_output_folder

    qc, CaptureConfig = _configs(args)
    if args.report_only and args.no_report:
        raise UserError("--report-only and --no-report exclude each other")
    _check_sources(args)
    opts = _export_options(args)
    out = Path(args.bundle_out).expanduser().absolute()
    if args.report_only:
        manifest = read_manifest(out)  # a missing or broken bundle fails here, before loading weights
    else:
        check_output_folder(out, args.overwrite)
    prompt_set = read_prompts(args.prompts)
    faces = face_files(args.faces)
    calib_prompts, held_prompts = split_held_out(prompt_set.prompts)
    calib_faces, held_faces = split_held_out(faces, every=max(2, min(4, len(faces))))
    if not args.tiny and (args.height or args.width or args.min_resolution or args.max_resolution):
        from .export import _base_resolution

        opts.resolve(*_base_resolution(Path(args.base).expanduser()))

    from ..face import FaceEmbedder

    face = FaceEmbedder.from_folder(args.face_models)
    pipeline = _pipeline(args, face)
    progress = not args.no_progress
    from ..export import ModelInfo

    info = ModelInfo.from_pipeline(pipeline)
    opts = opts.resolve(info.resolution_multiple, info.default_size)

    if args.report_only:
        _check_same_model(pipeline, manifest, out)
    else:
        capture_dir = Path(args.capture_dir or out.with_name(out.name + "-calibration")).expanduser()
        config = CaptureConfig(
            prompts=calib_prompts, steps=args.steps, samples=args.samples, seed=args.calib_seed,
            height=opts.height, width=opts.width,
        )
        captured = capture(pipeline, calib_faces, capture_dir, config, progress=progress)
        print(f"captured {len(captured)} U-Net calls from {len(captured.shards)} runs into {capture_dir}")

        from ..calibration import quantize_unet, write_quantized_bundle

        qunet = quantize_unet(pipeline.c.unet, captured, qc, mixed_attention=opts.mixed_attention,
                              adain=opts.adain, progress=progress)
        extra = {"calibration": {"prompts": prompt_set.source, "runs": len(captured.shards), "steps": args.steps,
                                 "unet_calls": min(len(captured), qc.calib_steps or len(captured)),
                                 "faces": [f.name for f in calib_faces]}}
        manifest = write_quantized_bundle(pipeline, qunet, out, qc, opts, overwrite=args.overwrite,
                                          progress=progress, face_models=args.face_models, extra=extra)
        del qunet
        unet = manifest.components["unet"]
        print(f"wrote {out} (U-Net {unet.precision} QDQ over {opts.precision}, {unet.size / 2**20:.1f} MiB)")

    if args.no_report:
        return 0
    from ..calibration import accuracy_report

    report = accuracy_report(
        pipeline, out, held_prompts, held_faces, samples=args.report_samples,
        steps=args.report_steps or args.steps, height=opts.height, width=opts.width, progress=progress,
    )
    print(report.table())
    path = report.save(args.report_json or out / "accuracy.json")
    print(f"wrote {path}")
    return 0


def _check_same_model(pipeline: Any, manifest: Any, out: Path) -> None:
    """The report compares against the model the bundle was made from; refuse other weights."""
    from ..export.bundle_writer import source_digests

    if manifest.components["unet"].precision not in ("int8", "fp8"):
        raise UserError(f"{out}: its U-Net is {manifest.components['unet'].precision}, not a calibrated int8/fp8 bundle")
    if source_digests(pipeline) != manifest.sources:
        raise UserError(
            f"{out}: was not made from these source weights (its manifest's sources differ); "
            "give the --base/--image-encoder/--adapter (or --tiny --seed) it was calibrated from"
        )
