"""``infiniteid check BUNDLE --backend trt --against ort``: per-component parity between two backends."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

EPILOG = """\
examples:
  infiniteid check bundle/ --backend trt --against ort          TensorRT engines vs onnxruntime
  infiniteid check fp16/ --backend ort --against ort --bundle-b fp32/
                                                                fp16 export vs fp32 export
  infiniteid check bundle/ --backend trt --against ort --components unet --json parity.json
  infiniteid check bundle/ --backend trt --against polygraphy   our TensorRT runner vs Polygraphy's TrtRunner
                                                                on the same engines
  infiniteid check fp16/ --backend ort --against polygraphy --bundle-b fp32/
                                                                the reference side on Polygraphy's OnnxrtRunner

Every component runs once on both sides with the same seeded inputs (real
prompts through the bundle's tokenizers, random embeddings, noise and latents)
at the bundle's default resolution, or at the shapes static engines were built
for. Per output: max/mean absolute and relative error, whole-tensor relative L2
error and cosine similarity.

--against polygraphy runs the reference side with NVIDIA's Polygraphy (its
TrtRunner on the same engine files when the candidate is trt, else its
OnnxrtRunner on the ONNX files; --polygraphy-runner chooses) and also compares
with Polygraphy's Comparator, whose absolute errors must agree with ours.
A failing component's inputs and both outputs are written to --failures-dir in
Polygraphy's JSON formats; the command printed next to them reruns the case with
`polygraphy run ... --load-inputs ... --load-outputs ...`.

exit status:
  0  every output within the tolerance
  1  a usage error (bad value, missing bundle, backend that cannot run here)
  2  a malformed command line (unknown option, missing argument)
  3  the check ran and an output failed the tolerance (TOLERANCE_FAILED)
"""

#: reference-only choices of --against besides the runtime's backends
POLYGRAPHY = "polygraphy"
#: exit status of a check that ran and found an output outside the tolerance (usage errors exit 1)
TOLERANCE_FAILED = 3

PROMPTS = (
    "a photo of a person",
    "a portrait of a person in comic book style",
    "a person on a beach at sunset, film photograph",
    "an oil painting of a person wearing a hat",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="compare two backends (or two bundles) component by component",
        description="Run every bundle component on two backends with the same inputs and report error statistics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="bundle folder (the candidate side)")
    p.add_argument("--backend", default=None,
                   help="candidate backend: trt or ort (default: trt where TensorRT, a GPU and engines exist, else ort)")
    p.add_argument("--against", default="ort", help="reference backend: ort, trt or polygraphy (default: ort)")
    p.add_argument("--polygraphy-runner", choices=("auto", "onnxrt", "trt"), default="auto",
                   help="with --against polygraphy: its TensorRT or onnxruntime runner (default: trt when the "
                        "candidate is trt, else onnxrt)")
    p.add_argument("--failures-dir", metavar="DIR", default="check-failures",
                   help="where a failing component's inputs and outputs are written (default: check-failures)")
    p.add_argument("--no-failure-files", action="store_true", help="do not write failing cases")
    p.add_argument("--bundle-b", metavar="BUNDLE", default=None,
                   help="reference bundle (default: the same bundle), e.g. an fp32 export to check an fp16 one")
    p.add_argument("--components", nargs="+", metavar="NAME", default=None, help="only these components")
    p.add_argument("--height", type=int, default=None, help="image height for the inputs (default: the bundle's)")
    p.add_argument("--width", type=int, default=None, help="image width for the inputs (default: the bundle's)")
    p.add_argument("--images", type=int, default=1, help="images per batch for the inputs (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--min-cosine", type=float, default=0.999, help="fail below this cosine similarity (default: 0.999)")
    p.add_argument("--max-rel-l2", type=float, default=0.05,
                   help="fail above this relative L2 error ||a-b||/||b|| (default: 0.05)")
    p.add_argument("--max-abs", type=float, default=None, help="fail above this max absolute error (default: off)")
    p.add_argument("--engine-dir", default=None, help="TensorRT engine folder (default: the one for this GPU)")
    p.add_argument("--trust-engine-code", action="store_true",
                   help="let TensorRT run host code carried by plans not built on this machine (version-compatible "
                        "plans embed a lean runtime library); only for bundles you trust")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the statistics as JSON")
    p.set_defaults(run=run)


# -- inputs -----------------------------------------------------------------------------------
def _rng(seed: int, component: str) -> np.random.Generator:
    """One generator per component, so checking a subset gives the same inputs."""
    return np.random.default_rng([seed, sum(component.encode())])


def sample_feeds(bundle, component: str, shapes: Mapping[str, Sequence[int]], seed: int = 0,
                 height: int = 1024, width: int = 1024) -> Dict[str, np.ndarray]:
    """Realistic inputs for ``component`` at ``shapes`` (float32 / int64; backends cast to their dtypes)."""
    from ..contract import TEXT_ENCODER
    from ..generation import sdxl_time_ids
    from ..tokenize import PromptTokenizer

    rng = _rng(seed, component)
    spec = bundle.component(component)
    feeds: Dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(int(v) for v in shapes[t.name])
        if t.name == "input_ids":
            path = bundle.tokenizer_paths()[0 if component == TEXT_ENCODER else 1]
            tok = PromptTokenizer.from_file(path, max_length=shape[1])
            ids = tok([PROMPTS[i % len(PROMPTS)] for i in range(shape[0])])
            feeds[t.name] = ids.astype(np.int64)
        elif t.name == "face_embeds":
            x = rng.standard_normal(shape)
            feeds[t.name] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, 500.0, dtype=np.float32)
        elif t.name == "time_ids":
            feeds[t.name] = np.broadcast_to(sdxl_time_ids(height, width), shape).astype(np.float32)
        elif t.name == "id_scale":
            feeds[t.name] = np.ones(shape, dtype=np.float32)
        elif t.dtype.startswith("int"):
            feeds[t.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def input_shapes(bundle, component: str, height: int, width: int, images: int,
                 fixed: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Sequence[int]]:
    """Shapes of every input: a static engine's own, else resolved for the requested resolution and batch."""
    from ..trt.profiles import ShapePlan, resolve_shape

    if fixed:
        return dict(fixed)
    symbols = ShapePlan(mode="dynamic", height=height, width=width, images=images).symbols()
    return {t.name: resolve_shape(t, symbols) for t in bundle.component(component).inputs}


# -- the command ------------------------------------------------------------------------------------
def _same_interface(a, b) -> None:
    from ..cli import UserError
    from ..contract import COMPONENTS

    for c in COMPONENTS:
        sa, sb = a.component(c), b.component(c)
        for kind in ("inputs", "outputs"):
            ta = [(t.name, [d if isinstance(d, int) else "*" for d in t.shape]) for t in getattr(sa, kind)]
            tb = [(t.name, [d if isinstance(d, int) else "*" for d in t.shape]) for t in getattr(sb, kind)]
            if sorted(ta, key=str) != sorted(tb, key=str):
                raise UserError(f"the two bundles' {c} {kind} differ ({ta} vs {tb}); they are not the same model")


def run(args) -> int:
    from pathlib import Path

    from ..cli import UserError
    from ..compare import Tolerance, compare_outputs, format_table, reports_to_json
    from ..contract import COMPONENTS
    from ..runtime.backend import BACKENDS, default_backend, make_backend
    from ..runtime.loader import Bundle
    from ..trt.names import write_atomic

    if args.backend is not None and args.backend not in BACKENDS:
        raise UserError(f"unknown backend {args.backend!r}; choose from {', '.join(BACKENDS)}")
    if args.against not in BACKENDS and args.against != POLYGRAPHY:
        raise UserError(f"unknown backend {args.against!r}; choose from {', '.join([*BACKENDS, POLYGRAPHY])}")
    comps = list(args.components or COMPONENTS)
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
        raise UserError(f"unknown component(s) {', '.join(bad)}; choose from {', '.join(COMPONENTS)}")
    same_bundle = args.bundle_b is None or Path(args.bundle_b).resolve() == Path(args.bundle).resolve()
    chosen = args.backend is None
    if chosen:
        args.backend = default_backend(Bundle.load(args.bundle))
    if args.backend == args.against and same_bundle:
        why = " (the default here: no GPU with TensorRT and engines)" if chosen and args.backend == "ort" else ""
        raise UserError(f"comparing backend {args.backend!r}{why} with itself on one bundle shows nothing; "
                        "choose another --backend/--against or give a second bundle with --bundle-b")
    if args.images < 1:
        raise UserError(f"--images must be a positive integer, got {args.images}")
    tol = Tolerance(min_cosine=args.min_cosine, max_rel_l2=args.max_rel_l2, max_abs=args.max_abs)
    try:
        tol.validate()
    except ValueError as e:
        raise UserError(str(e)) from None

    bundle_a = Bundle.load(args.bundle)
    bundle_b = bundle_a if same_bundle else Bundle.load(args.bundle_b)
    if not same_bundle:
        _same_interface(bundle_a, bundle_b)
    res = bundle_a.manifest.resolution or {}
    height = args.height or int(res.get("default_height", 1024))
    width = args.width or int(res.get("default_width", 1024))
    from ..generation import check_resolution

    check_resolution(height, width, int(res.get("multiple", 8)))

    def options(name: str) -> Dict[str, Any]:
        return {"components": comps, "engine_dir": args.engine_dir,
                "trust_engine_code": args.trust_engine_code} if name == "trt" else {}

    against = args.against
    if args.against == POLYGRAPHY:
        runner = args.polygraphy_runner
        if runner == "auto":
            runner = "trt" if args.backend == "trt" else "onnxrt"
        against = f"{POLYGRAPHY}-{runner}"

    def reference():
        if args.against != POLYGRAPHY:
            return make_backend(args.against, bundle_b, **options(args.against))
        from ..trt.polygraphy_side import PolygraphyBackend

        return PolygraphyBackend(bundle_b, runner=against.split("-", 1)[1], components=comps,
                                 engine_dir=args.engine_dir)

    cand = make_backend(args.backend, bundle_a, **options(args.backend))
    second: Dict[str, Any] = {}
    saved: Dict[str, List[str]] = {}
    try:
        ref = reference()
        try:
            reports = []
            for c in comps:
                fixed = None
                for be in (cand, ref):
                    get = getattr(be, "fixed_input_shapes", None)
                    fixed = fixed or (get(c) if get else None)
                shapes = input_shapes(bundle_a, c, height, width, args.images, fixed)
                feeds = sample_feeds(bundle_a, c, shapes, args.seed, height, width)
                print(f"checking {c} ({', '.join(f'{n} {list(v.shape)}' for n, v in feeds.items())})", file=sys.stderr)
                out_a = cand.run(c, feeds)
                out_b = ref.run(c, feeds)
                report = compare_outputs(c, out_a, out_b, tol)
                if args.against == POLYGRAPHY:
                    from ..trt.polygraphy_side import disagreements, polygraphy_errors

                    second[c] = polygraphy_errors(out_a, out_b, list(out_b))
                    for why in disagreements(report.stats, second[c]):
                        report.failures.setdefault(why.split(":", 1)[0], []).append(why)
                reports.append(report)
                if not report.passed and not args.no_failure_files:
                    saved[c] = _save_case(args, c, feeds, out_a, out_b, bundle_a, bundle_b, against)
        finally:
            ref.close()
    finally:
        cand.close()

    side_a = f"{args.backend}:{bundle_a.path}"
    side_b = f"{against}:{bundle_b.path}"
    print(f"candidate {side_a}  vs  reference {side_b}")
    print(format_table(reports))
    if second:
        disagree = [w for r in reports for ws in r.failures.values() for w in ws if w.count("polygraphy's")]
        worst = max((v["max_absdiff"] for outs in second.values() for v in outs.values()), default=0.0)
        print("polygraphy's comparator DISAGREES with these statistics (see failures)" if disagree else
              f"polygraphy's comparator agrees with these statistics (largest max_absdiff {worst:.3e})")
    for c, files in saved.items():
        print(f"{c}: inputs and outputs written to {', '.join(files[:-1] or files)}", file=sys.stderr)
        if files[-1]:
            print(f"  rerun: {files[-1]}", file=sys.stderr)
    if args.json:
        write_atomic(Path(args.json), reports_to_json(
            reports, candidate={"backend": args.backend, "bundle": str(bundle_a.path)},
            reference={"backend": against, "bundle": str(bundle_b.path)},
            **({"polygraphy_comparator": second} if second else {}),
            **({"failure_files": {c: f[:-1] for c, f in saved.items()}} if saved else {}),
            height=height, width=width, images=args.images, seed=args.seed,
            tolerance={"min_cosine": tol.min_cosine, "max_rel_l2": tol.max_rel_l2, "max_abs": tol.max_abs},
        ) + "\n")
    failed = [r.component for r in reports if not r.passed]
    if failed:
        print(f"parity check FAILED for: {', '.join(failed)}", file=sys.stderr)
        return TOLERANCE_FAILED
    print("parity check passed")
    return 0


def _save_case(args, component: str, feeds, out_a, out_b, bundle_a, bundle_b, against: str) -> List[str]:
    """Write the failing case; returns the files, then the ``polygraphy run`` line that replays it ("" if none)."""
    from pathlib import Path

    from ..trt.polygraphy_side import replay_command, save_failure_case

    folder = Path(args.failures_dir)
    files = save_failure_case(folder, component, feeds, out_a, out_b, bundle_a, bundle_b,
                              sides=(args.backend, against))
    return [str(f) for f in files] + [replay_command(bundle_a, component, files)]

