"""``infiniteid generate``: one image from a face photo and a prompt.

Two ways to run it, chosen by which weights are given:

* ``--bundle BUNDLE``: the torch-free runtime on an exported bundle, with the
  onnxruntime (``--backend ort``, default) or TensorRT (``--backend trt``) backend;
* ``--base DIR --image-encoder DIR --adapter FILE``: the PyTorch reference on
  real weights (SDXL diffusers folder, CLIP image encoder folder, ID adapter).

Both write the PNG and a JSON sidecar next to it (same name, ``.json``) with
every setting used, so a result can be reproduced.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

EPILOG = """\
examples:
  # torch-free runtime on an exported bundle (onnxruntime on CPU or CUDA)
  infiniteid generate --bundle out/bundle --face me.jpg --prompt "a person in comic book style" \\
      --face-models ~/.insightface/models/antelopev2 --out me-comic.png

  # the same on TensorRT engines built with 'infiniteid build'
  infiniteid generate --bundle out/bundle --backend trt --face me.jpg --prompt "an astronaut" --out a.png

  # version-compatible engines built on another machine carry host code: run them only if you trust the builder
  infiniteid generate --bundle theirs/ --backend trt --trust-engine-code --face me.jpg --prompt "a portrait" --out p.png

  # the PyTorch reference on real weights; two --face mix identities
  infiniteid generate --base sdxl-base-1.0 --image-encoder clip-vit-h --adapter infiniteid.safetensors \\
      --face-models antelopev2 --face a.jpg --face b.jpg --prompt "a portrait" --out mix.png

  # the reference with LoRAs fused as 'infiniteid export --lora' does (a few-step LoRA: 4 steps, no CFG)
  infiniteid generate --base sdxl-base-1.0 --image-encoder clip-vit-h --adapter infiniteid.safetensors \\
      --face-models antelopev2 --face me.jpg --prompt "a portrait" --out fast.png \\
      --lora sdxl_lightning_4step_lora.safetensors --scheduler-config trailing --scheduler euler --steps 4 --guidance 1
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate an image of a person from a face photo and a prompt",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("weights (give --bundle, or --base with --image-encoder and --adapter)")
    which = src.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", type=Path, help="exported bundle folder (runs the torch-free runtime)")
    which.add_argument("--base", type=Path, help="SDXL diffusers folder (runs the PyTorch reference)")
    src.add_argument("--image-encoder", type=Path, help="CLIP image encoder folder (with --base)")
    src.add_argument("--adapter", type=Path, help="ID adapter: this project's .safetensors or a published IP-Adapter face file (with --base)")
    src.add_argument(
        "--face-models",
        type=Path,
        help="insightface model folder (detector + ArcFace); with --bundle it overrides the one the manifest references",
    )

    req = p.add_argument_group("what to make")
    req.add_argument("--face", type=Path, action="append", required=True, metavar="IMG",
                     help="reference face photo; give it twice to mix two identities")
    req.add_argument("--prompt", required=True, help="text prompt, e.g. 'a person in comic book style'")
    req.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    req.add_argument("--out", type=Path, required=True, metavar="FILE", help="output PNG; FILE.json gets every setting")
    req.add_argument("--text-stream-out", type=Path, metavar="FILE", help="also write the text stream's image here")

    s = p.add_argument_group("settings")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 5.0; 1 turns it off)")
    s.add_argument("--id-scale", type=float, default=None, help="weight of the identity cross-attention (default 1.0)")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    s.add_argument("--height", type=int, default=None, help="image height (default: the bundle's, or 1024)")
    s.add_argument("--width", type=int, default=None, help="image width (default: the bundle's, or 1024)")
    s.add_argument("--scheduler", default=None, help="ddim (default), euler or dpmpp_2m")
    s.add_argument("--no-mixed-attention", action="store_true",
                   help="ablation: plain self-attention in the ID stream (bundles: only if exported that way)")
    s.add_argument("--no-adain", action="store_true",
                   help="ablation: mixed attention without AdaIN-mean (bundles: only if exported that way)")

    b = p.add_argument_group("runtime (with --bundle)")
    b.add_argument("--backend", choices=("ort", "trt"), default="ort", help="onnxruntime (default) or TensorRT")
    b.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads (default: all CPUs)")
    b.add_argument("--verify-hashes", action="store_true", help="check every bundle file's sha256 against the manifest")
    b.add_argument("--trust-engine-code", action="store_true",
                   help="with --backend trt: let TensorRT run host code carried by plans not built on this machine "
                        "(version-compatible plans embed a lean runtime library); only for bundles you trust")

    r = p.add_argument_group("PyTorch reference (with --base)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA fused into the weights, as 'infiniteid export --lora' does; repeatable")
    r.add_argument("--scheduler-config", metavar="SPACING|FILE",
                   help="scheduler settings over the base's, as 'infiniteid export --scheduler-config' takes them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


# -- shared with the demo ------------------------------------------------------------
def versions() -> Dict[str, str]:
    """Versions of what produced an image (only modules already imported, plus numpy)."""
    out = {"python": platform.python_version()}
    for mod in ("numpy", "onnxruntime", "tokenizers", "torch", "diffusers", "tensorrt"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    from .. import __version__

    out["infiniteid-rt"] = __version__
    return out


def absolute(path: Any) -> str:
    """A path as the sidecars record it: absolute (relative paths mean nothing once the file is moved)."""
    return str(Path(path).expanduser().absolute())


def arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """The command's parsed arguments, JSON-friendly; paths absolute."""
    out: Dict[str, Any] = {}
    for k, v in vars(args).items():
        if k in ("run", "command"):
            continue
        if isinstance(v, list):
            out[k] = [absolute(x) if isinstance(x, Path) else str(x) for x in v]
        else:
            out[k] = absolute(v) if isinstance(v, Path) else v
    return out


def face_files(paths: Any) -> List[Dict[str, str]]:
    """Each face image by absolute path and sha256, so a sidecar says exactly which photo was used."""
    from ..bundle import file_digest

    return [{"path": absolute(p), "sha256": file_digest(Path(p))} for p in paths]


def write_sidecar(png: Path, record: Dict[str, Any]) -> Path:
    """``FILE.json`` next to ``FILE.png``."""
    path = png.with_suffix(".json")
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def save_png(image: Any, path: Path) -> None:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _check_out(path: Path, what: str) -> None:
    """Refuse, before any work, an output that could not be written after it."""
    from ..cli import UserError

    if path.suffix.lower() != ".png":
        raise UserError(f"{what} must be a .png file, got {path}")
    if path.exists() and path.is_dir():
        raise UserError(f"{what} {path} is a folder")
    folder = path.parent  # created when the image is written: its nearest existing ancestor must take it
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path} cannot be written: {folder} is a file, not a folder")
    for target in (path, path.with_suffix(".json")):
        if target.exists() and not os.access(target, os.W_OK):
            raise UserError(f"{what} {path} cannot be written: {target} is read-only")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written: no permission to write in {folder}")


def check_outputs(out: Path, text_out: Optional[Path]) -> None:
    """``--out`` (and ``--text-stream-out``) writable, and not the same file."""
    from ..cli import UserError

    _check_out(out, "--out")
    if text_out is not None:
        _check_out(text_out, "--text-stream-out")
        if text_out.expanduser().absolute().resolve() == out.expanduser().absolute().resolve():
            raise UserError("--text-stream-out must differ from --out (one image would overwrite the other)")


# -- the command -------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .. import generation as gen

    check_outputs(args.out, args.text_stream_out)
    for f in args.face:
        if f.is_dir():
            raise UserError(f"--face {f} is a folder; give an image file (a photo of the face)")
        if not f.is_file():
            raise UserError(f"face image not found: {f}")
    if len(args.face) > 1 and len(set(map(str, args.face))) != len(args.face):
        raise UserError("the same --face is given twice; give two different photos to mix identities")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {args.threads}")

    request = gen.GenerationRequest(
        prompt=args.prompt,
        faces=[absolute(f) for f in args.face],
        negative_prompt=args.negative_prompt,
        id_scale=gen.DEFAULT_ID_SCALE if args.id_scale is None else args.id_scale,
        guidance=gen.DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
        seed=args.seed,
    )
    if args.bundle is not None:
        for flag in ("image_encoder", "adapter", "device", "scheduler_config"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} only applies with --base (the PyTorch reference)")
        if args.lora:
            raise UserError("--lora only applies with --base; a bundle has its LoRAs fused at export (infiniteid export --lora)")
        return _run_bundle(args, request)
    if args.image_encoder is None or args.adapter is None:
        raise UserError("--base needs --image-encoder DIR and --adapter FILE as well")
    if args.face_models is None:
        raise UserError("--base needs --face-models DIR (the insightface folder) to read the face photo")
    if args.backend != "ort" or args.threads is not None or args.verify_hashes or args.trust_engine_code:
        raise UserError("--backend, --threads, --verify-hashes and --trust-engine-code only apply with --bundle")
    return _run_reference(args, request)


def _settings(args: argparse.Namespace, height: int, width: int):
    from .. import generation as gen

    guidance = gen.DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    return gen.BatchSettings(
        cfg=guidance != 1.0,  # guidance 1 is the conditional prediction alone: skip the unconditional half
        height=height if args.height is None else args.height,
        width=width if args.width is None else args.width,
        steps=gen.DEFAULT_STEPS if args.steps is None else args.steps,
        scheduler=gen.DEFAULT_SCHEDULER if args.scheduler is None else args.scheduler,
        mixed_attention=not args.no_mixed_attention,
        adain=not args.no_adain,
        return_text_stream=args.text_stream_out is not None,
    )


def _run_bundle(args: argparse.Namespace, request) -> int:
    from ..cli import UserError
    from ..runtime import Runtime
    from ..runtime.loader import Bundle

    opts: Dict[str, Any] = {}
    if args.threads is not None:
        if args.backend != "ort":
            raise UserError("--threads applies to the ort backend only")
        opts["intra_op_threads"] = args.threads
    if args.trust_engine_code:
        if args.backend != "trt":
            raise UserError("--trust-engine-code applies to the trt backend only")
        opts["trust_engine_code"] = True

    bundle = Bundle.load(args.bundle)
    if args.verify_hashes:  # opt-in: one read of every file; the cost is printed
        print(bundle.verify_hashes(progress=not args.no_progress), file=sys.stderr)
    if args.face_models is None and bundle.face_models_folder() is None:
        raise UserError("no face model folder is known (the bundle references none): pass --face-models DIR, "
                        "an insightface folder with a detector and ArcFace, such as antelopev2")
    rt = Runtime(bundle, backend=args.backend, face_models=args.face_models, **opts)
    try:
        settings = _settings(args, rt.default_height, rt.default_width)
        t0 = time.perf_counter()
        out = rt.generate([request], settings, progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        describe = getattr(rt.backend, "describe", None)
        backend_info = describe() if callable(describe) else {"backend": rt.backend.name}
    finally:
        rt.close()
    return _write(args, request, settings, out.images[0], out.text_images[0] if out.text_images else None, {
        "engine": "runtime",
        "bundle": str(Path(args.bundle).resolve()),
        "backend": backend_info,
        "face_models": absolute(rt.face.folder),
        "seconds": round(seconds, 3),
        "timings": {k: round(v, 3) for k, v in out.timings.items()},
    })


def _run_reference(args: argparse.Namespace, request) -> int:
    from ..cli import UserError

    try:
        import torch

        from ..model.loading import WeightsError
        from ..model.pipeline import InfiniteIDPipeline
    except ImportError as e:
        raise UserError(f"--base runs the PyTorch reference, which needs the export extra (pip install 'infiniteid-rt[export]'): {e}") from None
    from .export import check_scheduler, fuse, lora_specs, scheduler_override

    override = scheduler_override(args.scheduler_config)
    loras = lora_specs(args.lora)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        from ..model.loading import load_components

        components = load_components(args.base, args.image_encoder, args.adapter, args.face_models)
    except WeightsError as e:
        raise UserError(str(e)) from None
    fuse(components, loras)  # in float32 on the CPU, before the pipeline casts and moves the weights
    if override:
        components.scheduler_config = {**components.scheduler_config, **override}
        check_scheduler(components.scheduler_config)
    pipe = InfiniteIDPipeline(components, device=device, dtype=dtype)
    settings = _settings(args, 1024, 1024)
    t0 = time.perf_counter()
    out = pipe.generate([request], settings, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    return _write(args, request, settings, out.images[0], out.text_images[0] if out.text_images else None, {
        "engine": "pytorch-reference",
        "base": absolute(args.base),
        "image_encoder": absolute(args.image_encoder),
        "adapter": absolute(args.adapter),
        "face_models": absolute(args.face_models),
        "loras": [r.to_dict() for r in components.loras],
        "scheduler_override": override,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(seconds, 3),
    })


def _write(args, request, settings, image, text_image, source: Dict[str, Any]) -> int:
    from .. import generation as gen

    save_png(image, args.out)
    outputs: Dict[str, Optional[str]] = {"image": absolute(args.out)}
    if text_image is not None:
        save_png(text_image, args.text_stream_out)
        outputs["text_stream"] = absolute(args.text_stream_out)
    record = {
        "request": gen.describe(request),
        "faces": face_files(request.faces),
        "settings": settings.to_dict(),
        "source": source,
        "outputs": outputs,
        "versions": versions(),
        "arguments": arguments(args),
    }
    side = write_sidecar(args.out, record)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in source.get("timings", {}).items())
    print(f"wrote {args.out} ({settings.width}x{settings.height}, {settings.steps} steps, {source['seconds']:.2f} s"
          + (f": {stages}" if stages else "") + f") and {side}")
    return 0
