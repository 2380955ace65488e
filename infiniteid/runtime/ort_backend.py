"""The onnxruntime backend: every bundle component as one ``InferenceSession``.

* Providers: the CPU provider always; the CUDA provider first when the installed
  onnxruntime offers it *and* a CUDA device is present (``onnxruntime-gpu``
  lists CUDA as available on machines without a GPU, so its presence alone
  proves nothing). Pass ``providers`` to choose explicitly.
* Threads: ``intra_op_threads`` (threads inside one operator) defaults to the
  CPUs this process may use, ``inter_op_threads`` (parallel branches of a graph)
  to 1, since diffusion graphs are one long chain and extra inter-op threads only
  compete with intra-op ones.
* Precision: an fp16 graph takes float16 inputs; callers always pass float32,
  and this backend casts float inputs to the graph's dtype and float outputs
  back to float32, so the runtime above it never sees float16. INT8 and FP8
  (QDQ) graphs take float32. onnxruntime's CPU provider has float8 kernels only
  for QuantizeLinear/DequantizeLinear, and its QDQ propagation passes move
  Transposes onto the float8 tensors, so those passes are off for fp8 graphs.
* Feeds are checked against the manifest before a run (names, dtypes, ranks,
  fixed dimensions) so a mistake says which tensor is wrong, instead of an
  onnxruntime message about node indices.

Sessions are created lazily, on a component's first run, so a tool that only
needs the text encoders does not pay for loading the U-Net.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..bundle import BundleError, ComponentSpec
from ..devices import CPU, CUDA, cuda_device_count, usable_providers  # noqa: F401 (re-exported)
from .backend import BackendError, Feeds, Outputs
from .loader import Bundle

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_FLOATS = (np.float16, np.float32, np.float64)
#: Graph optimisations that would leave an fp8 (QDQ) graph with float8 ops the CPU provider lacks.
FP8_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer", "QDQSelectorActionTransformer")


def default_providers(available: Sequence[str]) -> List[str]:
    """CUDA then CPU where a GPU and the CUDA provider exist, else CPU (:mod:`infiniteid.devices`)."""
    return usable_providers(available)


def default_intra_op_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend:
    """Runs a bundle's ONNX graphs with onnxruntime. See the module docstring."""

    name = "ort"

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: Optional[Sequence[Any]] = None,
        intra_op_threads: Optional[int] = None,
        inter_op_threads: Optional[int] = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(
                f"the 'ort' backend needs onnxruntime (pip install onnxruntime-gpu): {e}"
            ) from None
        self._ort = ort
        self.bundle = bundle
        available = ort.get_available_providers()
        if providers is None:
            providers = default_providers(available)
        else:
            providers = list(providers)
            for p in providers:
                pname = p[0] if isinstance(p, (tuple, list)) else p
                if pname not in available:
                    raise BackendError(
                        f"onnxruntime provider {pname!r} is not available here; available: {', '.join(available)}"
                    )
        self.providers = providers
        for what, n in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise BackendError(f"{what} must be a positive integer, got {n!r}")
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        self.inter_op_threads = inter_op_threads or 1
        self._sessions: Dict[str, Any] = {}
        self._io: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- sessions ----------------------------------------------------------------
    def _options(self):
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: fp16 graphs otherwise warn about every Cast
        return so

    def session(self, component: str):
        """The component's session, created on first use."""
        with self._lock:
            if component not in self._sessions:
                self._sessions[component] = self._open(component)
            return self._sessions[component]

    def _open(self, component: str):
        spec = self.bundle.component(component)
        path = self.bundle.onnx_path(component)
        try:
            disabled = list(FP8_DISABLED_OPTIMIZERS) if spec.precision == "fp8" else None
            sess = self._ort.InferenceSession(
                str(path), sess_options=self._options(), providers=self.providers, disabled_optimizers=disabled
            )
        except Exception as e:  # onnxruntime raises its own untyped exceptions
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: onnxruntime cannot load component {component!r}: {first}") from None
        graph_in = {i.name: i for i in sess.get_inputs()}
        graph_out = {o.name: o for o in sess.get_outputs()}
        for kind, declared, graph in (("input", spec.inputs, graph_in), ("output", spec.outputs, graph_out)):
            names = sorted(t.name for t in declared)
            if names != sorted(graph):
                raise BundleError(
                    f"{path}: the graph's {kind}s {sorted(graph)} differ from the manifest's {names}"
                )
            for t in declared:
                g = graph[t.name]
                if len(g.shape) != len(t.shape):
                    raise BundleError(
                        f"{path}: {kind} {t.name!r} has rank {len(g.shape)} in the graph, {len(t.shape)} in the manifest"
                    )
        self._io[component] = {
            "inputs": {n: {"dtype": _ORT_DTYPES.get(i.type), "type": i.type} for n, i in graph_in.items()},
            "outputs": {n: {"dtype": _ORT_DTYPES.get(o.type), "type": o.type} for n, o in graph_out.items()},
        }
        return sess

    def active_providers(self, component: str = "unet") -> List[str]:
        """Providers the session of ``component`` really uses (onnxruntime falls back silently)."""
        return list(self.session(component).get_providers())

    # -- running -----------------------------------------------------------------
    def run(self, component: str, feeds: Feeds) -> Outputs:
        sess = self.session(component)
        spec = self.bundle.component(component)
        ready = self._prepare(component, spec, feeds)
        try:
            values = sess.run(None, ready)
        except Exception as e:
            raise BackendError(f"onnxruntime failed running {component!r}: {str(e).strip().splitlines()[0]}") from None
        names = [o.name for o in sess.get_outputs()]
        out: Outputs = {}
        for n, v in zip(names, values):
            v = np.asarray(v)
            if v.dtype in (np.float16, np.float64):
                v = v.astype(np.float32)
            out[n] = v
        return out

    def _prepare(self, component: str, spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Check feeds against the manifest and cast them to the graph's dtypes."""
        declared = {t.name: t for t in spec.inputs}
        missing = [n for n in declared if n not in feeds]
        extra = [n for n in feeds if n not in declared]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unknown {extra}")
            raise BackendError(f"{component}: wrong inputs ({'; '.join(parts)}); it takes {sorted(declared)}")
        graph = self._io[component]["inputs"]
        ready: Dict[str, np.ndarray] = {}
        for name, t in declared.items():
            x = np.asarray(feeds[name])
            want = np.dtype(t.dtype)
            if x.ndim != len(t.shape):
                raise BackendError(
                    f"{component}: input {name!r} must have rank {len(t.shape)} {list(t.shape)}, got shape {list(x.shape)}"
                )
            for axis, (d, n) in enumerate(zip(t.shape, x.shape)):
                if isinstance(d, int) and d != n:
                    raise BackendError(
                        f"{component}: input {name!r} must have size {d} on axis {axis} {list(t.shape)}, got shape {list(x.shape)}"
                    )
            is_float = np.issubdtype(want, np.floating)
            if is_float != np.issubdtype(x.dtype, np.floating) or (not is_float and not np.issubdtype(x.dtype, np.integer)):
                raise BackendError(f"{component}: input {name!r} must be {t.dtype}, got {x.dtype}")
            target = graph[name]["dtype"] or want
            ready[name] = np.ascontiguousarray(x, dtype=target)
        return ready

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._io.clear()

    def describe(self) -> Dict[str, Any]:
        return {
            "backend": self.name,
            "onnxruntime": self._ort.__version__,
            "providers": [p[0] if isinstance(p, (tuple, list)) else p for p in self.providers],
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
        }

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
