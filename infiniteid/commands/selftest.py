"""``infiniteid selftest [--gpu] [--out report.json]``: does everything work on this machine?

One command a user runs on a fresh box (a GPU box above all) and acts on, or
sends back. It records the environment (Python, driver, CUDA runtime, GPU and
compute capability, TensorRT and its lean runtime, cuda-python, onnxruntime and
its providers, triton, insightface, torch, polygraphy), then runs the tiny
random-weight model through every part:

* the bundle: the tiny model exported once (cached as for ``demo``; needs the
  ``[export]`` extra) or the one given with ``--bundle``, copied to a temporary
  folder so nothing of the user's is written, loaded with its hashes checked;
* every component on onnxruntime's CPU provider, and a generation on it;
* with ``--gpu``: the onnxruntime CUDA provider against the CPU one, the Triton
  kernel against its torch reference, fp16 TensorRT engines (from an fp16 export
  of the tiny model) built static and dynamic, ``check`` TensorRT against onnxruntime per component, generations
  on TensorRT (host loop, device loop, CUDA graphs on and off), Polygraphy's
  TrtRunner on the same engines, and a bundle exported with the attention plugin.

Every step ends pass, fail or skip, with the reason, the time it took and the
versions that matter to it; the table goes to the screen and the report to
``--out`` as JSON. Exit status 0 only if no step failed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

EPILOG = """\
examples:
  infiniteid selftest                             CPU steps; GPU steps are listed as skipped
  infiniteid selftest --gpu --out report.json     everything, and the report to send back
  infiniteid selftest --bundle tiny-bundle/       test this (small) bundle instead of exporting one

Exit status 0 when no step failed (skipped steps do not count), 1 otherwise.
"""

PASS, FAIL, SKIP = "pass", "fail", "skip"
#: a --bundle larger than this is not copied (the self test is for small bundles)
MAX_BUNDLE_BYTES = 2 << 30
FORMAT_VERSION = 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "selftest",
        help="check this machine: environment, then the tiny model through every backend (--gpu for the GPU steps)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpu", action="store_true", help="also run the GPU steps (TensorRT, CUDA provider, Triton)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the report as JSON")
    p.add_argument("--bundle", type=Path, metavar="DIR",
                   help="a small bundle to test instead of the exported tiny model (it is copied, not modified)")
    p.add_argument("--keep", action="store_true", help="keep the working folder (engines, images) and print it")
    p.set_defaults(run=run)


class Skip(Exception):
    """A step that cannot run here; the message says why."""


@dataclass
class Step:
    name: str
    status: str
    seconds: float
    reason: str = ""
    versions: Dict[str, str] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)


def module_version(name: str) -> Optional[str]:
    """A module's version if it imports, else None (never raises)."""
    try:
        mod = __import__(name, fromlist=["__version__"])
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


class SelfTest:
    """Runs steps in order; each records pass/fail/skip, reason, time, versions."""

    def __init__(self, progress: Callable[[str], None] = lambda s: None):
        self.steps: List[Step] = []
        self.progress = progress

    def status(self, name: str) -> Optional[str]:
        return next((s.status for s in self.steps if s.name == name), None)

    def run(self, name: str, fn: Callable[[], Optional[Dict[str, Any]]], needs: Sequence[str] = (),
            versions: Sequence[str] = ()) -> Step:
        vers = {m: v for m in versions for v in [module_version(m)] if v is not None}
        blocked = [s for n in needs for s in self.steps if s.name == n and s.status != PASS]
        t0 = time.perf_counter()
        if blocked:
            b = blocked[0]
            # a skip passes its reason on (every GPU step says why); a failure is named
            step = Step(name, SKIP, 0.0, b.reason if b.status == SKIP else f"needs {b.name}, which failed", vers)
        else:
            self.progress(f"selftest: {name} ...")
            try:
                step = Step(name, PASS, 0.0, "", vers, dict(fn() or {}))
            except Skip as e:
                step = Step(name, SKIP, 0.0, str(e), vers)
            except Exception as e:  # a failing step is a result, not a crash
                step = Step(name, FAIL, 0.0, one_line(e), vers,
                            {"traceback": traceback.format_exc(limit=6).splitlines()[-8:]})
        step.seconds = round(time.perf_counter() - t0, 3)
        self.steps.append(step)
        return step

    @property
    def failed(self) -> List[Step]:
        return [s for s in self.steps if s.status == FAIL]

    def table(self) -> str:
        width = max([len(s.name) for s in self.steps] + [4])
        lines = [f"{'step':<{width}}  result  seconds  reason", "-" * (width + 40)]
        for s in self.steps:
            lines.append(f"{s.name:<{width}}  {s.status:<6}  {s.seconds:7.2f}  {s.reason}")
        n = {k: sum(1 for s in self.steps if s.status == k) for k in (PASS, FAIL, SKIP)}
        lines.append(f"{n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped")
        return "\n".join(lines)

    def report(self, environment: Dict[str, Any], args: Dict[str, Any]) -> Dict[str, Any]:
        return {"format": FORMAT_VERSION, "command": args, "environment": environment,
                "passed": not self.failed, "steps": [asdict(s) for s in self.steps]}


# -- environment ---------------------------------------------------------------------------------------------
def gpu_state() -> Dict[str, Any]:
    """Driver, CUDA runtime and GPUs through cuda-python; ``usable`` False with the reason where there are none."""
    try:
        from ..trt import cuda
        from ..runtime.backend import BackendError

        rt = cuda.cudart()
    except Exception as e:
        return {"usable": False, "reason": f"cuda-python is not installed ({one_line(e)})"}
    out: Dict[str, Any] = {}
    for key, call in (("driver", rt.cudaDriverGetVersion), ("cuda_runtime", rt.cudaRuntimeGetVersion)):
        r = call()
        if r[0] == rt.cudaError_t.cudaSuccess and r[1]:
            out[key] = f"{r[1] // 1000}.{(r[1] % 1000) // 10}"
    n = cuda.device_count()
    if n == 0:
        out.update(usable=False, reason=f"no usable NVIDIA GPU ({cuda.error_name(rt.cudaGetDeviceCount()[0])})")
        return out
    try:
        out["gpus"] = [{"name": d.name, "compute_capability": d.cc} for d in (cuda.device_info(i) for i in range(n))]
    except BackendError as e:
        return {**out, "usable": False, "reason": str(e)}
    out["usable"] = True
    return out


def environment() -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("numpy", "onnx", "onnxruntime", "tokenizers", "tensorrt", "tensorrt_lean", "triton", "torch",
                "polygraphy", "insightface", "diffusers"):
        env[mod] = module_version(mod)
    try:
        from importlib.metadata import version

        env["cuda-python"] = version("cuda-python")
    except Exception:
        env["cuda-python"] = None
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception:
        env["onnxruntime_providers"] = []
    env["gpu"] = gpu_state()
    return env


# -- helpers ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def captured() -> Any:
    """Collect what a command prints (shown only when it fails)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def cli(argv: List[str]) -> str:
    """Run an ``infiniteid`` command in this process; raise with its last lines when it fails."""
    from ..cli import main

    with captured() as buf:
        rc = main(argv)
    text = buf.getvalue()
    if rc != 0:
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"infiniteid {' '.join(argv[:1])} exited {rc}: " + " | ".join(tail))
    return text


def prepare_bundle(work: Path, given: Optional[Path]) -> Dict[str, Any]:
    """Copy ``given`` (or the cached tiny bundle, exported on first use) into ``work/bundle``."""
    if given is not None:
        src = Path(given).expanduser()
        if not (src / "manifest.json").is_file():
            raise FileNotFoundError(f"{src}: not a bundle folder (no manifest.json)")
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and "engines" not in p.parts)
        if size > MAX_BUNDLE_BYTES:
            raise RuntimeError(f"{src} holds {size / 2**30:.1f} GiB; the self test copies its bundle and is "
                               "meant for the tiny model (leave --bundle out)")
        origin = str(src)
    else:
        from .demo import cache_dir, tiny_bundle

        if module_version("torch") is None:
            raise Skip("exporting the tiny model needs the [export] extra (torch); or pass --bundle DIR")
        with captured():
            src = tiny_bundle(cache_dir(), progress=False)
        origin = f"{src} (tiny random-weight model, exported once)"
    dst = work / "bundle"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("engines"))
    return {"bundle": origin}


def load_bundle(path: Path) -> Dict[str, Any]:
    from ..runtime.loader import Bundle

    b = Bundle.load(path, verify_hashes=True)
    return {"components": {c: s.precision for c, s in b.manifest.components.items()}}


def run_component(bundle_path: Path, component: str, providers: Optional[List[str]] = None):
    """One component on onnxruntime with the ``check`` command's seeded inputs; finite outputs required."""
    import numpy as np

    from ..runtime.loader import Bundle
    from ..runtime.ort_backend import OrtBackend
    from .check import input_shapes, sample_feeds

    b = Bundle.load(bundle_path)
    res = b.manifest.resolution or {}
    h, w = int(res.get("default_height", 1024)), int(res.get("default_width", 1024))
    feeds = sample_feeds(b, component, input_shapes(b, component, h, w, 1), 0, h, w)
    be = OrtBackend(b, providers=providers)
    try:
        out = be.run(component, feeds)
        active = be.active_providers(component)
    finally:
        be.close()
    bad = [n for n, v in out.items() if not np.all(np.isfinite(v))]
    if bad:
        raise RuntimeError(f"{component}: non-finite values in {bad}")
    return out, active, feeds


def generate(bundle_path: Path, work: Path, backend: str, name: str, **opts: Any) -> Dict[str, Any]:
    """A 2-step generation through the runtime (synthetic face models); the image must be finite and varied."""
    import numpy as np

    from .. import generation as gen
    from ..runtime import Runtime
    from .demo import demo_face, synthetic_face_models

    face = work / "face.png"
    if not face.is_file():
        demo_face().save(face)
    rt = Runtime(bundle_path, backend=backend, face_models=synthetic_face_models(work), **opts)
    try:
        out = rt.generate([gen.GenerationRequest(prompt="a photo of a person", faces=[str(face)], seed=0)],
                          gen.BatchSettings(height=rt.default_height, width=rt.default_width, steps=2))
    finally:
        rt.close()
    img = np.asarray(out.images[0], dtype=np.float64)
    if not np.all(np.isfinite(img)) or float(img.std()) == 0.0:
        raise RuntimeError(f"{name}: the image is {'not finite' if not np.all(np.isfinite(img)) else 'constant'}")
    np.save(work / f"{name}.npy", np.asarray(out.images[0]))
    return {"image_shape": list(img.shape), "image_mean": round(float(img.mean()), 4)}


def same_image(work: Path, a: str, b: str, tolerance: float) -> Dict[str, Any]:
    """Two generations of the same request must agree (mean absolute difference in 0..255 units)."""
    import numpy as np

    x, y = (np.load(work / f"{n}.npy").astype(np.float64) for n in (a, b))
    diff = float(np.abs(x - y).mean())
    if diff > tolerance:
        raise RuntimeError(f"{a} and {b} differ by {diff:.3f} on average (tolerance {tolerance})")
    return {"mean_abs_difference": round(diff, 5)}


# -- the steps -------------------------------------------------------------------------------------------------
def cpu_steps(t: SelfTest, work: Path, given: Optional[Path]) -> None:
    bundle = work / "bundle"
    t.run("bundle", lambda: prepare_bundle(work, given), versions=("torch", "onnx"))
    t.run("bundle: load, hashes", lambda: load_bundle(bundle), needs=["bundle"])
    from ..contract import COMPONENTS

    for c in COMPONENTS:
        def one(c=c):
            _, active, feeds = run_component(bundle, c, ["CPUExecutionProvider"])
            return {"providers": active, "inputs": {n: list(v.shape) for n, v in feeds.items()}}

        t.run(f"onnxruntime CPU: {c}", one, needs=["bundle: load, hashes"], versions=("onnxruntime",))
    t.run("generate: onnxruntime CPU", lambda: generate(bundle, work, "ort", "ort-cpu",
                                                        providers=["CPUExecutionProvider"]),
          needs=[f"onnxruntime CPU: {c}" for c in COMPONENTS], versions=("onnxruntime", "tokenizers"))


def gpu_steps(t: SelfTest, work: Path, env: Dict[str, Any], asked: bool, given: Optional[Path]) -> None:
    bundle = work / "bundle"
    gpu = env.get("gpu", {})
    trt_bundle = bundle if given is not None else work / "bundle-fp16"

    def need_gpu() -> None:
        if not asked:
            raise Skip("GPU step: run with --gpu")
        if not gpu.get("usable"):
            raise Skip(gpu.get("reason", "no usable GPU"))

    def gpu_device() -> Dict[str, Any]:
        if not asked:
            raise Skip("GPU step: run with --gpu")
        if not gpu.get("usable"):
            raise RuntimeError(f"--gpu asked, but {gpu.get('reason', 'no GPU is usable')}")
        return {k: gpu.get(k) for k in ("gpus", "driver", "cuda_runtime")}

    t.run("gpu: device", gpu_device)

    def ort_cuda() -> Dict[str, Any]:
        need_gpu()
        import onnxruntime as ort

        from ..compare import Tolerance, compare_outputs

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        out, active, _ = run_component(bundle, "unet", ["CUDAExecutionProvider", "CPUExecutionProvider"])
        if active[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime fell back to {active} (CUDA/cuDNN libraries missing?)")
        ref, _, _ = run_component(bundle, "unet", ["CPUExecutionProvider"])
        report = compare_outputs("unet", out, ref, Tolerance())
        if not report.passed:
            raise RuntimeError("; ".join(w for ws in report.failures.values() for w in ws))
        return {"providers": active, "cosine": [s.cosine for s in report.stats]}

    t.run("onnxruntime CUDA: unet vs CPU", ort_cuda, needs=["bundle: load, hashes"], versions=("onnxruntime",))

    def triton_kernel() -> Dict[str, Any]:
        need_gpu()
        try:
            import torch

            from ..kernels.reference import mixed_attention_reference
            from ..kernels.triton_mixed import mixed_attention_triton
        except ImportError as e:
            raise Skip(f"the Triton kernel check needs torch and triton ({e})")
        if not torch.cuda.is_available():
            raise Skip("torch sees no CUDA device (a CPU build of torch?)")
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(4, 2, 300, 64, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
        got = mixed_attention_triton(q, k, v).float()
        want = mixed_attention_reference(q.float(), k.float(), v.float())
        rel = float((got - want).norm() / want.norm())
        if not rel < 1e-2:
            raise RuntimeError(f"Triton kernel vs reference: relative error {rel:.2e} (> 1e-2)")
        return {"relative_error": rel, "device": torch.cuda.get_device_name()}

    t.run("triton kernel vs reference", triton_kernel, needs=["gpu: device"], versions=("triton", "torch"))

    def need_trt() -> None:
        need_gpu()
        if module_version("tensorrt") is None:
            raise Skip("TensorRT is not installed (pip install 'tensorrt>=10.9')")

    def fp16_bundle() -> Dict[str, Any]:
        need_trt()
        if given is not None:
            return {"bundle": "the --bundle copy, as exported"}
        if module_version("torch") is None:
            raise Skip("exporting the fp16 tiny model needs the [export] extra (torch); or pass --bundle DIR")
        cli(["export", "--tiny", "--precision", "fp16", "--out", str(trt_bundle), "--no-progress"])
        return {"bundle": "tiny random-weight model, fp16 export (fp32 VAE)"}

    t.run("bundle for TensorRT (fp16)", fp16_bundle, needs=["bundle: load, hashes", "gpu: device"],
          versions=("torch",))
    base = ["bundle for TensorRT (fp16)"]
    for shapes in ("static", "dynamic"):
        built = f"trt build {shapes}"

        def build(shapes=shapes) -> Dict[str, Any]:
            return {"log": cli(["build", str(trt_bundle), "--shapes", shapes, "--force", "--no-progress"])[-400:]}

        t.run(built, build, needs=base, versions=("tensorrt",))
        t.run(f"trt check vs onnxruntime ({shapes})",
              lambda: {"table": cli(["check", str(trt_bundle), "--backend", "trt", "--against", "ort",
                                     "--failures-dir", str(work / "failures")]).splitlines()[-8:]},
              needs=[built], versions=("tensorrt", "onnxruntime"))
        variants = [("host loop", {"device_loop": False}), ("device loop, graphs on", {"cuda_graphs": "always"}),
                    ("device loop, graphs off", {"cuda_graphs": "never"})]
        for label, opts in variants:
            t.run(f"generate: trt {shapes}, {label}",
                  lambda opts=opts, label=label: generate(trt_bundle, work, "trt", f"trt-{shapes}-{label}", **opts),
                  needs=[built], versions=("tensorrt",))
        t.run(f"generate: trt {shapes}, graphs on = off",
              lambda: same_image(work, f"trt-{shapes}-device loop, graphs on", f"trt-{shapes}-device loop, graphs off",
                                 1e-3), needs=[f"generate: trt {shapes}, {v[0]}" for v in variants[1:]])
        t.run(f"polygraphy TrtRunner vs ours ({shapes})",
              lambda: {"table": cli(["check", str(trt_bundle), "--backend", "trt", "--against", "polygraphy",
                                     "--failures-dir", str(work / "failures")]).splitlines()[-9:]},
              needs=[built], versions=("polygraphy", "tensorrt"))

    def plugin_bundle() -> Dict[str, Any]:
        need_trt()
        if module_version("torch") is None:
            raise Skip("exporting the plugin bundle needs the [export] extra (torch)")
        out = work / "plugin-bundle"
        cli(["export", "--tiny", "--precision", "fp16", "--attention-plugin", "--out", str(out), "--no-progress"])
        cli(["build", str(out), "--shapes", "static", "--no-progress"])
        cli(["check", str(out), "--backend", "trt", "--against", "ort", "--failures-dir", str(work / "failures")])
        return generate(out, work, "trt", "trt-plugin")

    t.run("plugin bundle: export, build, check, generate", plugin_bundle, needs=["bundle: load, hashes", "gpu: device"],
          versions=("tensorrt", "triton"))


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError

    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out must be a file, {args.out} is a folder")
    t = SelfTest(progress=lambda s: print(s, file=sys.stderr, flush=True))
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="infiniteid-selftest-"))
    try:
        t.run("environment", lambda: {k: v for k, v in env.items() if v is not None})
        cpu_steps(t, work, args.bundle)
        gpu_steps(t, work, env, args.gpu, args.bundle)
    finally:
        if args.keep or t.failed:  # a failure's engines, images and check cases are worth looking at
            print(f"working folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(t.table())
    if args.out is not None:
        from ..trt.names import write_atomic

        doc = t.report(env, {"gpu": args.gpu, "bundle": str(args.bundle) if args.bundle else None})
        write_atomic(args.out, json.dumps(doc, indent=2, default=str) + "\n")
        print(f"report: {args.out}")
    if t.failed:
        print(f"selftest FAILED: {', '.join(s.name for s in t.failed)}", file=sys.stderr)
        return 1
    print("selftest passed")
    return 0
