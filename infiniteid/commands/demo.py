"""``infiniteid demo --out DIR``: the whole path on a shipped model, in seconds, on a CPU.

Two models, both exported once to a bundle in a cache folder (``$INFINITEID_CACHE``
or ``~/.cache/infiniteid``; the export needs PyTorch, the generation after it does not):

* ``--model world`` (default): the tiny model trained on the generated world
  (``infiniteid/data/world-model``, see its ``MODEL.md``): it draws the prompt's scene
  (background, jacket colour, lighting) and carries part of the reference person's
  identity (measured in the README). The reference is a drawn person of that world.
* ``--model random``: the tiny random-weight model: a noise-like image that shows the
  pipeline runs end to end.

The demo writes a synthetic insightface model folder (a scripted detector, the
recogniser the world model was trained with), generates through the torch-free
runtime on onnxruntime, and writes ``DIR/demo.png`` (the image), ``DIR/demo.json``
(every setting used), ``DIR/demo-face.png`` (the reference) and, for the world model,
``DIR/demo-sheet.png``: reference | the prompt without the identity (text stream) | the image.
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
WORLD_BUNDLE_PREFIX = "world-bundle-"
FACE_MODELS_NAME = "synthetic-face-models-v1"
WORLD_MODEL = Path(__file__).resolve().parents[1] / "data" / "world-model"
DEFAULT_PROMPT = "a photo of a person in comic book style"
WORLD_PROMPT = "a photo of a person wearing a red jacket in the snow at sunset"
RANDOM_WEIGHTS_NOTE = (
    "The demo model has RANDOM weights: the image is noise-like by design. It shows that export, "
    "face front end, runtime and decoding run end to end; it is not an Infinite-ID result."
)
WORLD_NOTE = (
    "The demo model is the tiny model trained on the generated world (infiniteid/data/world-model/MODEL.md): "
    "it draws the prompt's scene and carries part of the reference person's identity; see demo-sheet.png."
)

EPILOG = """\
examples:
  infiniteid demo --out demo-out
  infiniteid demo --out demo-out --seed 3 --prompt "a photo of a person wearing a green jacket in the beach at night"
  infiniteid demo --out demo-out --model random --steps 8 --prompt "an astronaut, oil painting"
  INFINITEID_CACHE=/tmp/iid infiniteid demo --out demo-out --refresh
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a shipped tiny model (trained on the generated world, or random; CPU, seconds)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for demo.png and demo.json")
    p.add_argument("--model", choices=("world", "random"), default="world",
                   help="world: the tiny model trained on the generated world (default); random: random weights")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 world, 4 random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--prompt", default=None,
                   help=f"prompt (default {WORLD_PROMPT!r}; random: {DEFAULT_PROMPT!r})")
    p.add_argument("--face", type=Path, default=None, metavar="IMAGE",
                   help="reference picture (default: a drawn person of the world; the synthetic detector finds one "
                        "face filling the middle half of the picture)")
    p.add_argument("--scheduler", default="ddim", help="ddim (default), euler or dpmpp_2m")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--refresh", action="store_true", help="re-export the cached bundle")
    p.set_defaults(run=run)


def cache_dir() -> Path:
    """``$INFINITEID_CACHE`` or ``~/.cache/infiniteid``."""
    env = os.environ.get("INFINITEID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infiniteid"


def tiny_bundle(cache: Path, refresh: bool = False, progress: bool = True) -> Path:
    """The cached tiny random-weight bundle, exported on first use."""
    def export(target: Path) -> None:
        from ..export import export_tiny_bundle

        export_tiny_bundle(target, seed=0, progress=progress)

    return _cached_bundle(cache / BUNDLE_NAME, export, "the tiny random-weight model", refresh)


def world_model_digest(folder: Path = WORLD_MODEL) -> str:
    """sha256 of the shipped world model's files (names and bytes): the cache key of its bundle."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def world_bundle(cache: Path, refresh: bool = False, progress: bool = True, folder: Path = WORLD_MODEL) -> Path:
    """The cached bundle of the shipped world model (named by its digest, so a new model
    in a new version of the package is exported again, never mixed up with the old one)."""
    from ..cli import UserError

    if not (folder / "adapter.safetensors").is_file():
        raise UserError(f"the world model is missing from this installation ({folder}); "
                        "reinstall the package or run the demo with --model random")

    def export(target: Path) -> None:
        from ..export import export_bundle
        from ..model.pipeline import InfiniteIDPipeline

        pipe = InfiniteIDPipeline.from_pretrained(folder / "base", folder / "image_encoder", folder / "adapter.safetensors")
        export_bundle(pipe, target, progress=progress)

    return _cached_bundle(cache / (WORLD_BUNDLE_PREFIX + world_model_digest(folder)[:16]), export,
                          "the world model", refresh)


def _cached_bundle(target: Path, export, what: str, refresh: bool) -> Path:
    """``target`` when it holds a usable bundle, else ``export(target)`` first (an atomic
    export: staged, then renamed, so an interrupted one never leaves half a bundle)."""
    from ..bundle import BundleError
    from ..cli import UserError
    from ..runtime.loader import Bundle

    if target.exists() and not refresh:
        try:
            Bundle.load(target)
            return target
        except BundleError as e:
            print(f"the cached bundle is unusable ({e}); exporting it again")
    try:
        import torch  # noqa: F401  (the export needs PyTorch; say so before anything starts)
        from .. import export as _export  # noqa: F401
    except ImportError as e:
        raise UserError(
            "the demo exports its model once, which needs the export extra "
            f"(pip install torch==2.13.0 'infiniteid-rt[export]'): {e}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"exporting {what} to {target} (once)...")
    if target.exists():  # our own cache entry, unusable or to be refreshed
        shutil.rmtree(target)
    export(target)
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


def world_face(size: int = 128):
    """The demo's reference: a person of the generated world (dark skin, round face, long red
    hair, green eyes, glasses) in a scene the default prompt does not name. A PIL image."""
    from PIL import Image

    from ..evaluation import world as W

    person = W.Identity(skin="dark", face_shape="round", hair_colour="red", hair_style="long", eyes="green",
                        glasses=True)
    return Image.fromarray(W.render(person, W.Scene("forest", "blue", "day"), size))


def run(args: argparse.Namespace) -> int:
    from .. import generation as gen
    from ..cli import UserError
    from ..runtime import Runtime
    from .generate import arguments, save_png, versions, write_sidecar

    world = args.model == "world"
    steps = args.steps if args.steps is not None else (20 if world else 4)
    prompt = args.prompt if args.prompt is not None else (WORLD_PROMPT if world else DEFAULT_PROMPT)
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out must be a folder, {args.out} is a file")
    if args.face is not None and not args.face.is_file():
        raise UserError(f"--face: no such file: {args.face}")
    args.out.mkdir(parents=True, exist_ok=True)

    cache = cache_dir()
    bundle = world_bundle(cache, refresh=args.refresh) if world else tiny_bundle(cache, refresh=args.refresh)
    face_models = synthetic_face_models(cache)
    face_path = args.out / "demo-face.png"
    if args.face is not None:
        if args.face.resolve() != face_path.resolve():
            shutil.copyfile(args.face, face_path)
    else:
        (world_face() if world else demo_face()).save(face_path)

    opts = {"intra_op_threads": args.threads} if args.threads else {}
    rt = Runtime(bundle, backend="ort", face_models=face_models, **opts)
    request = gen.GenerationRequest(prompt=prompt, faces=[str(face_path)], seed=args.seed)
    settings = gen.BatchSettings(height=rt.default_height, width=rt.default_width, steps=steps,
                                 scheduler=args.scheduler, return_text_stream=world)
    t0 = time.perf_counter()
    try:
        out = rt.generate([request], settings)
        backend_info = rt.backend.describe() if hasattr(rt.backend, "describe") else {"backend": "ort"}
    finally:
        rt.close()
    seconds = time.perf_counter() - t0

    png = args.out / "demo.png"
    save_png(out.images[0], png)
    outputs = {"image": str(png)}
    if world:
        sheet = args.out / "demo-sheet.png"
        save_png(side_by_side([face_path, out.text_images[0], out.images[0]], rt.default_height), sheet)
        outputs["sheet"] = str(sheet)
    note = WORLD_NOTE if world else RANDOM_WEIGHTS_NOTE
    write_sidecar(png, {
        "note": note,
        "request": gen.describe(request),
        "settings": settings.to_dict(),
        "source": {
            "engine": "runtime",
            "bundle": str(bundle.resolve()),
            "model": ("tiny model trained on the generated world (infiniteid/data/world-model)" if world
                      else "tiny random-weight model (seed 0)"),
            "backend": backend_info,
            "face_models": str(face_models.resolve()) + " (synthetic: scripted detector, random recogniser)",
            "face_image": str(face_path),
            "seconds": round(seconds, 3),
            "timings": {k: round(v, 3) for k, v in out.timings.items()},
        },
        "outputs": outputs,
        "versions": versions(),
        "arguments": arguments(args),
    })
    extra = f", {outputs['sheet']}" if world else ""
    print(f"wrote {png} ({settings.width}x{settings.height}, {steps} steps, {seconds:.2f} s){extra} and "
          f"{png.with_suffix('.json')}")
    print(note)
    return 0


def side_by_side(images, height: int):
    """Pictures (paths or PIL images) resized to ``height`` and put in a row. A PIL image."""
    from PIL import Image

    ims = [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i.convert("RGB") for i in images]
    ims = [im.resize((round(im.width * height / im.height), height), Image.LANCZOS) for im in ims]
    row = Image.new("RGB", (sum(im.width for im in ims), height))
    x = 0
    for im in ims:
        row.paste(im, (x, 0))
        x += im.width
    return row
