"""``infiniteid export``: the model to a bundle (ONNX graphs, tokenizers, manifest).

Real weights are local folders only (nothing is downloaded): a diffusers SDXL
folder, a CLIP image encoder folder, an ID adapter file (this project's format,
or a published IP-Adapter face file: plus-face, FaceID-PlusV2, FaceID), and the
insightface folder with your face detector and ArcFace ONNX files (referenced in
the manifest by path and hash, never copied). ``--tiny`` exports the tiny seeded
random-weight model instead (for tests and demos: its images are noise).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..cli import UserError
from ..model.kinds import AUTO, PUBLIC_KINDS

EPILOG = """\
examples:
  infiniteid export --tiny --out out/tiny
  infiniteid export --base ~/models/sdxl-base-1.0 --image-encoder ~/models/clip-vit-h-14 \\
      --adapter ~/models/infiniteid.safetensors --face-models ~/.insightface/models/antelopev2 \\
      --out out/sdxl-fp16 --precision fp16 --height 1024 --width 1024 --max-batch 4
  infiniteid export --tiny --out out/tiny --no-adain --overwrite     # an ablation bundle
  infiniteid export --base ~/models/sdxl-base-1.0 --image-encoder ~/models/clip-vit-h-14 \\
      --adapter ~/models/ip-adapter-plus-face_sdxl_vit-h.bin --face-models ~/.insightface/models/antelopev2 \\
      --out out/plus-face --precision fp16           # a published face adapter, as downloaded
  infiniteid export --base ~/models/sdxl-base-1.0 ... --out out/lightning \\
      --lora ~/loras/sdxl_lightning_4step_lora.safetensors --lora ~/loras/style.safetensors:0.8 \\
      --scheduler-config trailing                                 # a few-step base: 4 steps, guidance 1

--lora FILE[:SCALE] (repeatable) fuses a local LoRA file (diffusers/peft or kohya
layout, .safetensors or a torch pickle) into the U-Net and, when the file has
layers for them, the text encoders, before the graphs are traced; the manifest
lists each file with its sha256 and scale. --scheduler-config takes a timestep
spacing (trailing, leading, linspace) or a scheduler_config.json whose keys are
set over the base's scheduler config.

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
    src.add_argument(
        "--adapter",
        type=Path,
        help="ID adapter: this project's .safetensors, or a published IP-Adapter face file (.bin/.safetensors)",
    )
    src.add_argument(
        "--adapter-kind",
        default=AUTO,
        choices=(AUTO,) + PUBLIC_KINDS,
        metavar="KIND",
        help="kind of a published adapter file (default: auto, from its keys and name; see convert-adapter)",
    )
    src.add_argument("--face-models", type=Path, help="insightface folder with the detector and ArcFace .onnx files")
    src.add_argument("--tiny", action="store_true", help="export the tiny seeded random-weight model instead")
    src.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    src.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA file fused into the weights before export, at SCALE (default 1.0); repeat for several",
    )
    src.add_argument(
        "--scheduler-config",
        metavar="SPACING|FILE",
        help="scheduler settings the bundle declares: 'trailing' (few-step bases such as SDXL-Lightning, "
        "Hyper-SD), 'leading' or 'linspace', or a scheduler_config.json whose keys override the base's",
    )

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


def shape_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``ExportOptions`` fields from :func:`add_shape_arguments` and the ablation switches."""
    return dict(
        height=args.height,
        width=args.width,
        min_resolution=args.min_resolution,
        max_resolution=args.max_resolution,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        max_identities=args.max_identities,
        mixed_attention=not args.no_mixed_attention,
        adain=not args.no_adain,
    )


def options_from_args(args: argparse.Namespace):
    from ..export import ExportOptions

    opts = ExportOptions(
        precision=args.precision,
        vae_precision=args.vae_precision,
        **shape_options(args),
        attention_plugin=args.attention_plugin,
        opset=args.opset,
        slim=not args.no_slim,
        scheduler_override=scheduler_override(args.scheduler_config),
    )
    opts.validate()
    return opts


SPACINGS = ("trailing", "leading", "linspace")


def scheduler_override(value: Optional[str]) -> Optional[Dict[str, Any]]:
    """``--scheduler-config``: a timestep spacing, or a JSON file of scheduler config keys.

    The keys are checked the way the runtime's schedulers will read them, so a
    bundle that no scheduler here can run is refused before any work.
    """
    if value is None:
        return None
    from ..runtime.schedulers import SchedulerConfig, SchedulerConfigError

    if value in SPACINGS:
        override: Dict[str, Any] = {"timestep_spacing": value}
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(
                f"--scheduler-config: {value!r} is neither a timestep spacing ({', '.join(SPACINGS)}) nor a file"
            )
        try:
            override = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"--scheduler-config: {path} is not valid JSON ({e})") from None
        if not isinstance(override, dict) or not override:
            raise UserError(f"--scheduler-config: {path} must hold a JSON object of scheduler config keys")
    try:
        SchedulerConfig.from_dict(override)
    except SchedulerConfigError as e:
        raise UserError(f"--scheduler-config: {e}") from None
    return override


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


def lora_specs(values: List[str]) -> list:
    """``--lora FILE[:SCALE]`` values, each file checked (exists, known type) before any loading."""
    if not values:
        return []
    from ..model.lora import LoraError, LoraSpec

    specs = [LoraSpec.parse(v) for v in values]
    try:
        for spec in specs:
            spec.validate()
    except LoraError as e:
        raise UserError(f"--lora: {e}") from None
    return specs


def fuse(components: Any, specs: list) -> None:
    """Fuse the LoRAs into the loaded weights; a file that does not fit is one line, before any export."""
    if not specs:
        return
    from ..model.lora import LoraError, fuse_loras

    try:
        for r in fuse_loras(components, specs):
            print(f"fused LoRA {r.file} at scale {r.scale:g} ({r.layers} layers: {', '.join(r.components)})")
    except LoraError as e:
        raise UserError(f"--lora: {e}") from None


def check_scheduler(config: Dict[str, Any]) -> None:
    """The scheduler config a bundle will declare, as the runtime will read it."""
    from ..runtime.schedulers import SchedulerConfig, SchedulerConfigError

    try:
        SchedulerConfig.from_dict(config)
    except SchedulerConfigError as e:
        raise UserError(f"--scheduler-config: with the base's scheduler config: {e}") from None


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
    # Everything cheap first, before PyTorch is imported or weights are loaded:
    # options, sources, the output folder and its lock.
    from ..export.output_folder import check_output_folder, output_lock, sigterm_as_interrupt

    opts = options_from_args(args)
    _check_sources(args)
    loras = lora_specs(args.lora)
    out = Path(args.out).expanduser().absolute()
    check_output_folder(out, args.overwrite)
    if args.height or args.width or args.min_resolution or args.max_resolution:  # an illegal size before any model
        if args.tiny:
            from ..model.tiny_geometry import RESOLUTION

            opts.resolve(*RESOLUTION)
        else:
            opts.resolve(*_base_resolution(Path(args.base).expanduser()))
    with sigterm_as_interrupt(), output_lock(out):  # creates missing parent folders
        manifest = _export(args, opts, out, loras)
    total = sum(c.size + c.external_size for c in manifest.components.values())
    print(
        f"wrote {out} ({len(manifest.components)} graphs, {total / 2**20:.1f} MiB, "
        f"precision {opts.precision}, VAE {opts.vae_precision}, "
        f"{manifest.resolution['min']}..{manifest.resolution['max']} px in steps of {manifest.resolution['multiple']}, "
        f"up to {manifest.max_images} images per batch)"
    )
    return 0


def _export(args: argparse.Namespace, opts: Any, out: Path, loras: list) -> Any:
    from ..export import export_bundle
    from ..model.pipeline import InfiniteIDPipeline

    if args.tiny:
        pipeline = InfiniteIDPipeline.tiny(args.seed)
    else:
        from ..model.adapter import AdapterError
        from ..model.loading import WeightsError

        try:
            pipeline = InfiniteIDPipeline.from_pretrained(args.base, args.image_encoder, args.adapter, kind=args.adapter_kind)
        except (WeightsError, AdapterError) as e:
            raise UserError(str(e)) from None
    fuse(pipeline.c, loras)
    if opts.scheduler_override:
        check_scheduler({**pipeline.c.scheduler_config, **opts.scheduler_override})
    return export_bundle(
        pipeline, out, opts, overwrite=args.overwrite, progress=not args.no_progress, face_models=args.face_models
    )
