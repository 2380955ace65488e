"""What ``infiniteid bench`` measures.

* :func:`bench_offline`: the runtime on a bundle, no server. For each batch size
  from 1 to the bundle's maximum: per-stage latency (text encoders, denoising loop,
  VAE decode, and the face front end + ID encoder once per face) as p50/p90/p99
  over timed runs after an untimed warm-up run, images/s, and the process's peak
  memory (host RSS; device memory is the backend's own).
* :func:`bench_online`: a running server at a URL (``POST /v1/generate``, JSON).
  For each concurrency level, that many closed-loop clients send requests until the
  level's request count or time is used up; reported: achieved throughput,
  latency percentiles of successful requests, error and 429 counts.

Both return plain dicts (the JSON written next to the table) that name the
machine, the versions and the shapes. Torch-free; the HTTP client is the
standard library's.
"""
from __future__ import annotations

import base64
import io
import json
import os
import platform
import resource
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


# -- facts about the run -------------------------------------------------------------
def machine() -> Dict[str, str]:
    info = {"os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["logical_cpus"] = str(os.cpu_count())
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory"] = f"{kb / 1024**2:.1f} GiB"
    except (OSError, StopIteration):
        pass
    try:
        info["load_average_1min"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    return info


def versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("infiniteid-rt", "numpy", "onnxruntime-gpu", "tensorrt", "tokenizers", "fastapi", "uvicorn", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def percentiles(values: Sequence[float]) -> Dict[str, float]:
    if not len(values):
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# -- offline ---------------------------------------------------------------------------
def bench_offline(rt: Any, face: Any, height: int, width: int, steps: int, batch_sizes: Sequence[int],
                  runs: int = 5, scheduler: str = "ddim", progress: Optional[Any] = None) -> Dict[str, Any]:
    """``rt``: a :class:`~infiniteid.runtime.Runtime`; ``face``: a face image (through the front
    end) or a precomputed face. Identity encoding is timed per face, apart from the batches."""
    from .. import generation as gen

    face_times = []
    identity = None
    for i in range(runs + 1):
        t0 = time.perf_counter()
        c_id = rt.encode_faces([face])[0]
        if i:  # the first call loads the face models: warm-up, not timed
            face_times.append(time.perf_counter() - t0)
        identity = (c_id, rt.unconditional_identity())
    settings = gen.BatchSettings(height=height, width=width, steps=steps, scheduler=scheduler)
    rows = []
    for b in batch_sizes:
        requests = [gen.GenerationRequest(f"a photo of a person, variant {k}", faces=[face], seed=k) for k in range(b)]
        stages: Dict[str, List[float]] = {"encode": [], "denoise": [], "decode": [], "total": []}
        for i in range(runs + 1):
            t0 = time.perf_counter()
            out = rt.generate(requests, settings, progress=False, identities=[identity] * b)
            total = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up (first run of this shape)
            for k in ("encode", "denoise", "decode"):
                stages[k].append(out.timings[k])
            stages["total"].append(total)
            if progress is not None:
                progress(b, i)
        p = {k: percentiles(v) for k, v in stages.items()}
        rows.append({"batch": b, "stages": p, "images_per_s": b / p["total"]["p50"],
                     "per_image_s": p["total"]["p50"] / b, "runs": runs})
    return {
        "mode": "offline",
        "shape": {"height": height, "width": width, "steps": steps, "scheduler": scheduler, "cfg": True},
        "identity_s": percentiles(face_times),
        "rows": rows,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def offline_table(result: Dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"offline: {s['width']}x{s['height']}, {s['steps']} steps, {s['scheduler']}, CFG; "
             f"face front end + ID encoder p50 {result['identity_s']['p50'] * 1000:.1f} ms per face; "
             f"peak RSS {result['peak_rss_mib']:.0f} MiB",
             "| batch | encode p50 ms | denoise p50 / p90 / p99 ms | decode p50 ms | total p50 / p90 / p99 ms | images/s |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        st = r["stages"]
        ms = lambda d: f"{d['p50'] * 1000:.1f} / {d['p90'] * 1000:.1f} / {d['p99'] * 1000:.1f}"  # noqa: E731
        lines.append(f"| {r['batch']} | {st['encode']['p50'] * 1000:.1f} | {ms(st['denoise'])} | "
                     f"{st['decode']['p50'] * 1000:.1f} | {ms(st['total'])} | {r['images_per_s']:.2f} |")
    return "\n".join(lines)


# -- online ----------------------------------------------------------------------------
def png_b64(image: Any) -> str:
    b = io.BytesIO()
    image.save(b, format="PNG")
    return base64.b64encode(b.getvalue()).decode()


def _post(url: str, body: bytes, timeout: float) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "Accept": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # no HTTP answer (connection refused, reset, client timeout)


def bench_online(url: str, payload: Dict[str, Any], concurrency: Sequence[int], requests: int, duration: float,
                 timeout: float = 300.0, vary_seed: bool = True, progress: Optional[Any] = None) -> Dict[str, Any]:
    """Closed-loop clients against ``url``. Per level: at most ``requests`` requests and
    ``duration`` seconds (whichever ends first; requests in flight then are waited for)."""
    target = url.rstrip("/") + "/v1/generate"
    levels = []
    seed = [0]
    lock = threading.Lock()
    for c in concurrency:
        results: List[tuple] = []
        sent = [0]
        t_start = time.perf_counter()

        def client() -> None:
            while True:
                with lock:
                    if sent[0] >= requests or time.perf_counter() - t_start > duration:
                        return
                    sent[0] += 1
                    seed[0] += 1
                    s = seed[0]
                body = json.dumps({**payload, "seed": s if vary_seed else payload.get("seed", 0)}).encode()
                t0 = time.perf_counter()
                status = _post(target, body, timeout)
                with lock:
                    results.append((status, time.perf_counter() - t0))

        with ThreadPoolExecutor(c) as pool:
            for _ in range(c):
                pool.submit(client)
        wall = time.perf_counter() - t_start
        ok = [t for st, t in results if st == 200]
        codes: Dict[str, int] = {}
        for st, _ in results:
            codes[str(st)] = codes.get(str(st), 0) + 1
        levels.append({
            "concurrency": c, "sent": len(results), "ok": len(ok), "wall_s": wall,
            "throughput_rps": len(ok) / wall if wall else 0.0,
            "latency_s": percentiles(ok), "status_counts": codes,
            "rejected_429": codes.get("429", 0),
            "errors": sum(n for k, n in codes.items() if k not in ("200", "429")),
        })
        if progress is not None:
            progress(levels[-1])
    base = levels[0]["throughput_rps"] if levels else 0.0
    for lv in levels:
        lv["speedup_vs_first"] = lv["throughput_rps"] / base if base else float("nan")
    shape = {k: payload.get(k) for k in ("height", "width", "steps", "scheduler")}
    return {"mode": "online", "url": url, "shape": shape, "requests_per_level": requests,
            "duration_per_level_s": duration, "levels": levels}


def online_table(result: Dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"online: {result['url']}, {s.get('width')}x{s.get('height')}, {s.get('steps')} steps "
             f"(<= {result['requests_per_level']} requests or {result['duration_per_level_s']:g} s per level)",
             "| concurrency | sent | ok | 429 | errors | throughput req/s | x level 1 | latency p50 / p90 / p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        lat = lv["latency_s"]
        lines.append(f"| {lv['concurrency']} | {lv['sent']} | {lv['ok']} | {lv['rejected_429']} | {lv['errors']} | "
                     f"{lv['throughput_rps']:.2f} | {lv['speedup_vs_first']:.2f} | "
                     f"{lat['p50'] * 1000:.0f} / {lat['p90'] * 1000:.0f} / {lat['p99'] * 1000:.0f} |")
    return "\n".join(lines)
