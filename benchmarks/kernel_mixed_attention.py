"""Benchmark: the Triton mixed-attention kernel against PyTorch SDPA and the naive math.

Run on a CUDA GPU::

    python benchmarks/kernel_mixed_attention.py --out benchmarks/results/kernel_mixed_attention_<card>.md

What is timed, per SDXL self-attention shape (``attn1``; 4096 tokens x 10 heads x 64 at
the 64x64-latent level of a 1024x1024 image, 1024 tokens x 20 heads x 64 one level
down; 2 and 4 text/ID pairs = 1 and 2 images with guidance):

* ``triton``: the fused kernel (ID queries over ``[K_id; K_t]`` read in place with the
  fold, text queries in the same launch), including the small ``delta`` reduction;
  every tile config in the sweep, the best one reported;
* ``sdpa-flash`` / ``sdpa-efficient`` (/ ``sdpa-cudnn`` where available):
  ``torch.nn.functional.scaled_dot_product_attention`` with that backend forced, over
  AdaIN-mean'd, concatenated K/V: text half and ID half as two calls, the
  preparation (means, shift, concatenation) included in the time;
* ``naive``: the same function as matmul + softmax + matmul (score matrix in memory).

Attention FLOPs: ``4 * D`` per (query, key) pair, i.e. ``12 * pairs * H * N^2 * D``
(text rows see N keys, ID rows 2N). The card's fp16 matmul rate is measured in the
same run (8192^3 ``torch.matmul``) as the ceiling. Timing: CUDA events via
``triton.testing.do_bench`` (median, warm-up first), rotating over 3 fresh random
input sets so repeated runs do not read one buffer from L2.

Each kernel config is also checked against the float32 math reference before it is
timed (relative error must stay under 3e-3 in fp16).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infiniteid.kernels.reference import mixed_attention_math, mixed_keys_values  # noqa: E402
from infiniteid.layout import split_streams  # noqa: E402

SHAPES = [  # (tokens, heads, head_dim, pairs)
    (4096, 10, 64, 2),
    (4096, 10, 64, 4),
    (1024, 20, 64, 2),
    (1024, 20, 64, 4),
]


#: (block_m, block_n, num_warps, num_stages, tma, lazy_rescale)
SWEEPS = {
    # the first sweep: both load paths over the usual flash-attention tiles
    "full": [
        (bm, bn, w, st, tma, False)
        for tma in (False, True)
        for bm, bn, w, st in ((128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4))
    ],
    # around the winners of "full", plus 256-query tiles and lazy rescaling
    "focused": [
        (128, 64, 8, 3, False, False), (128, 64, 4, 3, False, False), (128, 64, 8, 4, False, False),
        (256, 64, 8, 3, False, False), (256, 64, 8, 2, False, False),
        (128, 64, 8, 3, False, True), (128, 64, 4, 3, False, True), (256, 64, 8, 3, False, True),
        (128, 64, 8, 3, True, False), (128, 64, 8, 3, True, True),
    ],
}


def sweep_configs(head_dim: int, sweep: str = "focused"):
    from infiniteid.kernels.triton_mixed import KernelConfig

    return [
        KernelConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st, tma=tma, lazy_rescale=lazy)
        for bm, bn, w, st, tma, lazy in SWEEPS[sweep]
        if not (head_dim == 128 and bn == 128)
    ]


def attention_flops(pairs: int, heads: int, tokens: int, dim: int) -> float:
    return 12.0 * pairs * heads * tokens * tokens * dim


def make_inputs(pairs, heads, tokens, dim, dtype, seed):
    """Processor-like q, k, v: heads split out of (B, N, H*D); streams with different means."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b = 2 * pairs

    def one():
        x = torch.randn(b, tokens, heads * dim, generator=gen, device="cuda")
        x += torch.randn(b, 1, heads * dim, generator=gen, device="cuda")
        return x.to(dtype).view(b, tokens, heads, dim).transpose(1, 2)

    return one(), one(), one()


def sdpa_baseline(backend) -> Callable:
    """Concatenate + AdaIN-mean, then SDPA with ``backend`` forced (text half, ID half)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            q_t, q_id = split_streams(q)
            k_t, _ = split_streams(k)
            v_t, _ = split_streams(v)
            out_t = F.scaled_dot_product_attention(q_t, k_t, v_t)
            k_mix, v_mix = mixed_keys_values(k, v, adain=True)
            out_id = F.scaled_dot_product_attention(q_id, k_mix, v_mix)
            return torch.cat([out_t, out_id], dim=0)

    return run


def plugin_kernel_fn(block_m: int, block_n: int, num_warps: int, num_stages: int) -> Callable:
    """The TensorRT AOT entry point launched through triton on contiguous tensors, with
    delta computed by torch ops (as the exported graph computes it in front of the plugin)."""
    import triton

    from infiniteid.kernels.fold import mean_delta
    from infiniteid.kernels.triton_mixed import LOG2E, dot_precision, mixed_attn_plugin_kernel

    def run(q, k, v):
        q, k, v = (x.contiguous() for x in (q, k, v))
        b, h, n, d = q.shape
        delta = mean_delta(k, v)
        out = torch.empty_like(q)
        mixed_attn_plugin_kernel[(triton.cdiv(n, block_m), h, b)](
            q, k, v, delta, n, h, b // 2, out,
            QK_SCALE=LOG2E / math.sqrt(d), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, ADAIN=True,
            EVEN_M=n % block_m == 0, EVEN_N=n % block_n == 0, PREC=dot_precision(q.dtype), DOT_F32=False,
            num_warps=num_warps, num_stages=num_stages,
        )
        return out

    return run


def bench(fn: Callable, input_sets: List[tuple], warmup_ms: int = 100, rep_ms: int = 400) -> float:
    """Median ms of ``fn`` over rotating input sets (CUDA events)."""
    import triton.testing

    state = {"i": 0}

    def call():
        q, k, v = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        fn(q, k, v)

    return float(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def matmul_rate(dtype=torch.float16, n: int = 8192) -> float:
    """Measured dense matmul TFLOP/s (the ceiling attention is held to)."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    import triton.testing

    x = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="markdown report path (a .json with full numbers is written beside it)")
    ap.add_argument("--quick", action="store_true", help="first shape and two configs only")
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="focused", help="which tile configs to time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton
    from torch.nn.attention import SDPBackend

    from infiniteid.kernels.triton_mixed import mean_delta_triton, mixed_attention_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    t0 = time.time()
    mm = matmul_rate()
    mm_bf16 = matmul_rate(torch.bfloat16)
    bw = copy_bandwidth()
    env = {
        "card": card, "capability": list(cap), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "fp16_matmul_tflops": mm, "bf16_matmul_tflops": mm_bf16, "copy_gb_s": bw, "sweep": args.sweep,
    }
    print(f"# {card} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(f"measured: fp16 matmul {mm:.0f} TFLOP/s, bf16 matmul {mm_bf16:.0f} TFLOP/s, copy {bw:.0f} GB/s", flush=True)

    baselines = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        baselines["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION

    shapes = SHAPES[:1] if args.quick else SHAPES
    rows: List[Dict] = []
    sweep: List[Dict] = []
    for tokens, heads, dim, pairs in shapes:
        dtype = torch.float16
        sets = [make_inputs(pairs, heads, tokens, dim, dtype, seed) for seed in (11, 12, 13)]
        flops = attention_flops(pairs, heads, tokens, dim)
        q, k, v = sets[0]
        truth = mixed_attention_math(q.float(), k.float(), v.float(), adain=True)
        label = f"N={tokens} H={heads} D={dim} pairs={pairs}"
        result: Dict = {"shape": label, "tokens": tokens, "heads": heads, "dim": dim, "pairs": pairs, "gflop": flops / 1e9}

        for name, backend in baselines.items():
            fn = sdpa_baseline(backend)
            try:
                err = rel_err(fn(q, k, v), truth)
                ms = bench(fn, sets)
                result[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_err": err}
            except Exception as exc:  # a backend may not support a shape/dtype on this card
                result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            print(f"{label} {name}: {result[name]}", flush=True)
        naive = lambda q, k, v: mixed_attention_math(q, k, v, adain=True)  # noqa: E731
        ms = bench(naive, sets, rep_ms=200)
        result["naive"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_err": rel_err(naive(q, k, v), truth)}

        best = None
        configs = sweep_configs(dim, args.sweep)[: 2 if args.quick else None]
        for cfg in configs:
            fn = lambda q, k, v, cfg=cfg: mixed_attention_triton(q, k, v, adain=True, config=cfg)  # noqa: E731
            entry = {"shape": label, "config": cfg.label(), **asdict(cfg)}
            try:
                out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
                mixed_attention_triton(q, k, v, adain=True, config=cfg, out=out)
                err = rel_err(out, truth)
                if not math.isfinite(err) or err > 3e-3:
                    raise RuntimeError(f"wrong result: relative error {err:.2e}")
                ms = bench(fn, sets)
                entry.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, rel_err=err)
                if best is None or ms < best["ms"]:
                    best = entry
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            sweep.append(entry)
            print(f"{label} triton {entry.get('config')}: {entry.get('ms', entry.get('error'))}", flush=True)
        result["triton"] = best
        # the TensorRT plugin's kernel: pointer loads, tiles within 48 KiB of shared memory
        from infiniteid.kernels.trt_plugin import TILE_CANDIDATES

        bm, bn, w, st = TILE_CANDIDATES[0]
        fn = plugin_kernel_fn(bm, bn, w, st)
        try:
            err = rel_err(fn(q, k, v), truth)
            ms = bench(fn, sets)
            result["plugin-kernel"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_err": err, "config": f"M{bm}/N{bn}/w{w}/s{st}"}
        except Exception as exc:
            result["plugin-kernel"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print(f"{label} plugin-kernel: {result['plugin-kernel']}", flush=True)
        if best is not None:
            from infiniteid.kernels.triton_mixed import KernelConfig

            cfg = KernelConfig(**{k: best[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "reduce_block", "tma", "lazy_rescale")})
            ms_delta = bench(lambda q, k, v: mean_delta_triton(k, v, cfg), sets, rep_ms=200)
            result["delta_reduction_ms"] = ms_delta
            # the same version timed again: the spread says which differences are noise
            best["repeat_ms"] = bench(lambda q, k, v: mixed_attention_triton(q, k, v, adain=True, config=cfg), sets)
        rows.append(result)

    # other dtypes at the main shape, best fp16 config (bf16) / the fp32 default
    extra: List[Dict] = []
    if not args.quick and rows[0].get("triton"):
        from infiniteid.kernels.triton_mixed import KernelConfig, default_config

        tokens, heads, dim, pairs = SHAPES[0]
        b = rows[0]["triton"]
        best_cfg = KernelConfig(**{k: b[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "reduce_block", "tma", "lazy_rescale")})
        for dtype, cfg in ((torch.bfloat16, best_cfg), (torch.float32, default_config(dim, torch.float32))):
            sets = [make_inputs(pairs, heads, tokens, dim, dtype, seed) for seed in (21, 22)]
            flops = attention_flops(pairs, heads, tokens, dim)
            q, k, v = sets[0]
            truth = mixed_attention_math(q.float(), k.float(), v.float(), adain=True)
            entry = {"dtype": str(dtype).replace("torch.", ""), "config": cfg.label()}
            fn = lambda q, k, v, cfg=cfg: mixed_attention_triton(q, k, v, adain=True, config=cfg)  # noqa: E731
            entry["triton_rel_err"] = rel_err(fn(q, k, v), truth)
            entry["triton_ms"] = bench(fn, sets)
            for name in ("sdpa-flash", "sdpa-efficient"):
                try:
                    entry[f"{name}_ms"] = bench(sdpa_baseline(baselines[name]), sets)
                except Exception as exc:
                    entry[f"{name}_ms"] = f"n/a ({type(exc).__name__})"
            entry["triton_tflops"] = flops / (entry["triton_ms"] * 1e-3) / 1e12
            extra.append(entry)
            print(f"{entry}", flush=True)

    report = render(env, rows, sweep, extra, time.time() - t0)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "sweep": sweep, "extra": extra}, indent=1, default=str))
    return 0


def render(env: Dict, rows: List[Dict], sweep: List[Dict], extra: List[Dict], seconds: float) -> str:
    mm = env["fp16_matmul_tflops"]
    lines = [
        f"# Mixed attention kernel benchmark: {env['card']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, capability {env['capability']}. "
        f"Measured in the same run: fp16 matmul **{mm:.0f} TFLOP/s**, bf16 matmul {env['bf16_matmul_tflops']:.0f} TFLOP/s, "
        f"device copy {env['copy_gb_s']:.0f} GB/s. fp16 inputs, AdaIN-mean on, median of CUDA-event timings.",
        "",
        "Attention TFLOP/s counts 4*D flops per (query, key) pair (ID queries see 2N keys). "
        "SDPA baselines include the preparation (means, shift, concatenation) and run text and ID halves as two calls.",
        "",
        "| shape | GFLOP | triton ms | triton TFLOP/s | % of matmul | best config | SDPA flash ms | SDPA mem-eff ms | SDPA cuDNN ms | naive ms | speed-up vs best (a) | plugin kernel ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("triton") or {}

        def ms(name):
            e = r.get(name) or {}
            return f"{e['ms']:.3f}" if "ms" in e else "n/a"

        base = [r[n]["ms"] for n in ("sdpa-flash", "sdpa-efficient") if "ms" in (r.get(n) or {})]
        speed = f"{min(base) / t['ms']:.2f}x" if t and base else "n/a"
        lines.append(
            f"| {r['shape']} | {r['gflop']:.0f} | {t.get('ms', float('nan')):.3f} | {t.get('tflops', float('nan')):.0f} | "
            f"{100 * t.get('tflops', float('nan')) / mm:.0f}% | {t.get('config', 'n/a')} | {ms('sdpa-flash')} | {ms('sdpa-efficient')} | "
            f"{ms('sdpa-cudnn')} | {ms('naive')} | {speed} | {ms('plugin-kernel')} |"
        )
    lines += ["", "delta reduction alone (included in the triton time): " + ", ".join(
        f"{r['shape']}: {r.get('delta_reduction_ms', float('nan')) * 1000:.0f} us" for r in rows)]
    lines += ["", "best config timed a second time (spread = noise): " + ", ".join(
        f"{r['shape']}: {(r.get('triton') or {}).get('ms', float('nan')):.3f} / {(r.get('triton') or {}).get('repeat_ms', float('nan')):.3f} ms"
        for r in rows)]
    lines += ["", "## Tile sweep (fp16)", "", "| shape | config | ms | TFLOP/s | rel. error |", "|---|---|---|---|---|"]
    for e in sweep:
        if "ms" in e:
            lines.append(f"| {e['shape']} | {e['config']} | {e['ms']:.3f} | {e['tflops']:.0f} | {e['rel_err']:.1e} |")
        else:
            lines.append(f"| {e['shape']} | {e['config']} | failed: {e['error']} | | |")
    if extra:
        lines += ["", "## Other dtypes (N=4096 H=10 D=64 pairs=2)", "", "| dtype | config | triton ms | TFLOP/s | rel. error | SDPA flash ms | SDPA mem-eff ms |", "|---|---|---|---|---|---|---|"]
        for e in extra:
            def f(x):
                return f"{x:.3f}" if isinstance(x, float) else str(x)

            lines.append(
                f"| {e['dtype']} | {e['config']} | {e['triton_ms']:.3f} | {e['triton_tflops']:.0f} | {e['triton_rel_err']:.1e} | "
                f"{f(e['sdpa-flash_ms'])} | {f(e['sdpa-efficient_ms'])} |"
            )
    lines += ["", f"Run time {seconds:.0f} s. Command: `python benchmarks/kernel_mixed_attention.py --sweep {env.get('sweep', 'focused')} --out <this file>`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
