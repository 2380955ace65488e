"""``infiniteid bench``: measure a bundle offline, or a running server online.

* ``infiniteid bench BUNDLE``: the runtime alone. Per batch size (1 to the bundle's
  maximum): text encoders, denoising loop, VAE decode and total as p50/p90/p99,
  images/s, peak memory; the face front end + ID encoder per face. Warm-up runs are
  excluded.
* ``infiniteid bench --url URL``: a running ``infiniteid serve`` (or a Ray Serve
  proxy). A concurrency sweep of closed-loop clients; per level: throughput, latency
  p50/p90/p99, 429 and error counts. Each level stops after ``--requests`` requests
  or ``--duration`` seconds.
* ``infiniteid bench BUNDLE --local-server``: both, the online part against a server
  this command starts on 127.0.0.1, and the server's overhead over the bare runtime
  at batch 1.

Prints a table and writes the JSON (``--json FILE``) with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

EPILOG = """\
examples:
  infiniteid bench out/bundle --steps 30 --height 1024 --width 1024 --json bench-offline.json
  infiniteid bench --url http://127.0.0.1:8000 --face me.jpg --concurrency 1,2,4,8 --requests 64 --duration 120
  infiniteid bench out/bundle --local-server --face-models antelopev2 --face me.jpg --json bench.json
"""


def _ints(text: str) -> List[int]:
    from ..cli import UserError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark a bundle (offline) or a server (--url): latency percentiles, throughput",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE", help="bundle folder (offline; with --local-server)")
    p.add_argument("--url", help="benchmark the server at this URL instead (online)")
    p.add_argument("--local-server", action="store_true", help="also start a server on 127.0.0.1 and benchmark it online")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--face", type=Path, metavar="IMG",
                   help="face photo (default: offline a precomputed synthetic face; online the demo's drawn face)")
    p.add_argument("--face-models", type=Path, metavar="DIR", help="insightface folder (with --face offline / local server)")
    p.add_argument("--height", type=int, default=None, help="default: the bundle's")
    p.add_argument("--width", type=int, default=None, help="default: the bundle's")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch-sizes", default=None, metavar="LIST", help="offline batch sizes (default 1..the bundle's max)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per batch size after one warm-up (default 5)")
    p.add_argument("--concurrency", default="1,2,4,8", metavar="LIST", help="online levels (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=32, help="online: at most this many requests per level (default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="online: at most this many seconds per level (default 60)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..serving import loadgen

    if args.url and (args.bundle or args.local_server):
        raise UserError("give BUNDLE (offline) or --url (online), not both")
    if not args.url and args.bundle is None:
        raise UserError("give a BUNDLE to benchmark offline, or --url of a running server")
    for name in ("runs", "requests", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.duration <= 0:
        raise UserError("--duration must be positive")
    concurrency = _ints(args.concurrency)
    record: Dict[str, Any] = {"machine": loadgen.machine(), "versions": loadgen.versions(),
                              "command": "infiniteid bench " + " ".join(_argv(args)), "results": []}
    if args.url:
        payload = _payload(args, args.height or 1024, args.width or 1024)
        res = loadgen.bench_online(args.url, payload, concurrency, args.requests, args.duration, progress=_say_level)
        record["results"].append(res)
        print(loadgen.online_table(res))
    else:
        _offline_and_local(args, record, concurrency)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _argv(args: argparse.Namespace) -> List[str]:
    out = [str(args.bundle)] if args.bundle else []
    for k, v in vars(args).items():
        if k in ("run", "command", "bundle") or v in (None, False):
            continue
        out.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return out


def _payload(args: argparse.Namespace, height: int, width: int) -> Dict[str, Any]:
    from ..serving.loadgen import png_b64

    if args.face is not None:
        from PIL import Image

        with Image.open(args.face) as im:
            face = png_b64(im.convert("RGB"))
    else:
        from .demo import demo_face

        face = png_b64(demo_face(128))
    return {"prompt": "a photo of a person in comic book style", "faces": [face], "height": height, "width": width,
            "steps": args.steps, "scheduler": args.scheduler}


def _say_level(level: Dict[str, Any]) -> None:
    print(f"  concurrency {level['concurrency']}: {level['ok']}/{level['sent']} ok, "
          f"{level['throughput_rps']:.2f} req/s", flush=True)


def _offline_and_local(args: argparse.Namespace, record: Dict[str, Any], concurrency: List[int]) -> None:
    import numpy as np

    from ..cli import UserError
    from ..runtime import FaceInput, Runtime
    from ..serving import loadgen

    opts = {"intra_op_threads": args.threads} if args.threads else {}
    rt = Runtime(args.bundle, backend=args.backend, face_models=args.face_models, **opts)
    try:
        h, w = args.height or rt.default_height, args.width or rt.default_width
        max_images = rt.bundle.manifest.max_images
        sizes = _ints(args.batch_sizes) if args.batch_sizes else list(range(1, max_images + 1))
        if max(sizes) > max_images:
            raise UserError(f"--batch-sizes: this bundle takes at most {max_images} images per batch")
        if args.face is not None:
            face: Any = str(args.face)
            face_note = f"{args.face} through the face front end"
        else:
            rng = np.random.default_rng(0)
            dim = int(rt.bundle.component("id_encoder").tensor("face_embeds").shape[1])
            face = FaceInput(embedding=rng.standard_normal(dim).astype(np.float32),
                             crop=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
            face_note = "a precomputed synthetic face (the face front end is not timed; give --face to time it)"
        print(f"offline: {args.bundle} on {args.backend}, {w}x{h}, {args.steps} steps, batch sizes {sizes}", flush=True)
        res = loadgen.bench_offline(rt, face, h, w, args.steps, sizes, runs=args.runs, scheduler=args.scheduler)
        res["face"] = face_note
        res["backend"] = args.backend
    finally:
        rt.close()
    record["results"].append(res)
    print(loadgen.offline_table(res))
    if args.local_server:
        record["results"].append(_local_online(args, h, w, concurrency, res))


def _local_online(args: argparse.Namespace, h: int, w: int, concurrency: List[int], offline: Dict[str, Any]) -> Dict[str, Any]:
    import urllib.request

    from ..cli import UserError
    from ..serving import loadgen
    from ..serving.app import create_app
    from ..serving.config import ServerConfig
    from ..serving.server import BackgroundServer

    if args.face is None and args.face_models is None:
        from .demo import cache_dir, synthetic_face_models

        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        face_models = synthetic_face_models(cache)  # the demo's drawn face is made for these
    else:
        face_models = args.face_models
    cfg = ServerConfig(bundle=args.bundle, backend=args.backend, face_models=face_models, threads=args.threads,
                       default_steps=args.steps, queue=max(concurrency) * 2, timeout=600.0, warmup=True)
    with BackgroundServer(create_app(cfg)) as server:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(server.url + "/readyz", timeout=5):
                    break
            except Exception:
                if time.monotonic() - t0 > 600:
                    raise UserError("the local server did not become ready in 10 minutes") from None
                time.sleep(0.2)
        payload = _payload(args, h, w)
        loadgen.bench_online(server.url, payload, [1], 2, args.duration)  # caches the face's c_id: not measured
        print(f"online: local server {server.url}", flush=True)
        res = loadgen.bench_online(server.url, payload, concurrency, args.requests, args.duration, progress=_say_level)
    batch1 = next((r for r in offline["rows"] if r["batch"] == 1), None)
    level1 = next((lv for lv in res["levels"] if lv["concurrency"] == 1), None)
    if batch1 and level1 and level1["ok"]:
        runtime_s = batch1["stages"]["total"]["p50"]
        res["server_overhead_at_batch_1"] = {
            "runtime_p50_s": runtime_s, "server_p50_s": level1["latency_s"]["p50"],
            "overhead": level1["latency_s"]["p50"] / runtime_s - 1,
        }
    print(loadgen.online_table(res))
    o = res.get("server_overhead_at_batch_1")
    if o:
        print(f"server overhead at batch 1 (p50 request latency over p50 bare generation): {o['overhead'] * 100:+.1f}%")
    return res
