"""TensorRT runtime vs the PyTorch reference (eager fp16) on one GPU: per-stage and end-to-end latency.

    python benchmarks/gpu_trt.py --bundle sdxl-fp16/ \\
        --base stable-diffusion-xl-base-1.0/ --image-encoder clip-vit-h-14/ --adapter infiniteid.safetensors

Needs: an NVIDIA GPU, TensorRT and cuda-python, a bundle with engines built on
this GPU (``infiniteid build BUNDLE``); for the baseline also PyTorch with CUDA
and the weights the bundle was exported from (leave ``--base`` out to skip it).

What it measures, at 1024x1024, 30 steps, batch 1 (one request, classifier-free
guidance on, so the U-Net sees 4 rows), by default:

* per stage, GPU time from CUDA events around the engine / module alone (inputs
  already on the device): text encoders (both, one prompt), ID encoder (one
  face), U-Net (one step), VAE decoder (one image);
* end to end, host wall time of one whole generation (tokenising, encoders,
  30 denoising steps, decoding, copies back), with a precomputed face (the face
  detector is not part of either side);
* warm-up runs are excluded; every number is the median of ``--repeats`` runs;
* peak GPU memory: the device's used memory over the TensorRT run (engines,
  shared scratch, buffers; it includes the CUDA context) and, for PyTorch,
  ``torch.cuda.max_memory_allocated`` plus the same device-level figure.

``--quantized B8 B16 ...`` adds INT8 / FP8 bundles from ``infiniteid calibrate``
(engines built with ``infiniteid build B --precision int8|fp8``): each is timed the
same way in the same run, and a second table gives its U-Net step and end-to-end
ratio to the fp16 ``--bundle``, next to the issue's targets (INT8 >= 1.2x,
FP8 >= 1.3x on the U-Net step).

Prints a table and writes JSON (``--out``, default
``benchmarks/results/gpu_trt-<gpu>.json``). Runs the TensorRT side first, frees
it, then the PyTorch baseline in the same process and on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "a portrait of a person in comic book style"
STAGES = ("text_encoders", "id_encoder", "unet_step", "vae_decoder")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder with TensorRT engines for this GPU")
    p.add_argument("--base", default=None, help="SDXL diffusers folder (PyTorch baseline; omit to skip it)")
    p.add_argument("--image-encoder", default=None, help="CLIP image encoder folder (baseline)")
    p.add_argument("--adapter", default=None, help="ID adapter safetensors (baseline)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "euler", "dpmpp_2m"))
    p.add_argument("--repeats", type=int, default=10, help="timed runs per stage (median reported)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="timed end-to-end generations")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--engine-dir", default=None, help="engine folder (default: the one for this GPU)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "always", "never"))
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu_trt-<gpu>.json)")
    p.add_argument("--quantized", nargs="+", default=[], metavar="BUNDLE",
                   help="INT8/FP8 bundles (infiniteid calibrate + build) timed in the same run against --bundle")
    args = p.parse_args(argv)
    given = [args.base, args.image_encoder, args.adapter]
    if any(given) and not all(given):
        p.error("the PyTorch baseline needs all of --base, --image-encoder and --adapter")
    for k in ("repeats", "e2e_repeats", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def median(xs: List[float]) -> float:
    return float(statistics.median(xs))


def random_face(seed: int = 0, size: int = 256):
    """A precomputed face (embedding + RGB crop); both sides accept it in place of a detected face."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal(512).astype(np.float32)
    emb /= np.linalg.norm(emb)
    crop = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return emb, crop


# -- TensorRT ---------------------------------------------------------------------------------
def time_engine(backend, component: str, feeds: Dict[str, np.ndarray], warmup: int, repeats: int) -> List[float]:
    """GPU milliseconds of the engine alone: inputs uploaded once, then launches timed with CUDA events."""
    from infiniteid.trt import cuda

    backend.run(component, feeds)  # sets shapes, uploads inputs, binds buffers (and captures a graph)
    r = backend.runner(component)
    stream = backend.stream
    for _ in range(warmup):
        r.launch(stream)
    start, end = cuda.Event(), cuda.Event()
    times = []
    for _ in range(repeats):
        start.record(stream)
        r.launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(end.elapsed_ms(start))
    start.destroy()
    end.destroy()
    return times


def bench_trt(args) -> Dict[str, Any]:
    from infiniteid.commands.check import input_shapes, sample_feeds
    from infiniteid.contract import COMPONENTS, TEXT_ENCODER, TEXT_ENCODER_2
    from infiniteid.generation import BatchSettings, GenerationRequest
    from infiniteid.runtime.generator import FaceInput, Runtime
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.trt_backend import TrtBackend
    from infiniteid.trt import cuda

    cuda.require_device(0)
    free0, total = cuda.memory_info()
    bundle = Bundle.load(args.bundle)
    backend = TrtBackend(bundle, engine_dir=args.engine_dir, cuda_graphs=args.cuda_graphs)
    peak = [total - free0]

    def sample_memory() -> None:
        free, _ = cuda.memory_info()
        peak.append(total - free)

    stage_ms: Dict[str, List[float]] = {}
    try:
        per_component: Dict[str, List[float]] = {}
        for c in COMPONENTS:
            fixed = backend.fixed_input_shapes(c)
            shapes = input_shapes(bundle, c, args.height, args.width, 1, fixed)
            feeds = sample_feeds(bundle, c, shapes, 0, args.height, args.width)
            per_component[c] = time_engine(backend, c, feeds, args.warmup, args.repeats)
            sample_memory()
        stage_ms["text_encoders"] = [a + b for a, b in zip(per_component[TEXT_ENCODER], per_component[TEXT_ENCODER_2])]
        stage_ms["id_encoder"] = per_component["id_encoder"]
        stage_ms["unet_step"] = per_component["unet"]
        stage_ms["vae_decoder"] = per_component["vae_decoder"]

        rt = Runtime(bundle, backend=backend)
        emb, crop = random_face()
        req = GenerationRequest(PROMPT, faces=[FaceInput(embedding=emb, crop=crop)], seed=1)
        settings = BatchSettings(height=args.height, width=args.width, steps=args.steps, scheduler=args.scheduler)
        for _ in range(args.warmup):
            rt.generate([req], settings, progress=False)
        e2e = []
        for _ in range(args.e2e_repeats):
            cuda.check(cuda.cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            t0 = time.perf_counter()
            rt.generate([req], settings, progress=False)
            e2e.append((time.perf_counter() - t0) * 1000.0)
            sample_memory()
        info = backend.describe()
    finally:
        backend.close()
    return {
        "stages_ms": {k: median(v) for k, v in stage_ms.items()},
        "stages_runs_ms": stage_ms,
        "end_to_end_ms": median(e2e),
        "end_to_end_runs_ms": e2e,
        "peak_device_used_bytes": max(peak),
        "device_used_before_bytes": total - free0,
        "backend": info,
    }


# -- PyTorch reference ----------------------------------------------------------------------------
def cuda_ms(torch, fn: Callable[[], Any], warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_torch(args) -> Dict[str, Any]:
    import torch

    from infiniteid import generation as gen
    from infiniteid.imageproc import clip_pixels
    from infiniteid.layout import BatchLayout
    from infiniteid.model.pipeline import KWARG, FaceInput, InfiniteIDPipeline

    from infiniteid.trt import cuda

    torch.cuda.synchronize()
    free0, total = cuda.memory_info()
    torch.cuda.reset_peak_memory_stats()
    pipe = InfiniteIDPipeline.from_pretrained(args.base, args.image_encoder, args.adapter,
                                              device="cuda", dtype=torch.float16)
    emb, crop = random_face()
    face = FaceInput(embedding=emb, crop=crop)
    req = gen.GenerationRequest(PROMPT, faces=[face], seed=1)
    settings = gen.BatchSettings(height=args.height, width=args.width, steps=args.steps, scheduler=args.scheduler)
    layout = BatchLayout(images=1, cfg=True)
    stage_ms: Dict[str, List[float]] = {}
    with torch.no_grad():
        stage_ms["text_encoders"] = cuda_ms(torch, lambda: pipe.encode_prompts([PROMPT]), args.warmup, args.repeats)
        e = torch.from_numpy(emb[None]).to("cuda", torch.float16)
        pix = torch.from_numpy(clip_pixels(crop, pipe.c.clip_image)[None]).to("cuda", torch.float16)
        stage_ms["id_encoder"] = cuda_ms(torch, lambda: pipe.c.id_encoder(e, pix), args.warmup, args.repeats)
        cond = pipe.conditioning([req], settings)
        x = torch.randn(layout.batch, 4, args.height // 8, args.width // 8, device="cuda", dtype=torch.float16)
        t = torch.tensor(500.0, device="cuda")

        def unet_step():
            return pipe.c.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                               cross_attention_kwargs={KWARG: cond[KWARG]}).sample

        stage_ms["unet_step"] = cuda_ms(torch, unet_step, args.warmup, args.repeats)
        lat = torch.randn(1, 4, args.height // 8, args.width // 8, device="cuda", dtype=torch.float32)
        vae = pipe.c.vae
        stage_ms["vae_decoder"] = cuda_ms(torch, lambda: vae.decode(lat / vae.config.scaling_factor).sample,
                                          args.warmup, args.repeats)
        for _ in range(args.warmup):
            pipe.generate([req], settings, progress=False)
        e2e = []
        for _ in range(args.e2e_repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pipe.generate([req], settings, progress=False)
            torch.cuda.synchronize()
            e2e.append((time.perf_counter() - t0) * 1000.0)
    free1, _ = cuda.memory_info()
    out = {
        "stages_ms": {k: median(v) for k, v in stage_ms.items()},
        "stages_runs_ms": stage_ms,
        "end_to_end_ms": median(e2e),
        "end_to_end_runs_ms": e2e,
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "device_used_after_bytes": total - free1,
        "device_used_before_bytes": total - free0,
        "torch": torch.__version__,
        "dtype": "float16 (VAE float32)",
    }
    del pipe
    torch.cuda.empty_cache()
    return out


# -- report ---------------------------------------------------------------------------------------
def table(result: Dict[str, Any]) -> str:
    trt, ref = result["tensorrt"], result.get("pytorch")
    rows = [("stage", "TensorRT ms", "PyTorch ms", "speed-up")]

    def row(label: str, a: float, b: Optional[float]) -> None:
        rows.append((label, f"{a:.2f}", f"{b:.2f}" if b is not None else "-", f"{b / a:.2f}x" if b else "-"))

    for s in STAGES:
        row(s, trt["stages_ms"][s], ref["stages_ms"][s] if ref else None)
    row(f"end to end ({result['settings']['steps']} steps)", trt["end_to_end_ms"], ref["end_to_end_ms"] if ref else None)
    gib = 1024 ** 3
    rows.append(("peak GPU memory (GiB)", f"{trt['peak_device_used_bytes'] / gib:.2f}",
                 f"{ref['device_used_after_bytes'] / gib:.2f}" if ref else "-", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


#: U-Net step speed-up over fp16 engines that calibration aims for (stated in the README until measured).
QUANTIZED_TARGETS = {"int8": 1.2, "fp8": 1.3}


def bench_quantized(args) -> Dict[str, Any]:
    """Each ``--quantized`` bundle through :func:`bench_trt`, keyed by its U-Net precision."""
    from infiniteid.bundle import read_manifest

    out: Dict[str, Any] = {}
    for folder in args.quantized:
        precision = read_manifest(folder).components["unet"].precision
        print(f"TensorRT, {precision} U-Net ({folder}) ...", file=sys.stderr)
        run = bench_trt(argparse.Namespace(**{**vars(args), "bundle": folder, "engine_dir": None}))
        out[precision] = {**run, "bundle": str(Path(folder).resolve())}
    return out


def quantized_table(result: Dict[str, Any]) -> str:
    base = result["tensorrt"]
    rows = [("U-Net precision", "U-Net step ms", "vs fp16", "target", "end to end ms", "vs fp16")]
    rows.append(("fp16 (--bundle)", f"{base['stages_ms']['unet_step']:.2f}", "1.00x", "",
                 f"{base['end_to_end_ms']:.1f}", "1.00x"))
    for precision, run in result.get("quantized", {}).items():
        step, e2e = run["stages_ms"]["unet_step"], run["end_to_end_ms"]
        target = QUANTIZED_TARGETS.get(precision)
        rows.append((precision, f"{step:.2f}", f"{base['stages_ms']['unet_step'] / step:.2f}x",
                     f">= {target:.1f}x" if target else "", f"{e2e:.1f}", f"{base['end_to_end_ms'] / e2e:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from infiniteid.runtime.backend import BackendError
    from infiniteid.trt import cuda

    try:
        cuda.require_device(0)
        device = cuda.device_info(0)
    except BackendError as e:
        print(f"gpu_trt: {e}", file=sys.stderr)
        return 2
    result: Dict[str, Any] = {
        "device": device.name,
        "compute_capability": device.cc,
        "settings": {"height": args.height, "width": args.width, "steps": args.steps, "batch": 1,
                     "scheduler": args.scheduler, "repeats": args.repeats, "e2e_repeats": args.e2e_repeats,
                     "warmup": args.warmup, "cuda_graphs": args.cuda_graphs},
        "python": platform.python_version(),
        "bundle": str(Path(args.bundle).resolve()),
    }
    print(f"TensorRT on {device.name} ...", file=sys.stderr)
    result["tensorrt"] = bench_trt(args)
    if args.quantized:
        result["quantized"] = bench_quantized(args)
    if args.base:
        print("PyTorch reference (eager fp16) ...", file=sys.stderr)
        result["pytorch"] = bench_torch(args)
    print(table(result))
    if args.quantized:
        print()
        print(quantized_table(result))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_trt-{device.name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
