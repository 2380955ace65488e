"""``infiniteid serve BUNDLE``: the HTTP server (FastAPI + uvicorn) over the torch-free runtime.

``POST /v1/generate`` takes multipart (``face`` files + form fields) or JSON (``faces``
in base64) and answers a PNG, or JSON on ``Accept: application/json``. Concurrent
compatible requests are micro-batched (one batch at a time per backend); each
face's ``c_id`` is cached. ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus),
``/docs`` (OpenAPI) and a small page at ``/``. At start-up the bundle's sha256
hashes are verified (the log says what it cost) and one warm-up generation runs.
Ctrl-C / SIGTERM drains: admitted requests are answered, new ones refused.

With ``--ray`` the same server runs as a Ray Serve deployment of ``--replicas``
replicas (``--gpus-per-replica``, 1 by default with ``--backend trt``) behind Serve's
HTTP proxy.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any, List

EPILOG = """\
examples:
  infiniteid serve out/bundle --face-models ~/.insightface/models/antelopev2
  infiniteid serve out/bundle --backend trt --port 8000 --max-batch 4 --batch-window-ms 30 --queue 64
  infiniteid serve out/bundle --ray --replicas 8 --backend trt --host 0.0.0.0   # one replica per GPU

  curl -F face=@me.jpg -F prompt="a person in comic book style" -F steps=30 \\
       http://127.0.0.1:8000/v1/generate -o me-comic.png
  curl -H 'Accept: application/json' -H 'Content-Type: application/json' \\
       -d '{"prompt": "an astronaut", "faces": ["'"$(base64 -w0 me.jpg)"'"], "seed": 3}' \\
       http://127.0.0.1:8000/v1/generate
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a bundle over HTTP (micro-batching, c_id cache, metrics; Ray Serve for many GPUs)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="exported bundle folder")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort", help="onnxruntime (default) or TensorRT")
    p.add_argument("--face-models", type=Path, metavar="DIR",
                   help="insightface model folder (overrides the one the manifest references)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=int, default=0, metavar="N", help="images per batch (default: the bundle's max)")
    b.add_argument("--batch-window-ms", type=float, default=25.0, metavar="MS",
                   help="how long the oldest request waits for company (default 25)")
    b.add_argument("--queue", type=int, default=32, metavar="N", help="requests admitted and waiting; past it 429 (default 32)")
    b.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request limit; past it 504 (default 120)")
    b.add_argument("--default-steps", type=int, default=30, metavar="N", help="steps when a request names none (default 30)")
    b.add_argument("--cache-mb", type=float, default=256, metavar="MB", help="c_id cache size (default 256; 0 turns it off)")
    b.add_argument("--max-upload-mb", type=float, default=16, metavar="MB", help="request body limit (default 16)")
    b.add_argument("--max-pixels", type=int, default=36_000_000, metavar="N",
                   help="largest face image in pixels (default 36M; larger ones are refused before decoding)")
    r = p.add_argument_group("runtime")
    r.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    r.add_argument("--trust-engine-code", action="store_true",
                   help="with --backend trt: let TensorRT run host code carried by plans not built on this machine "
                        "(version-compatible plans embed a lean runtime library); only for bundles you trust")
    r.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation (/readyz turns ready at once)")
    r.add_argument("--no-verify-hashes", action="store_true", help="skip the sha256 check of the bundle's files at start-up")
    r.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ray = p.add_argument_group("Ray Serve (many GPUs or machines)")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment behind Serve's HTTP proxy")
    ray.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (one per GPU; default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                     help="GPUs per replica (default 1 with --backend trt, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs per replica (default 1)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.set_defaults(run=run)


def server_config(args: argparse.Namespace):
    from ..cli import UserError
    from ..serving.config import ConfigError, ServerConfig

    if args.trust_engine_code and args.backend != "trt":
        raise UserError("--trust-engine-code applies to the trt backend only")
    if args.threads is not None and args.backend != "ort":
        raise UserError("--threads applies to the ort backend only")
    try:
        return ServerConfig(
            backend_opts={"trust_engine_code": True} if args.trust_engine_code else {},
            bundle=args.bundle, backend=args.backend, host=args.host, port=args.port, max_batch=args.max_batch,
            batch_window_ms=args.batch_window_ms, queue=args.queue, timeout=args.timeout,
            face_models=args.face_models, threads=args.threads, cache_bytes=int(args.cache_mb * (1 << 20)),
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
            default_steps=args.default_steps, warmup=not args.no_warmup, verify_hashes=not args.no_verify_hashes,
        ).validate()
    except ConfigError as e:
        flag = str(e).split(" ", 1)[0].replace("_", "-")
        raise UserError(f"--{flag}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from ..bundle import read_manifest
    from ..cli import UserError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config(args)
    read_manifest(config.bundle)  # a wrong folder is a one-line error now, not a log line later
    if args.ray:
        return _run_ray(args, config)
    if args.replicas != 1 or args.gpus_per_replica is not None or args.ray_address:
        raise UserError("--replicas, --gpus-per-replica and --ray-address need --ray")

    from ..serving.app import create_app
    from ..serving.server import bind, uvicorn_server

    failed: List[str] = []
    try:
        sock = bind(config.host, config.port)
    except OSError as e:
        raise UserError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(None, log_level="warning" if args.log_level == "info" else args.log_level)

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    server.config.app = create_app(config, on_fatal=fatal)
    print(f"serving {config.bundle} on http://{host}:{port} (API docs at /docs); Ctrl-C drains and stops", flush=True)
    # uvicorn handles SIGINT/SIGTERM while it runs (graceful drain), then re-raises the signal to
    # the handler it found; with these, that ends in a clean exit instead of a kill.
    stopped_by: List[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    server.run(sockets=[sock])
    sock.close()
    if failed:
        raise UserError(failed[0])
    print("stopped", flush=True)
    return 0


def _run_ray(args: argparse.Namespace, config) -> int:
    from ..cli import UserError

    if args.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {args.replicas}")
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if args.backend == "trt" else 0.0)
    if config.port == 0:
        raise UserError("--ray needs a fixed --port (Serve's HTTP proxy does not pick one)")
    try:
        from ..serving import ray_app
    except ImportError as e:
        raise UserError(f"--ray needs Ray Serve (pip install 'infiniteid-rt[serve]'): {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = ray_app.run(config, args.replicas, gpus, args.cpus_per_replica, address=args.ray_address)
    print(f"serving {config.bundle} with {args.replicas} Ray Serve replica(s) ({gpus:g} GPU each) on {url}; "
          "Ctrl-C stops", flush=True)
    try:
        stop.wait()
    finally:
        ray_app.stop()
    print("stopped", flush=True)
    return 0
