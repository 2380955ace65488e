"""The TensorRT backend: the bundle's engines on an NVIDIA GPU, the denoising loop on the device.

``TrtBackend(bundle)`` loads the engines built by ``infiniteid build`` for this
GPU and TensorRT version (``engines/<gpu>-sm<cc>-trt<version>/``). Before
TensorRT sees a plan, the sidecars are checked (:mod:`infiniteid.trt.engine_check`):
an engine built with another TensorRT, for another GPU or from an ONNX file that
has since changed is refused with the ``infiniteid build`` command that rebuilds it.
A plan that carries host code (a version-compatible plan's lean runtime) loads
only when it was built on this machine or with ``trust_engine_code=True``
(:mod:`infiniteid.trt.trust`); engine files must lie inside the bundle.

* ``run(component, feeds)``: host arrays in and out, tensors bound by name;
* ``denoise(loop)`` (:class:`~infiniteid.runtime.backend.DeviceLoop`): the whole
  loop on the GPU. The U-Net writes its prediction into a buffer the step engine
  (guidance + scheduler step, :mod:`infiniteid.trt.step_graph`) reads, and the
  step engine writes the next U-Net input in place; only the first input and the
  final latents cross to and from the host. Static engines replay each step as a
  CUDA graph;
* one scratch block of device memory shared by every engine, one stream.

TensorRT comes from the ``tensorrt`` package, or from the lean runtime
(``tensorrt_lean``) for engines built with ``--version-compatible``. Device
memory and streams go through cuda-python. Torch-free.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..bundle import file_digest
from ..contract import COMPONENTS, UNET
from ..trt import cuda
from ..trt.engine_check import EngineMismatch, Target, build_command, find_engine_folder, load_sidecars
from ..trt.names import EngineSidecar, check_engine_folder, plan_path, sidecar_path
from ..trt.runner import EngineRunner
from ..trt.step_graph import STEP_CFG, STEP_NOCFG, StepGraphSpec, coefficient_table, first_sample, step_graph_key
from ..trt.trust import allow_host_code
from .backend import BackendError, Feeds, Outputs
from .loader import Bundle
from .loop import LoopInputs, host_loop

GRAPH_MODES = ("auto", "always", "never")


def import_tensorrt_runtime() -> Tuple[Any, bool]:
    """(module, is_lean): the full ``tensorrt`` if installed, else ``tensorrt_lean``."""
    try:
        import tensorrt as trt

        if hasattr(trt, "Runtime"):
            return trt, False
    except ImportError:
        pass
    try:
        import tensorrt_lean as trt
    except ImportError:
        raise BackendError(
            "the 'trt' backend needs TensorRT: pip install 'tensorrt>=10.9' (or tensorrt-lean for engines built "
            "with --version-compatible), plus cuda-python; or use --backend ort"
        ) from None
    return trt, True


def _make_logger(trt: Any) -> Any:
    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: List[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                tqdm.write(f"[TensorRT] {msg}")

    return Logger()


class TrtBackend:
    """Runs a bundle's TensorRT engines. See the module docstring.

    Options: ``device`` (CUDA device index, 0), ``engine_dir`` (use this engine
    folder instead of the one named for this GPU; still checked), ``components``
    (load only these), ``cuda_graphs`` (``"auto"``: for static engines;
    ``"always"``; ``"never"``), ``device_loop`` (False: run the loop on the host),
    ``trust_engine_code`` (let TensorRT run host code that plans carry, such as
    version-compatible plans' lean runtime, also for plans not built on this
    machine; see :mod:`infiniteid.trt.trust`).
    """

    name = "trt"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: int = 0,
        engine_dir: Optional[str] = None,
        components: Optional[Sequence[str]] = None,
        cuda_graphs: str = "auto",
        device_loop: bool = True,
        trust_engine_code: bool = False,
    ):
        if cuda_graphs not in GRAPH_MODES:
            raise BackendError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}, got {cuda_graphs!r}")
        self.bundle = bundle
        self.cuda_graphs = cuda_graphs
        self.device_loop = device_loop
        self._lock = threading.Lock()
        self.runners: Dict[str, EngineRunner] = {}
        self._scratch: Optional[cuda.DeviceBuffer] = None
        self._stream: Optional[cuda.Stream] = None
        self._warned: set = set()
        trt, lean = import_tensorrt_runtime()
        self.trt, self.lean = trt, lean
        # The GPU first: TensorRT's runtime crashes on a machine without one.
        cuda.require_device(device)
        self.device = cuda.device_info(device)
        self.target = Target(self.device, str(trt.__version__))
        self.folder = Path(engine_dir).expanduser() if engine_dir else find_engine_folder(bundle.path, self.target)
        if not engine_dir:  # a folder the bundle names: it and its files must not lead outside
            self.folder = check_engine_folder(bundle.path, self.folder)
        comps = list(components or COMPONENTS)
        unknown = [c for c in comps if c not in COMPONENTS]
        if unknown:
            raise BackendError(f"unknown components {unknown}; choose from {', '.join(COMPONENTS)}")
        sidecars, notes = load_sidecars(bundle.path, self.folder, bundle.manifest, comps, self.target,
                                        extra_hashes=self._step_hashes(comps))
        for n in notes:
            warnings.warn(n, RuntimeWarning, stacklevel=2)
        if lean and not all(s.version_compatible for s in sidecars.values()):
            raise BackendError(
                "only the lean TensorRT runtime (tensorrt_lean) is installed, and it runs only engines built with "
                "--version-compatible: install the full tensorrt package, or rebuild with: "
                + build_command(bundle.path, {**next(iter(sidecars.values())).build, "version_compatible": True})
            )
        self.sidecars = sidecars
        self.trust_engine_code = bool(trust_engine_code)
        self.host_code_allowed = self._host_code_decisions(sidecars)  # refuses before TensorRT sees a plan
        self._load(sidecars)
        self._stream = cuda.Stream()

    # -- loading -------------------------------------------------------------------------
    def _step_hashes(self, comps: Sequence[str]) -> Dict[str, str]:
        """Step graphs present in the engine folder, with the hash the current graph code gives them."""
        if UNET not in comps:
            return {}
        unet = self.bundle.component(UNET)
        out = {}
        for cfg, name in ((True, STEP_CFG), (False, STEP_NOCFG)):
            if sidecar_path(self.folder, name).is_file():
                out[name] = step_graph_key(StepGraphSpec.for_unet(unet, cfg))
        return out

    def _host_code_decisions(self, sidecars: Dict[str, EngineSidecar]) -> Dict[str, bool]:
        """Per plan: may TensorRT run the host code it carries (:func:`~infiniteid.trt.trust.allow_host_code`)."""
        out = {}
        for name, sc in sidecars.items():
            plan = plan_path(self.folder, name)
            out[name] = allow_host_code(name, sc, lambda plan=plan: file_digest(plan), self.trust_engine_code, plan,
                                        rebuild=build_command(self.bundle.path, sc.build))
        return out

    def _load(self, sidecars: Dict[str, EngineSidecar]) -> None:
        trt = self.trt
        self.logger = _make_logger(trt)
        runtime = trt.Runtime(self.logger)
        self._runtime = runtime
        for name, sc in sidecars.items():
            hint = build_command(self.bundle.path, sc.build)
            data = plan_path(self.folder, name).read_bytes()
            runtime.engine_host_code_allowed = self.host_code_allowed[name]  # False unless trusted or built here
            self.logger.errors.clear()
            engine = runtime.deserialize_cuda_engine(data)
            del data
            if engine is None:
                why = "; ".join(self.logger.errors[-3:]) or "see the TensorRT log"
                raise EngineMismatch(f"{plan_path(self.folder, name)}: TensorRT cannot load it ({why}). "
                                     f"Rebuild with: {hint}")
            runner = EngineRunner(trt, engine, name, sc, rebuild_hint=hint)
            if name in self.bundle.manifest.components:
                spec = self.bundle.component(name)
                want_in = sorted(t.name for t in spec.inputs)
                want_out = sorted(t.name for t in spec.outputs)
                if sorted(runner.inputs) != want_in or sorted(runner.outputs) != want_out:
                    raise EngineMismatch(
                        f"{plan_path(self.folder, name)}: engine tensors {sorted(runner.inputs)} -> "
                        f"{sorted(runner.outputs)} differ from the manifest's {want_in} -> {want_out}. "
                        f"Rebuild with: {hint}"
                    )
            self.runners[name] = runner
        size = max((r.device_memory_size for r in self.runners.values()), default=0)
        self._scratch = cuda.DeviceBuffer(size)
        for r in self.runners.values():
            r.create_context(self._scratch.ptr, self._scratch.nbytes)
            r.use_graph = self.cuda_graphs == "always" or (self.cuda_graphs == "auto" and r.is_static())

    @property
    def stream(self) -> cuda.Stream:
        """The stream every engine of this backend runs on (e.g. to time them with CUDA events)."""
        if self._stream is None:
            raise BackendError("the TensorRT backend is closed")
        return self._stream

    def runner(self, component: str) -> EngineRunner:
        try:
            return self.runners[component]
        except KeyError:
            raise BackendError(f"no TensorRT engine for {component!r} was loaded (have: {', '.join(self.runners)})") from None

    def fixed_input_shapes(self, component: str) -> Optional[Dict[str, Tuple[int, ...]]]:
        """The input shapes of a static engine (None when its shapes may vary)."""
        r = self.runners.get(component)
        if r is None or not r.is_static():
            return None
        return {n: rng[0] for n, rng in r.profile_ranges().items()}

    # -- host in, host out --------------------------------------------------------------------
    def run(self, component: str, feeds: Feeds) -> Outputs:
        with self._lock:
            r = self.runner(component)
            extra = sorted(set(feeds) - set(r.inputs))
            missing = sorted(set(r.inputs) - set(feeds))
            if extra or missing:
                raise BackendError(f"{component}: wrong inputs (missing {missing}, unknown {extra}); it takes {sorted(r.inputs)}")
            host = {n: np.ascontiguousarray(feeds[n], dtype=r.dtypes[n]) for n in r.inputs}
            r.set_input_shapes({n: a.shape for n, a in host.items()})
            stream = self._stream
            for n, a in host.items():
                buf = r.own_buffer(n)
                cuda.copy_to_device(buf.ptr, a, stream)
                r.bind(n, buf.ptr)
            r.bind_own(r.outputs)
            r.launch(stream)
            out = {n: np.empty(r.shape(n), dtype=r.dtypes[n]) for n in r.outputs}
            for n, a in out.items():
                cuda.copy_to_host(a, r.addresses[n], stream)
            stream.synchronize()
            del host  # the copies above read it until the synchronize
            return {n: (a.astype(np.float32) if a.dtype in (np.float16, np.float64) else a) for n, a in out.items()}

    # -- the whole loop on the GPU ------------------------------------------------------------
    def denoise(self, loop: LoopInputs) -> np.ndarray:
        step_name = STEP_CFG if loop.layout.cfg else STEP_NOCFG
        if not self.device_loop or step_name not in self.runners or not hasattr(loop.scheduler, "step_coefficients"):
            if step_name not in self.runners and step_name not in self._warned:
                self._warned.add(step_name)
                warnings.warn(f"no {step_name} engine in {self.folder}: the denoising loop runs on the host "
                              "(rebuild to get it)", RuntimeWarning, stacklevel=2)
            return host_loop(self, loop)
        with self._lock:
            return self._denoise(loop, step_name)

    def _denoise(self, loop: LoopInputs, step_name: str) -> np.ndarray:
        unet, step = self.runner(UNET), self.runner(step_name)
        stream = self._stream
        steps = loop.steps
        coefs, next_scale = coefficient_table(loop.scheduler, steps)
        latents = np.ascontiguousarray(loop.latents, dtype=np.float32)
        sample = first_sample(latents, loop.layout, float(coefs[0, 0]), unet.dtypes["sample"].name)
        fixed = {n: np.ascontiguousarray(a, dtype=unet.dtypes[n]) for n, a in loop.unet_feeds.items()}
        timesteps = np.asarray(loop.timesteps, dtype=unet.dtypes["timestep"]).reshape(steps, 1)
        unet.set_input_shapes({**{n: a.shape for n, a in fixed.items()}, "sample": sample.shape, "timestep": (1,)})
        keep: List[np.ndarray] = [sample, timesteps, coefs, next_scale, latents]  # alive until the final sync
        for n, a in fixed.items():
            buf = unet.own_buffer(n)
            cuda.copy_to_device(buf.ptr, a, stream)
            unet.bind(n, buf.ptr)
            keep.append(a)
        unet.bind_own(["sample", "timestep", "noise_pred"])
        cuda.copy_to_device(unet.addresses["sample"], sample, stream)

        # Per-step numbers live in device tables; each step copies its row into the bound inputs.
        tables = {
            "timestep": cuda.DeviceBuffer(timesteps.nbytes),
            "coefficients": cuda.DeviceBuffer(coefs.nbytes),
            "next_input_scale": cuda.DeviceBuffer(next_scale.nbytes),
        }
        cuda.copy_to_device(tables["timestep"].ptr, timesteps, stream)
        cuda.copy_to_device(tables["coefficients"].ptr, coefs, stream)
        cuda.copy_to_device(tables["next_input_scale"].ptr, next_scale, stream)

        shapes = {"noise_pred": unet.shape("noise_pred"), "latents": latents.shape, "prev_denoised": latents.shape,
                  "coefficients": (coefs.shape[1],), "next_input_scale": (1,)}
        if "guidance" in step.inputs:
            guidance = np.ascontiguousarray(loop.guidance, dtype=np.float32).reshape(-1, 1, 1, 1)
            shapes["guidance"] = guidance.shape
            keep.append(guidance)
        step.set_input_shapes(shapes)
        step.bind("noise_pred", unet.addresses["noise_pred"])
        step.bind("sample_out", unet.addresses["sample"])  # the next U-Net input, written in place
        step.bind_own(["latents", "prev_denoised", "coefficients", "next_input_scale", "latents_out", "denoised"]
                      + (["guidance"] if "guidance" in step.inputs else []))
        cuda.copy_to_device(step.addresses["latents"], latents, stream)
        cuda.fill_zeros(step.addresses["prev_denoised"], latents.nbytes, stream)
        if "guidance" in step.inputs:
            cuda.copy_to_device(step.addresses["guidance"], guidance, stream)

        host = np.empty_like(latents)
        ts_bytes = timesteps.itemsize
        row = coefs.shape[1] * 4
        try:
            for i in tqdm(range(steps), desc="denoising", disable=not loop.progress, leave=False):
                cuda.copy_on_device(unet.addresses["timestep"], tables["timestep"].ptr + i * ts_bytes, ts_bytes, stream)
                unet.launch(stream)
                cuda.copy_on_device(step.addresses["coefficients"], tables["coefficients"].ptr + i * row, row, stream)
                cuda.copy_on_device(step.addresses["next_input_scale"], tables["next_input_scale"].ptr + i * 4, 4, stream)
                step.launch(stream)
                cuda.copy_on_device(step.addresses["latents"], step.addresses["latents_out"], latents.nbytes, stream)
                cuda.copy_on_device(step.addresses["prev_denoised"], step.addresses["denoised"], latents.nbytes, stream)
                if loop.callback is not None:
                    cuda.copy_to_host(host, step.addresses["latents"], stream)
                    stream.synchronize()
                    loop.callback(i, host.copy())
                elif loop.progress:
                    stream.synchronize()  # so the bar shows GPU progress, not enqueue speed
            cuda.copy_to_host(host, step.addresses["latents"], stream)
            stream.synchronize()
        finally:
            stream.synchronize()
            for b in tables.values():
                b.free()
            del keep
        return host

    # -- clean-up ---------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for r in self.runners.values():
                r.close()
            self.runners.clear()
            if self._scratch is not None:
                self._scratch.free()
                self._scratch = None
            if self._stream is not None:
                self._stream.destroy()
                self._stream = None
            self._runtime = None

    def describe(self) -> Dict[str, Any]:
        return {
            "backend": self.name,
            "tensorrt": self.target.trt_version,
            "lean_runtime": self.lean,
            "device": self.device.name,
            "compute_capability": self.device.cc,
            "engines": str(self.folder),
            "cuda_graphs": {n: r.use_graph for n, r in self.runners.items()},
            "scratch_bytes": self._scratch.nbytes if self._scratch else 0,
        }

    def __enter__(self) -> "TrtBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
