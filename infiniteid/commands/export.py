"""``infiniteid export``: the model to a bundle (ONNX graphs, tokenizers, manifest).

Real weights are local folders only (nothing is downloaded): a diffusers SDXL
folder, a CLIP image encoder folder, an Infinite-ID adapter file, and the
insightface folder with your face detector and ArcFace ONNX files (referenced in
the manifest by path and hash, never copied). ``--tiny`` exports the tiny seeded
random-weight model instead (for tests and demos: its images are noise).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli import UserError

EPILOG = """\
examples:
  infiniteid export --tiny --out out/tiny
  infiniteid export --base ~/models/sdxl-base-1.0 --image-encoder ~/models/clip-vit-h-14 \\
      --adapter ~/models/infiniteid.safetensors --face-models ~/.insightface/models/antelopev2 \\
      --out out/sdxl-fp16 --precision fp16 --height 1024 --width 1024 --max-batch 4
  infiniteid export --tiny --out out/tiny --no-adain --overwrite     # an ablation bundle

Heights and widths must divide by the model's resolution multiple (32 for SDXL,
16 for the tiny model); --min-resolution/--max-resolution bound the shapes the
bundle declares (TensorRT optimisation profiles are built from them).
"""

REAL_FLAGS = ("base", "image_encoder", "adapter", "face_models")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the model to a bundle folder (ONNX graphs + tokenizers + manifest.json)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model (real weights, local folders only)")
    src.add_argument("--base", type=Path, help="diffusers SDXL folder (model_index.json, unet/, vae/, ...)")
    src.add_argument("--image-encoder", type=Path, help="CLIP image encoder folder (transformers format)")
    src.add_argument("--adapter", type=Path, help="Infinite-ID adapter .safetensors file")
    src.add_argument("--face-models", type=Path, help="insightface folder with the detector and ArcFace .onnx files")
    src.add_argument("--tiny", action="store_true", help="export the tiny seeded random-weight model instead")
    src.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")

    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    g = p.add_argument_group("graphs")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="encoders and U-Net (default fp32)")
    g.add_argument(
        "--vae-precision", choices=("fp32", "fp16"), default="fp32", help="VAE decoder (default fp32: SDXL's VAE overflows in fp16)"
    )
    g.add_argument("--no-mixed-attention", action="store_true", help="ablation: the ID stream attends to itself only")
    g.add_argument("--no-adain", action="store_true", help="ablation: mixed attention without the AdaIN-mean shift")
    g.add_argument(
        "--attention-plugin",
        action="store_true",
        help="emit mixed attention as one infiniteid::MixedAttention node (the TensorRT plugin of the Triton "
        "kernel), with an ONNX function body so onnxruntime still runs it; off by default (not faster than "
        "TensorRT's own attention fusion until measured on your GPU)",
    )
    g.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (default 17)")
    g.add_argument("--no-slim", action="store_true", help="skip the onnxslim clean-up (constant folding, fusion)")
    add_shape_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The shape-range options (shared with ``infiniteid calibrate``, which writes bundles too)."""
    s = p.add_argument_group("shape ranges (become the manifest's min/opt/max and TensorRT profiles)")
    s.add_argument("--height", type=int, help="optimal height in pixels (default: the model's, 1024 for SDXL)")
    s.add_argument("--width", type=int, help="optimal width in pixels (default: the model's)")
    s.add_argument("--min-resolution", type=int, help="smallest height/width (default: half the model's)")
    s.add_argument("--max-resolution", type=int, help="largest height/width (default: 1.5x the model's)")
    s.add_argument("--max-batch", type=int, default=4, help="most images per batch (default 4)")
    s.add_argument("--opt-batch", type=int, default=1, help="images per batch to optimise for (default 1)")
    s.add_argument("--max-identities", type=int, default=2, help="most faces one request may mix (default 2)")


def options_from_args(args: argparse.Namespace):
    from ..export import ExportOptions

    opts = ExportOptions(
        precision=args.precision,
        vae_precision=args.vae_precision,
        height=args.height,
        width=args.width,
        min_resolution=args.min_resolution,
        max_resolution=args.max_resolution,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        max_identities=args.max_identities,
        mixed_attention=not args.no_mixed_attention,
        adain=not args.no_adain,
        attention_plugin=args.attention_plugin,
        opset=args.opset,
        slim=not args.no_slim,
    )
    opts.validate()
    return opts


def _check_sources(args: argparse.Namespace) -> None:
    given = [f for f in REAL_FLAGS if getattr(args, f) is not None]
    if args.tiny:
        extra = [f for f in given if f != "face_models"]
        if extra:
            raise UserError(f"--tiny exports the tiny model; drop {', '.join('--' + f.replace('_', '-') for f in extra)}")
        return
    missing = [f for f in REAL_FLAGS if getattr(args, f) is None]
    if missing:
        raise UserError(
            f"missing {', '.join('--' + f.replace('_', '-') for f in missing)} "
            "(or pass --tiny to export the tiny random-weight model)"
        )
    for flag, want_dir in (("base", True), ("image_encoder", True), ("adapter", False), ("face_models", True)):
        p = Path(getattr(args, flag)).expanduser()
        ok = p.is_dir() if want_dir else p.is_file()
        if not ok:
            kind = "folder" if want_dir else "file"
            raise UserError(f"--{flag.replace('_', '-')}: {kind} not found: {p}")


def _base_resolution(base: Path) -> tuple:
    """(resolution multiple, native size) of an SDXL folder, from its U-Net config (before loading weights)."""
    from ..generation import VAE_SCALE_FACTOR, resolution_multiple

    cfg = base / "unet" / "config.json"
    try:
        d = json.loads(cfg.read_text())
        return resolution_multiple(len(d["down_block_types"])), int(d["sample_size"]) * VAE_SCALE_FACTOR
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg}: cannot read the U-Net's down_block_types and sample_size ({e})") from None


def run(args: argparse.Namespace) -> int:
    from ..export.bundle_writer import check_output_folder

    opts = options_from_args(args)
    _check_sources(args)
    out = Path(args.out).expanduser().absolute()
    check_output_folder(out, args.overwrite)  # before minutes of loading

    from ..export import export_bundle
    from ..model.pipeline import InfiniteIDPipeline

    if args.tiny:
        pipeline = InfiniteIDPipeline.tiny(args.seed)
    else:
        # Refuse an illegal resolution before loading gigabytes of weights.
        if args.height or args.width or args.min_resolution or args.max_resolution:
            opts.resolve(*_base_resolution(Path(args.base).expanduser()))
        from ..model.adapter import AdapterError
        from ..model.loading import WeightsError

        try:
            pipeline = InfiniteIDPipeline.from_pretrained(args.base, args.image_encoder, args.adapter)
        except (WeightsError, AdapterError) as e:
            raise UserError(str(e)) from None
    manifest = export_bundle(
        pipeline, out, opts, overwrite=args.overwrite, progress=not args.no_progress, face_models=args.face_models
    )
    total = sum(c.size + c.external_size for c in manifest.components.values())
    print(
        f"wrote {out} ({len(manifest.components)} graphs, {total / 2**20:.1f} MiB, "
        f"precision {opts.precision}, VAE {opts.vae_precision}, "
        f"{manifest.resolution['min']}..{manifest.resolution['max']} px in steps of {manifest.resolution['multiple']}, "
        f"up to {manifest.max_images} images per batch)"
    )
    return 0
