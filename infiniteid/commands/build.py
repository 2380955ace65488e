"""``infiniteid build BUNDLE``: TensorRT engines for every component of a bundle, on this GPU."""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  infiniteid build bundle/                        static 1024x1024, batch 1, precision as exported
  infiniteid build bundle/ --precision fp16       check the bundle is fp16 (export with --precision fp16)
  infiniteid build bundle/ --shapes dynamic       the manifest's resolution/batch ranges, one engine each
  infiniteid build bundle/ --timing-cache ~/.cache/infiniteid/h100.cache --opt-level 4
  infiniteid build bundle/ --dry-run              print the engines and profiles, build nothing
  infiniteid build sdxl-int8/ --precision int8    a bundle from infiniteid calibrate (QDQ U-Net)

Engines go to BUNDLE/engines/<gpu>-sm<cc>-trt<version>/ with a JSON sidecar each
(TensorRT version, GPU, profiles, ONNX hash, flags, build time); up-to-date
engines are kept unless --force. Precision comes from the ONNX (TensorRT builds
strongly typed networks): fp16 engines need an fp16 export, INT8/FP8 U-Net
engines a bundle from infiniteid calibrate (its Q/DQ nodes set the precision).
The VAE decoder stays fp32 unless it was exported in fp16.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build",
        help="build TensorRT engines for a bundle on this GPU",
        description="Build a TensorRT engine per bundle component (and the on-GPU guidance + step graph).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="bundle folder (from infiniteid export)")
    p.add_argument("--precision", choices=("fp16", "fp32", "int8", "fp8"), default=None,
                   help="expected precision; checked against the bundle's ONNX (default: as exported). "
                        "int8/fp8: the U-Net's Q/DQ nodes from infiniteid calibrate")
    p.add_argument("--shapes", choices=("static", "dynamic"), default="static",
                   help="static: one fixed shape for the U-Net/VAE (fastest, CUDA graphs); "
                        "dynamic: the manifest's ranges (default: static)")
    p.add_argument("--height", type=int, default=None, help="static height in pixels (default: the bundle's, 1024 for SDXL)")
    p.add_argument("--width", type=int, default=None, help="static width in pixels (default: the bundle's)")
    p.add_argument("--images", type=int, default=1, help="static images per batch (default: 1)")
    p.add_argument("--no-cfg", action="store_true",
                   help="static engines for guidance 1 (no CFG: half the U-Net batch), the fast path of "
                        "few-step bases (SDXL-Lightning, Hyper-SD); requests with guidance are then refused")
    p.add_argument("--opt-level", type=int, default=3, metavar="N",
                   help="TensorRT builder optimisation level 0-5 (default: 3)")
    p.add_argument("--timing-cache", metavar="FILE", default=None,
                   help="timing cache to reuse and update (default: timing.cache in the engine folder)")
    p.add_argument("--workspace", type=float, default=None, metavar="GB",
                   help="builder workspace limit in GiB (default: TensorRT's, all device memory)")
    p.add_argument("--version-compatible", action="store_true",
                   help="version-compatible plans (run on newer TensorRT 10/11 and the lean runtime; slower)")
    p.add_argument("--components", nargs="+", metavar="NAME", default=None,
                   help="build only these components (default: all and the step graphs)")
    p.add_argument("--no-step-graph", action="store_true",
                   help="skip the guidance + step engine (the runtime then steps on the host)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--dry-run", action="store_true", help="print the engines and profiles as JSON, build nothing")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def options_from_args(args):
    """``BuildOptions`` from the parsed arguments (validated)."""
    from ..cli import UserError
    from ..trt.plan import BuildError, BuildOptions

    opts = BuildOptions(
        precision=args.precision,
        shapes=args.shapes,
        height=args.height,
        width=args.width,
        images=args.images,
        cfg=not args.no_cfg,
        opt_level=args.opt_level,
        timing_cache=args.timing_cache,
        workspace_gb=args.workspace,
        version_compatible=args.version_compatible,
        components=args.components,
        step_graphs=not args.no_step_graph,
        force=args.force,
    )
    try:
        opts.validate()
    except BuildError as e:
        raise UserError(str(e)) from None
    return opts


def run(args) -> int:
    from ..cli import UserError
    from ..runtime.loader import Bundle
    from ..trt.names import EngineError
    from ..trt.plan import BuildError, describe_jobs, plan_jobs
    from ..trt.profiles import ProfileError

    opts = options_from_args(args)
    bundle = Bundle.load(args.bundle, verify_hashes=not args.dry_run)
    manifest = bundle.manifest
    try:
        plan = opts.shape_plan(manifest)
        jobs = plan_jobs(bundle.path, manifest, opts, plan)  # precision and profile checks, before TensorRT
        if args.dry_run:
            print(json.dumps({"bundle": str(bundle.path), "flags": opts.flags(plan), "engines": describe_jobs(jobs)},
                             indent=2))
            return 0
        return _build(bundle, opts, args)
    except (BuildError, ProfileError, EngineError) as e:
        raise UserError(str(e)) from None


def _build(bundle, opts, args) -> int:
    from ..trt import cuda
    from ..trt.builder import TrtBuilder, import_tensorrt_builder
    from ..trt.engine_check import Target
    from ..trt.names import engine_folder
    from ..trt.plan import default_timing_cache, run_build

    trt = import_tensorrt_builder()
    cuda.require_device(0)
    device = cuda.device_info(0)
    target = Target(device=device, trt_version=str(trt.__version__))
    folder = engine_folder(bundle.path, device, target.trt_version)
    builder = TrtBuilder(opts, timing_cache=default_timing_cache(folder, opts), verbose=args.verbose,
                         progress=not args.no_progress)
    print(f"building engines for {device.name} (sm {device.cc}), TensorRT {target.trt_version} -> {folder}",
          file=sys.stderr)
    report = run_build(bundle.path, bundle.manifest, opts, target, builder, progress=not args.no_progress)
    for name in report.built:
        print(f"built {name} in {report.seconds[name]:.1f} s")
    for name in report.skipped:
        print(f"kept {name} (up to date; --force rebuilds)")
    print(f"engines: {report.folder}")
    return 0
