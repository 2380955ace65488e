"""``infiniteid demo --out DIR``: the whole path on the embedded tiny model, in seconds, on a CPU.

1. Export the tiny random-weight model to a bundle, once, into a cache folder
   (``$INFINITEID_CACHE`` or ``~/.cache/infiniteid``; the export needs PyTorch,
   the generation after it does not);
2. write a synthetic insightface model folder (a scripted detector and a random
   ArcFace-shaped recogniser) and a synthetic face picture it accepts;
3. generate through the torch-free runtime on onnxruntime and write
   ``DIR/demo.png`` and ``DIR/demo.json`` (every setting used).

The weights are random, so the image is noise-like: the demo shows that the
pipeline runs end to end, not what Infinite-ID looks like.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

BUNDLE_NAME = "tiny-bundle-v1"
FACE_MODELS_NAME = "synthetic-face-models-v1"
DEFAULT_PROMPT = "a photo of a person in comic book style"
RANDOM_WEIGHTS_NOTE = (
    "The demo model has RANDOM weights: the image is noise-like by design. It shows that export, "
    "face front end, runtime and decoding run end to end; it is not an Infinite-ID result."
)

EPILOG = """\
examples:
  infiniteid demo --out demo-out
  infiniteid demo --out demo-out --steps 8 --seed 3 --prompt "an astronaut, oil painting"
  INFINITEID_CACHE=/tmp/iid infiniteid demo --out demo-out --refresh
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the embedded tiny random-weight model (CPU, seconds)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for demo.png and demo.json")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--scheduler", default="ddim", help="ddim (default), euler or dpmpp_2m")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--refresh", action="store_true", help="re-export the cached tiny bundle")
    p.set_defaults(run=run)


def cache_dir() -> Path:
    """``$INFINITEID_CACHE`` or ``~/.cache/infiniteid``."""
    env = os.environ.get("INFINITEID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infiniteid"


def tiny_bundle(cache: Path, refresh: bool = False, progress: bool = True) -> Path:
    """The cached tiny bundle, exported on first use (into a temporary folder, then renamed,
    so an interrupted export never leaves a half-written bundle behind)."""
    from ..bundle import BundleError
    from ..cli import UserError
    from ..runtime.loader import Bundle

    target = cache / BUNDLE_NAME
    if target.exists() and not refresh:
        try:
            Bundle.load(target)
            return target
        except BundleError as e:
            print(f"the cached bundle is unusable ({e}); exporting it again")
    try:
        from ..export import export_tiny_bundle
    except ImportError as e:
        raise UserError(
            "the demo exports the tiny model once, which needs the export extra "
            f"(pip install torch==2.13.0 'infiniteid-rt[export]'): {e}"
        ) from None
    cache.mkdir(parents=True, exist_ok=True)
    print(f"exporting the tiny random-weight model to {target} (once)...")
    if target.exists():  # our own cache entry, unusable or to be refreshed
        shutil.rmtree(target)
    export_tiny_bundle(target, seed=0, progress=progress)  # atomic: staged, then renamed into place
    return target


def synthetic_face_models(cache: Path) -> Path:
    """The synthetic insightface folder (a scripted detector: one face in the middle half)."""
    from ..face.synthetic import SYNTHETIC_DETECTOR, SYNTHETIC_RECOGNIZER, write_synthetic_face_models

    folder = cache / FACE_MODELS_NAME
    if not ((folder / SYNTHETIC_DETECTOR).is_file() and (folder / SYNTHETIC_RECOGNIZER).is_file()):
        tmp = Path(tempfile.mkdtemp(prefix=f".{FACE_MODELS_NAME}-", dir=cache))
        try:
            write_synthetic_face_models(tmp / "models", seed=0)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp / "models", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def demo_face(size: int = 256):
    """A drawn face: the synthetic detector reports its scripted face where the picture has
    contrast inside the middle half, which this drawing has. Returns a PIL image."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (92, 140, 196))
    d = ImageDraw.Draw(im)
    s = size / 256
    box = lambda *xy: [v * s for v in xy]  # noqa: E731
    d.ellipse(box(64, 40, 192, 216), fill=(236, 196, 164), outline=(120, 80, 60), width=max(1, int(3 * s)))
    d.pieslice(box(60, 28, 196, 130), 180, 360, fill=(70, 45, 30))
    for x in (98, 158):
        d.ellipse(box(x - 12, 104, x + 12, 122), fill=(255, 255, 255))
        d.ellipse(box(x - 5, 107, x + 5, 119), fill=(40, 60, 90))
    d.polygon(box(128, 122, 118, 156, 138, 156), fill=(210, 160, 130))
    d.arc(box(100, 160, 156, 192), 20, 160, fill=(150, 50, 60), width=max(1, int(4 * s)))
    return im


def run(args: argparse.Namespace) -> int:
    from .. import generation as gen
    from ..cli import UserError
    from ..runtime import Runtime
    from .generate import arguments, save_png, versions, write_sidecar

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out must be a folder, {args.out} is a file")
    args.out.mkdir(parents=True, exist_ok=True)

    cache = cache_dir()
    bundle = tiny_bundle(cache, refresh=args.refresh)
    face_models = synthetic_face_models(cache)
    face_path = args.out / "demo-face.png"
    demo_face().save(face_path)

    opts = {"intra_op_threads": args.threads} if args.threads else {}
    rt = Runtime(bundle, backend="ort", face_models=face_models, **opts)
    request = gen.GenerationRequest(prompt=args.prompt, faces=[str(face_path)], seed=args.seed)
    settings = gen.BatchSettings(
        height=rt.default_height, width=rt.default_width, steps=args.steps, scheduler=args.scheduler
    )
    t0 = time.perf_counter()
    try:
        out = rt.generate([request], settings)
        backend_info = rt.backend.describe() if hasattr(rt.backend, "describe") else {"backend": "ort"}
    finally:
        rt.close()
    seconds = time.perf_counter() - t0

    png = args.out / "demo.png"
    save_png(out.images[0], png)
    write_sidecar(png, {
        "note": RANDOM_WEIGHTS_NOTE,
        "request": gen.describe(request),
        "settings": settings.to_dict(),
        "source": {
            "engine": "runtime",
            "bundle": str(bundle.resolve()),
            "model": "tiny random-weight model (seed 0)",
            "backend": backend_info,
            "face_models": str(face_models.resolve()) + " (synthetic: scripted detector, random recogniser)",
            "face_image": str(face_path),
            "seconds": round(seconds, 3),
            "timings": {k: round(v, 3) for k, v in out.timings.items()},
        },
        "outputs": {"image": str(png)},
        "versions": versions(),
        "arguments": arguments(args),
    })
    print(f"wrote {png} ({settings.width}x{settings.height}, {settings.steps} steps, {seconds:.2f} s) and {png.with_suffix('.json')}")
    print(RANDOM_WEIGHTS_NOTE)
    return 0
