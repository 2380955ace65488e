"""``infiniteid check BUNDLE --backend trt --against ort``: per-component parity between two backends."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

EPILOG = """\
examples:
  infiniteid check bundle/ --backend trt --against ort          TensorRT engines vs onnxruntime
  infiniteid check fp16/ --backend ort --against ort --bundle-b fp32/
                                                                fp16 export vs fp32 export
  infiniteid check bundle/ --backend trt --against ort --components unet --json parity.json

Every component runs once on both sides with the same seeded inputs (real
prompts through the bundle's tokenizers, random embeddings, noise and latents)
at the bundle's default resolution, or at the shapes static engines were built
for. Per output: max/mean absolute and relative error, whole-tensor relative L2
error and cosine similarity.

exit status:
  0  every output within the tolerance
  1  a usage error (bad value, missing bundle, backend that cannot run here)
  2  a malformed command line (unknown option, missing argument)
  3  the check ran and an output failed the tolerance (TOLERANCE_FAILED)
"""

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
    p.add_argument("--against", default="ort", help="reference backend: ort or trt (default: ort)")
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

    for side in (args.backend, args.against):
        if side is not None and side not in BACKENDS:
            raise UserError(f"unknown backend {side!r}; choose from {', '.join(BACKENDS)}")
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
        return {"components": comps, "engine_dir": args.engine_dir} if name == "trt" else {}

    cand = make_backend(args.backend, bundle_a, **options(args.backend))
    try:
        ref = make_backend(args.against, bundle_b, **options(args.against))
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
                reports.append(compare_outputs(c, out_a, out_b, tol))
        finally:
            ref.close()
    finally:
        cand.close()

    side_a = f"{args.backend}:{bundle_a.path}"
    side_b = f"{args.against}:{bundle_b.path}"
    print(f"candidate {side_a}  vs  reference {side_b}")
    print(format_table(reports))
    if args.json:
        write_atomic(Path(args.json), reports_to_json(
            reports, candidate={"backend": args.backend, "bundle": str(bundle_a.path)},
            reference={"backend": args.against, "bundle": str(bundle_b.path)},
            height=height, width=width, images=args.images, seed=args.seed,
            tolerance={"min_cosine": tol.min_cosine, "max_rel_l2": tol.max_rel_l2, "max_abs": tol.max_abs},
        ) + "\n")
    failed = [r.component for r in reports if not r.passed]
    if failed:
        print(f"parity check FAILED for: {', '.join(failed)}", file=sys.stderr)
        return TOLERANCE_FAILED
    print("parity check passed")
    return 0
