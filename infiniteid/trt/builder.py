"""The TensorRT builder calls: ONNX in, serialised engine out. Kept thin on purpose.

Every decision (which engines, which profiles, precision, where files go) is
made in :mod:`.plan`; this module only turns one :class:`~.plan.EngineJob` into
a plan with the TensorRT 10/11 Python API:

* strongly typed networks: precision comes from the ONNX tensor types (TensorRT
  11 has no other kind; on 10.x the ``STRONGLY_TYPED`` creation flag asks for
  it). No precision builder flags are set, so the same code runs on both;
* the project's plugin registrations (:mod:`infiniteid.kernels.trt_plugin`) are
  loaded before the parser sees a graph that uses them, and TensorRT's own
  plugin library is initialised; after parsing, the plugin layers are counted
  against the graph's plugin nodes (a parser that took the function body
  instead is refused);
* one optimisation profile per shape range of the job;
* one timing cache shared by every engine of the build, loaded from and saved
  to a file so later builds reuse the measured tactics;
* a progress display from TensorRT's ``IProgressMonitor`` (nested tqdm bars).

Only the full ``tensorrt`` package can build (``tensorrt_lean`` only runs).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm.auto import tqdm

from .names import write_atomic
from .plan import BuildError, BuildOptions, BuiltPlan, EngineJob


def import_tensorrt_builder() -> Any:
    """The full ``tensorrt`` module (with ``Builder``), or a clear error."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(
            "building engines needs TensorRT (the full package, not only the lean runtime): "
            f"pip install 'tensorrt>=10.9' on a machine with an NVIDIA GPU ({e})"
        ) from None
    if not hasattr(trt, "Builder"):
        raise BuildError(f"the installed tensorrt {getattr(trt, '__version__', '?')} has no Builder "
                         "(a runtime-only install); install the full tensorrt package to build engines")
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


class PhaseBars:
    """Nested progress bars for a builder's phases (the logic behind the progress monitor).

    TensorRT reports phases as a tree (``phase_start(name, parent, steps)``,
    ``step_complete(name, step)``, ``phase_finish(name)``) from its own threads.
    Phases deeper than ``max_depth`` are followed but not drawn.
    """

    def __init__(self, label: str, max_depth: int = 1, enabled: bool = True):
        self.label = label
        self.max_depth = max_depth
        self.enabled = enabled
        self.cancelled = False
        self._lock = threading.Lock()
        self._depth: Dict[str, int] = {}
        self._bars: Dict[str, Any] = {}

    def start(self, phase: str, parent: Optional[str], steps: int) -> None:
        with self._lock:
            depth = 0 if parent is None else self._depth.get(parent, 0) + 1
            self._depth[phase] = depth
            if self.enabled and depth <= self.max_depth:
                self._bars[phase] = tqdm(total=max(int(steps), 1), desc=f"{self.label}: {phase}",
                                         position=depth + 1, leave=False, unit="step")

    def step(self, phase: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase)
            if bar is not None:
                bar.n = min(int(step) + 1, bar.total)
                bar.refresh()
            return not self.cancelled

    def finish(self, phase: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase, None)
            if bar is not None:
                bar.close()
            self._depth.pop(phase, None)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            self._depth.clear()


def make_progress_monitor(trt: Any, bars: PhaseBars) -> Optional[Any]:
    """A ``trt.IProgressMonitor`` that drives ``bars``; None if this TensorRT has no progress monitor."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            bars.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return bars.step(phase_name, step)

        def phase_finish(self, phase_name):
            bars.finish(phase_name)

    return Monitor()


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A TensorRT logger that prints through tqdm (so bars stay intact) and keeps the errors for messages."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.level = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING
            self.errors: List[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(self.level):
                tqdm.write(f"[TensorRT] {msg}")

    return Logger()


def load_plugins(job: EngineJob) -> None:
    """Register the project's TensorRT plugins when the job's graph uses them (before parsing)."""
    if not job.needs_plugin:
        return
    try:
        from ..kernels.trt_plugin import register_plugin
    except ImportError as e:
        raise BuildError(f"{job.onnx_path}: the graph uses the project's attention plugin, but its TensorRT "
                         f"registration cannot be imported ({e})") from None
    register_plugin()


def plugin_layers(trt: Any, network: Any) -> List[Optional[str]]:
    """Every plugin (IPluginV3) layer of a parsed network: its plugin's ``namespace::name``, None if unreadable.

    ``get_layer`` hands out the base ``ILayer``; as polygraphy does, the layer's
    class is set to ``IPluginV3Layer`` to reach its plugin.
    """
    found: List[Optional[str]] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        try:
            layer.__class__ = trt.IPluginV3Layer
            v3layer = layer
            plugin = v3layer.plugin
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            found.append(f"{core.plugin_namespace}::{core.plugin_name}")
        except Exception:  # the binding did not let us read it: count it, unnamed
            found.append(None)
    return found


def check_plugin_layers(job: EngineJob, found: List[Optional[str]]) -> None:
    """Refuse a network whose plugin layers do not match the graph's ``MixedAttention`` nodes.

    Some ONNX parser versions import a model-local function body in preference to
    a plugin, and an unregistered plugin falls back to the body silently: the
    engine would then be plain ops, not the kernel asked for. Layers whose plugin
    cannot be named count as ours.
    """
    if not job.needs_plugin:
        return
    from ..kernels.trt_plugin import PLUGIN_ID

    ours = sum(1 for f in found if f is None or f == PLUGIN_ID)
    expected = job.plugin_nodes
    if (expected is None and ours == 0) or (expected is not None and ours != expected):
        want = f"{expected}" if expected is not None else "at least one"
        raise BuildError(
            f"{job.onnx_path}: the graph has {want} {PLUGIN_ID} node(s) but TensorRT's parser made {ours} plugin "
            f"layer(s) of it: it imported the node's function body instead (or the plugin is not registered). "
            "Export without the function body (infiniteid.kernels.onnx_op.strip_function_bodies) or use a "
            "TensorRT whose parser maps the node to the plugin (10.9+)"
        )


class TrtBuilder:
    """Builds :class:`~.plan.EngineJob` s into plans; one instance per ``infiniteid build`` run."""

    def __init__(self, options: BuildOptions, timing_cache: Optional[Path] = None, verbose: bool = False,
                 progress: bool = True):
        self.trt = trt = import_tensorrt_builder()
        self.options = options
        self.progress = progress
        self.logger = make_logger(trt, verbose)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.builder = trt.Builder(self.logger)
        self.timing_cache_path = timing_cache
        self._cache: Any = None

    # -- timing cache ----------------------------------------------------------------
    def _attach_timing_cache(self, config: Any) -> None:
        if self.timing_cache_path is None:
            return
        if self._cache is None:
            data = b""
            if self.timing_cache_path.is_file():
                data = self.timing_cache_path.read_bytes()
            cache = config.create_timing_cache(data)
            if cache is None or not config.set_timing_cache(cache, False):
                tqdm.write(f"timing cache {self.timing_cache_path} does not match this TensorRT/GPU; starting a new one")
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
            self._cache = cache
        else:
            config.set_timing_cache(self._cache, False)

    def save_timing_cache(self) -> None:
        if self._cache is not None and self.timing_cache_path is not None:
            data = self._cache.serialize()
            write_atomic(self.timing_cache_path, lambda f: f.write(memoryview(data)))

    # -- one engine --------------------------------------------------------------------
    def __call__(self, job: EngineJob, folder: Path) -> BuiltPlan:
        trt = self.trt
        load_plugins(job)
        flags = 0
        if trt_major(trt) < 11:  # 11.x networks are always strongly typed (the flag is deprecated there)
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(job.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BuildError(f"{job.onnx_path}: TensorRT cannot parse the {job.name} graph: " + "; ".join(errors))
        if job.needs_plugin:
            check_plugin_layers(job, plugin_layers(trt, network))
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        outputs = [network.get_output(i) for i in range(network.num_outputs)]
        names = sorted(t.name for t in inputs)
        for p in job.profiles:
            if sorted(p) != names:
                raise BuildError(f"{job.onnx_path}: the graph's inputs {names} differ from the profile's {sorted(p)}")

        config = self.builder.create_builder_config()
        config.builder_optimization_level = int(self.options.opt_level)
        if self.options.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.options.workspace_gb * (1 << 30)))
        if self.options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        static = {t.name: tuple(t.shape) for t in inputs if all(d >= 0 for d in t.shape)}
        for shapes in job.profiles:
            profile = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                if name in static:  # fixed in the graph: no profile entry, but it must agree
                    if not tuple(lo) == tuple(hi) == static[name]:
                        raise BuildError(f"{job.onnx_path}: input {name!r} is fixed to {list(static[name])} in the "
                                         f"graph but the profile asks {list(lo)} .. {list(hi)}")
                    continue
                profile.set_shape(name, lo, opt, hi)
            if len(static) == len(inputs):
                break  # a fully static graph takes no optimisation profile
            if config.add_optimization_profile(profile) < 0:
                raise BuildError(f"{job.name}: TensorRT refused the optimisation profile {shapes}")
        self._attach_timing_cache(config)
        bars = PhaseBars(job.name, enabled=self.progress)
        monitor = make_progress_monitor(trt, bars)
        if monitor is not None:
            config.progress_monitor = monitor
        self.logger.errors.clear()
        try:
            plan = self.builder.build_serialized_network(network, config)
        finally:
            bars.close()
        if plan is None:
            why = "; ".join(self.logger.errors[-5:]) or "see the TensorRT log above"
            raise BuildError(f"TensorRT failed to build the {job.name} engine: {why}")
        self.save_timing_cache()
        io = [{"name": t.name, "mode": "input", "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)}
              for t in inputs]
        io += [{"name": t.name, "mode": "output", "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)}
               for t in outputs]
        return BuiltPlan(data=plan, io=io)
