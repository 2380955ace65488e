"""One deserialised engine with its execution context, device buffers and CUDA graph.

The TensorRT runtime calls live here and in :mod:`infiniteid.runtime.trt_backend`
only; they are the subset the lean runtime (``tensorrt_lean``) also has, and a
test checks every name and signature used here against it. Tensors are bound by
name (``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), never by binding index.

Device memory: the context is created with the ``USER_MANAGED`` allocation
strategy and given a slice of one scratch block that every engine shares
(``device_memory_size_v2`` is the size each needs); engines run one after the
other on one stream, so sharing is safe.

CUDA graphs: when enabled, the first run with a given set of shapes and tensor
addresses runs normally and captures the enqueue into a graph; later runs with
the same shapes and addresses replay it. A small cache (:class:`GraphCache`,
the most recently used :data:`GRAPH_CACHE_SIZE` graphs) keeps one graph per
(shapes, addresses), so a dynamic engine run with ``cuda_graphs="always"`` at
alternating shapes replays instead of capturing at every call. An engine that
cannot be captured (any error during capture) runs without a graph from then on.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..runtime.backend import BackendError
from . import cuda
from .names import EngineSidecar


#: CUDA graphs kept per engine (one per set of shapes and tensor addresses).
GRAPH_CACHE_SIZE = 4


class GraphCache:
    """Captured graphs by key, least recently used evicted (and destroyed) past ``size``."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE):
        if size < 1:
            raise ValueError(f"graph cache size must be >= 1, got {size}")
        self.size = size
        self._graphs: "OrderedDict[Hashable, Any]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: Hashable) -> Optional[Any]:
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    def put(self, key: Hashable, graph: Any) -> None:
        old = self._graphs.pop(key, None)
        if old is not None and old is not graph:
            old.destroy()
        self._graphs[key] = graph
        while len(self._graphs) > self.size:
            _, evicted = self._graphs.popitem(last=False)
            evicted.destroy()

    def clear(self) -> None:
        while self._graphs:
            _, graph = self._graphs.popitem(last=False)
            graph.destroy()


class EngineRunner:
    """An engine's context and I/O; see the module docstring."""

    def __init__(self, trt: Any, engine: Any, name: str, sidecar: Optional[EngineSidecar] = None,
                 rebuild_hint: str = ""):
        self.trt = trt
        self.engine = engine
        self.name = name
        self.sidecar = sidecar
        self.rebuild_hint = rebuild_hint
        self.context: Any = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs: List[str] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs: List[str] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes: Dict[str, np.dtype] = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers: Dict[str, cuda.DeviceBuffer] = {}
        self.addresses: Dict[str, int] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.use_graph = False
        self.graphs = GraphCache()

    # -- set-up ------------------------------------------------------------------------
    @property
    def device_memory_size(self) -> int:
        """Scratch bytes the context needs (the largest over the engine's profiles)."""
        return int(self.engine.device_memory_size_v2)

    def create_context(self, scratch_ptr: int, scratch_size: int) -> None:
        """Execution context on user-managed scratch memory (shared with the other engines)."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for the {self.name} engine")
        self.context.set_device_memory(scratch_ptr, scratch_size)

    def profile_ranges(self, profile: int = 0) -> Dict[str, Tuple[Tuple[int, ...], ...]]:
        """input -> (min, opt, max) of the engine's ``profile``."""
        out = {}
        for n in self.inputs:
            lo, opt, hi = self.engine.get_tensor_profile_shape(n, profile)
            out[n] = (tuple(lo), tuple(opt), tuple(hi))
        return out

    def is_static(self) -> bool:
        return all(r[0] == r[2] for r in self.profile_ranges().values())

    # -- shapes and buffers ----------------------------------------------------------------
    def set_input_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Set every input's shape; a shape outside the engine's profile is a clear error."""
        missing = [n for n in self.inputs if n not in shapes]
        if missing:
            raise BackendError(f"{self.name}: no shape for inputs {missing}")
        for n in self.inputs:
            shape = tuple(int(v) for v in shapes[n])
            if self.shapes.get(n) == shape:
                continue
            if not self.context.set_input_shape(n, shape):
                lo, _, hi = self.profile_ranges()[n]
                raise BackendError(
                    f"{self.name}: input {n!r} shape {list(shape)} is outside what the engine was built for "
                    f"({list(lo)} .. {list(hi)}). Rebuild for it, e.g. {self.rebuild_hint or 'infiniteid build BUNDLE --shapes dynamic'}"
                )
            self.shapes[n] = shape
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise BackendError(f"{self.name}: TensorRT cannot infer shapes of {unresolved}")

    def shape(self, name: str) -> Tuple[int, ...]:
        """A tensor's current shape (outputs: after the input shapes are set)."""
        return tuple(int(v) for v in self.context.get_tensor_shape(name))

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtypes[name].itemsize

    def own_buffer(self, name: str) -> cuda.DeviceBuffer:
        """This engine's own device buffer for ``name``, grown to the tensor's current size."""
        need = self.nbytes(name)
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < need:
            if buf is not None:
                buf.free()
            buf = cuda.DeviceBuffer(need)
            self.buffers[name] = buf
        return buf

    def bind(self, name: str, ptr: int) -> None:
        if self.addresses.get(name) == ptr:
            return
        if not self.context.set_tensor_address(name, int(ptr)):
            raise BackendError(f"{self.name}: TensorRT refused the address of tensor {name!r}")
        self.addresses[name] = int(ptr)

    def bind_own(self, names: Sequence[str]) -> None:
        for n in names:
            self.bind(n, self.own_buffer(n).ptr)

    # -- running ---------------------------------------------------------------------------
    def enqueue(self, stream: cuda.Stream) -> bool:
        return bool(self.context.execute_async_v3(int(stream)))

    def launch(self, stream: cuda.Stream) -> None:
        """Run once on ``stream`` (asynchronously): replay the CUDA graph when shapes and addresses allow."""
        if not self.use_graph:
            if not self.enqueue(stream):
                raise BackendError(f"TensorRT failed to enqueue the {self.name} engine")
            return
        key = (tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items())))
        graph = self.graphs.get(key)
        if graph is not None:
            graph.launch(stream)
            return
        # Enqueue once normally (it does this call's work and TensorRT's first-run set-up), then capture.
        if not self.enqueue(stream):
            raise BackendError(f"TensorRT failed to enqueue the {self.name} engine")
        try:
            graph = cuda.CudaGraph(stream, lambda: self.enqueue(stream))
        except Exception as e:  # whatever went wrong, this call's work is done: go on without graphs
            self.use_graph = False
            self.drop_graph()
            warnings.warn(f"{self.name}: running without CUDA graphs ({e})", RuntimeWarning, stacklevel=2)
            return
        self.graphs.put(key, graph)

    def drop_graph(self) -> None:
        """Destroy every captured graph of this engine."""
        self.graphs.clear()

    def close(self) -> None:
        self.drop_graph()
        for b in self.buffers.values():
            b.free()
        self.buffers.clear()
        self.addresses.clear()
        self.context = None
        self.engine = None
