"""End-to-end PyTorch figures at SDXL size: plain SDXL vs Infinite-ID, eager vs torch.compile, SDPA vs the kernel.

    python benchmarks/gpu_e2e.py                       # on a CUDA GPU: the full table
    python benchmarks/gpu_e2e.py --modes eager,default --batches 1
    python benchmarks/gpu_e2e.py --tiny --out /tmp/e2e # the tiny model on the CPU (the test runs this)

What a user would run instead of this project: SDXL with Infinite-ID in PyTorch,
eager or compiled. The components have SDXL base 1.0's real architecture with
random weights (``infiniteid.model.sdxl_size``; weights do not change speed),
fp16 (the VAE in fp32, as SDXL needs), 1024x1024, 30 DDIM steps, classifier-free
guidance, batch 1 and 2 (images per call). For every case:

* model: ``sdxl`` (one stream, diffusers' own attention on the same U-Net: the
  processors see no ``infinite_id`` and run plain SDPA) or ``infiniteid`` (two
  streams, mixed attention with AdaIN-mean, ID cross-attention);
* mode: ``eager``, ``default`` (``torch.compile``), ``max-autotune``
  (``torch.compile(mode="max-autotune")``: autotuned kernels and CUDA graphs);
* attention: ``sdpa`` (the torch reference: SDPA over the concatenated keys) or
  ``kernel`` (the fused Triton kernel; under compile, one custom operator);
* per stage, milliseconds from CUDA events (``perf_counter`` on the CPU), the
  median of ``--repeats`` runs after ``--warmup`` untimed ones: text encoders, ID
  encoder, one U-Net step, VAE decode; end to end: one whole generation
  (host wall time, a precomputed face);
* the FLOP floor: FLOPs of each stage counted with ``torch.utils.flop_counter`` in
  the same run, divided by this card's measured dense fp16 matmul rate; the table
  gives measured / floor (1.0 would be every FLOP at matmul peak);
* peak memory (``torch.cuda.max_memory_allocated`` per case).

Then the low-latency case: 4 steps, no guidance, trailing timestep spacing.
Prints a table and writes JSON + Markdown (``--out``, default
``benchmarks/results/gpu_e2e-<card>``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "a portrait of a person in comic book style"
MODES = ("eager", "default", "max-autotune")
ATTENTION = ("sdpa", "kernel")


@dataclass
class Case:
    model: str  # sdxl | infiniteid
    mode: str  # eager | default | max-autotune
    attention: str  # sdpa | kernel
    batch: int
    steps: int
    cfg: bool
    spacing: str = "leading"

    @property
    def label(self) -> str:
        return f"{self.model}/{self.mode}/{self.attention}/b{self.batch}/{self.steps}st{'' if self.cfg else '/nocfg'}"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny model at its native size (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--size", type=int, default=None, help="height = width (default 1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batches", default="1,2", help="images per call, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--attention", default=",".join(ATTENTION), help=f"subset of {','.join(ATTENTION)}")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use aot_eager)")
    p.add_argument("--no-few-step", action="store_true", help="skip the 4-step, no-guidance case")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per stage (median)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="timed whole generations (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (compiles happen here)")
    p.add_argument("--out", default=None, help="output path without suffix (.json and .md are written)")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",") if b]
    a.modes = [m for m in a.modes.split(",") if m]
    a.attention = [m for m in a.attention.split(",") if m]
    for m in a.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for m in a.attention:
        if m not in ATTENTION:
            p.error(f"unknown attention {m!r}; choose from {', '.join(ATTENTION)}")
    if min(a.batches, default=0) < 1 or a.steps < 1 or a.repeats < 1 or a.e2e_repeats < 1 or a.warmup < 0:
        p.error("batches, steps and repeats must be >= 1, warmup >= 0")
    return a


# -- timing --------------------------------------------------------------------------
class Clock:
    """Milliseconds of ``fn``: CUDA events on a GPU (device time), perf_counter on a CPU."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], repeats: int, warmup: int, events: bool = True) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda and events:
                start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                self.sync()
                times.append((time.perf_counter() - t) * 1e3)
        return float(statistics.median(times))


def matmul_tflops(device, dtype, clock: Clock) -> float:
    """This card's dense matmul rate (TFLOP/s) for ``dtype``: the floor's denominator."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = clock.time(lambda: a @ b, repeats=10, warmup=3)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- the model and its inputs ----------------------------------------------------------
def build(args) -> Any:
    import torch

    from infiniteid.model.pipeline import InfiniteIDPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        from infiniteid.model.loading import tiny_components

        return InfiniteIDPipeline(tiny_components(0), device=device, dtype=torch.float32)
    from infiniteid.model.sdxl_size import sdxl_size_components

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return InfiniteIDPipeline(sdxl_size_components(device), device=device, dtype=dtype)


def set_attention(pipe, attention: str) -> None:
    from infiniteid.model.processors import MixedSelfAttnProcessor

    for proc in pipe.c.unet.attn_processors.values():
        if isinstance(proc, MixedSelfAttnProcessor):
            proc.kernel_backend = "triton" if attention == "kernel" else "torch"


class Runner:
    """One case's callables: stages and the whole generation, on a possibly compiled U-Net."""

    def __init__(self, pipe, case: Case, size: int, unet):
        import numpy as np
        import torch

        from infiniteid import generation as gen
        from infiniteid.layout import split_streams
        from infiniteid.model.pipeline import FaceInput

        self.pipe, self.case, self.unet, self.torch = pipe, case, unet, torch
        rng = np.random.default_rng(0)
        emb = rng.standard_normal(512).astype(np.float32)
        face = FaceInput(embedding=emb / np.linalg.norm(emb), crop=rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
        self.requests = [gen.GenerationRequest(prompt=PROMPT, faces=[face], seed=i) for i in range(case.batch)]
        self.settings = gen.BatchSettings(height=size, width=size, steps=case.steps, cfg=case.cfg, scheduler="ddim")
        self.noise = np.stack([gen.initial_noise(r.seed, size, size) for r in self.requests])
        cond = pipe.conditioning(self.requests, self.settings)
        two = case.model == "infiniteid"
        pick = (lambda x: x) if two else (lambda x: split_streams(x)[0])
        rows = cond["encoder_hidden_states"].shape[0] // (1 if two else 2)
        self.unet_kwargs = dict(
            encoder_hidden_states=pick(cond["encoder_hidden_states"]),
            added_cond_kwargs={"text_embeds": pick(cond["text_embeds"]), "time_ids": pick(cond["time_ids"])},
        )
        if two:
            from infiniteid.model.processors import KWARG

            self.unet_kwargs["cross_attention_kwargs"] = {KWARG: cond[KWARG]}
        h = size // 8
        self.x = torch.randn(rows, 4, h, h, device=pipe.device, dtype=pipe.dtype)
        self.t = torch.tensor(500, device=pipe.device)
        self.latents = torch.randn(case.batch, 4, h, h, device=pipe.device)
        self.face = face

    def text(self):
        prompts = [PROMPT] * self.case.batch
        self.pipe.encode_prompts(prompts)
        if self.case.cfg:
            self.pipe.encode_negative([""] * self.case.batch)

    def id_encoder(self):
        self.pipe.encode_faces([self.face] * self.case.batch)

    def unet_step(self, unet=None):
        with self.torch.no_grad():
            return (unet or self.unet)(self.x, self.t, **self.unet_kwargs).sample

    def vae(self):
        self.pipe.decode(self.latents)

    def generate(self):
        if self.case.model == "infiniteid":
            return self.pipe.generate(self.requests, self.settings, noise=self.noise, progress=False)
        return self.generate_plain()

    @property
    def stages(self) -> Dict[str, Callable[[], Any]]:
        s = {"text_encoders": self.text, "unet_step": self.unet_step, "vae_decoder": self.vae}
        if self.case.model == "infiniteid":
            s["id_encoder"] = self.id_encoder
        return s

    def generate_plain(self):
        """Plain SDXL with the same scheduler, guidance and components: the text stream alone."""
        torch = self.torch
        from infiniteid.model.schedulers import make_torch_scheduler

        pipe, case = self.pipe, self.case
        with torch.no_grad():
            emb, pooled = pipe.encode_prompts([PROMPT] * case.batch)
            kw = dict(self.unet_kwargs)
            if case.cfg:
                nemb, npooled = pipe.encode_negative([""] * case.batch)
                emb, pooled = torch.cat([nemb, emb]), torch.cat([npooled, pooled])
            kw["encoder_hidden_states"] = emb.to(pipe.dtype)
            kw["added_cond_kwargs"] = dict(kw["added_cond_kwargs"], text_embeds=pooled.to(pipe.dtype))
            sched = make_torch_scheduler("ddim", pipe.c.scheduler_config)
            sched.set_timesteps(case.steps)
            lat = torch.from_numpy(self.noise).to(pipe.device) * sched.init_noise_sigma
            for t in sched.timesteps:
                x = torch.cat([lat, lat]) if case.cfg else lat
                eps = self.unet(sched.scale_model_input(x, t).to(pipe.dtype), t, **kw).sample.float()
                if case.cfg:
                    u, c = eps.chunk(2)
                    eps = u + 5.0 * (c - u)
                lat = sched.step(eps, t, lat).prev_sample
            return pipe.decode(lat)


def compiled_unet(pipe, mode: str, backend: str):
    import torch

    unet = pipe.c.unet
    if mode == "eager":
        return unet
    torch._dynamo.reset()
    if backend != "inductor":  # modes are inductor's
        return torch.compile(unet, backend=backend)
    return torch.compile(unet, mode=None if mode == "default" else mode)


def run_case(pipe, case: Case, size: int, args, clock: Clock, floors: Dict[str, float]) -> Dict[str, Any]:
    import torch

    set_attention(pipe, case.attention)
    scheduler_config = dict(pipe.c.scheduler_config)
    pipe.c.scheduler_config = dict(scheduler_config, timestep_spacing=case.spacing)
    eager = pipe.c.unet
    unet = compiled_unet(pipe, case.mode, args.compile_backend)
    pipe.c.unet = unet  # the whole generation runs on the same (compiled) U-Net
    try:
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        r = Runner(pipe, case, size, unet)
        t0 = time.perf_counter()
        r.unet_step()  # compiles here, outside the timings
        clock.sync()
        row: Dict[str, Any] = {"case": asdict(case), "label": case.label, "first_call_s": round(time.perf_counter() - t0, 2)}
        for name, fn in r.stages.items():
            row[f"{name}_ms"] = round(clock.time(fn, args.repeats, args.warmup), 3)
            floor = floors.get(f"{case.model}/{case.batch}/{case.cfg}/{name}")
            if floor:
                row[f"{name}_floor_ratio"] = round(row[f"{name}_ms"] / floor, 2)
        row["e2e_ms"] = round(clock.time(r.generate, args.e2e_repeats, 1, events=False), 1)
        if clock.cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        return row
    finally:
        pipe.c.unet = eager
        pipe.c.scheduler_config = scheduler_config


def flop_floors(pipe, cases: List[Case], size: int, tflops: float) -> Dict[str, Any]:
    """FLOPs of each stage (eager, SDPA path) and the time they would take at matmul peak."""
    floors, flops = {}, {}
    set_attention(pipe, "sdpa")
    for case in cases:
        r = Runner(pipe, case, size, pipe.c.unet)
        for name, fn in r.stages.items():
            key = f"{case.model}/{case.batch}/{case.cfg}/{name}"
            if key not in flops:
                flops[key] = count_flops(fn)
                floors[key] = flops[key] / (tflops * 1e12) * 1e3
    return {"flops": flops, "floor_ms": floors}


def environment(pipe, tflops: float) -> Dict[str, Any]:
    import diffusers
    import torch

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cpu": platform.processor() or platform.machine(), "device": str(pipe.device), "dtype": str(pipe.dtype),
        "matmul_tflops": round(tflops, 1),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if pipe.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(pipe.device)
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(pipe.device)))
    return env


def markdown(result: Dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# End to end in PyTorch: {env.get('gpu', env['cpu'])} ({result['size']}x{result['size']}, {env['dtype']})",
        "",
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "diffusers", "cuda", "python") if env.get(k)),
        f"Measured dense matmul rate: {env['matmul_tflops']} TFLOP/s (the floor's denominator).",
        "",
        "| case | text ms | ID enc ms | U-Net step ms (x floor) | VAE ms | end to end ms | first call s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |||||||")
            continue
        ratio = f" ({r['unet_step_floor_ratio']}x)" if "unet_step_floor_ratio" in r else ""
        lines.append(
            f"| {r['label']} | {r['text_encoders_ms']} | {r.get('id_encoder_ms', '-')} | {r['unet_step_ms']}{ratio} "
            f"| {r['vae_decoder_ms']} | {r['e2e_ms']} | {r['first_call_s']} | {r.get('peak_mem_gib', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import os

    if args.tiny or args.device == "cpu":  # the kernel in Triton's interpreter (set before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    pipe = build(args)
    clock = Clock(pipe.device)
    size = args.size or (64 if args.tiny else 1024)
    cases = []
    for model in ("sdxl", "infiniteid"):
        for mode in args.modes:
            for att in args.attention if model == "infiniteid" else ["sdpa"]:
                for b in args.batches:
                    cases.append(Case(model, mode, att, b, args.steps, True))
                if not args.no_few_step:
                    cases.append(Case(model, mode, att, 1, 4, False, "trailing"))
    tflops = matmul_tflops(pipe.device, pipe.dtype, clock)
    floors = flop_floors(pipe, cases, size, tflops)
    rows = []
    for case in cases:
        print(f"{case.label} ...", flush=True)
        try:
            rows.append(run_case(pipe, case, size, args, clock, floors["floor_ms"]))
        except Exception as e:  # one failing configuration must not lose the others' numbers
            rows.append({"label": case.label, "case": asdict(case), "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        torch._dynamo.reset()
    result = {"size": size, "environment": environment(pipe, tflops), "floors": floors, "rows": rows, "argv": argv or sys.argv[1:]}
    table = markdown(result)
    print(table)
    card = result["environment"].get("gpu", "cpu").replace(" ", "-")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_e2e-{card}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
