"""CUDA-graph handling of the TensorRT runner: the graph cache and the capture failure paths.

Nothing here can capture a real graph (no GPU, no TensorRT), so the CUDA runtime
and the execution context are stand-ins that record what the code calls, in
order. What is checked is our logic: which graph a launch replays, when a
capture happens, and that a failed capture ends the capture, destroys the
partial graph and clears the thread's CUDA error before the engine goes on
without graphs. The real cuda-python is used where it answers without a GPU.
"""
from __future__ import annotations

import enum
import types
import warnings

import pytest

from infiniteid.runtime.backend import BackendError
from infiniteid.trt import cuda
from infiniteid.trt.runner import GRAPH_CACHE_SIZE, EngineRunner, GraphCache


# -- the cache ------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, name):
        self.name, self.destroyed, self.launches = name, 0, 0

    def destroy(self):
        self.destroyed += 1

    def launch(self, stream):
        self.launches += 1


def test_graph_cache_keeps_the_most_recently_used_and_destroys_what_it_drops():
    cache = GraphCache(size=2)
    a, b, c = Graph("a"), Graph("b"), Graph("c")
    cache.put("A", a)
    cache.put("B", b)
    assert cache.get("A") is a  # A is now the most recent
    cache.put("C", c)  # evicts B, the least recently used
    assert len(cache) == 2 and cache.get("B") is None and cache.get("A") is a and cache.get("C") is c
    assert (a.destroyed, b.destroyed, c.destroyed) == (0, 1, 0)
    a2 = Graph("a2")
    cache.put("A", a2)  # a new capture for the same key replaces (and destroys) the old one
    assert cache.get("A") is a2 and a.destroyed == 1
    cache.clear()
    assert len(cache) == 0 and (a2.destroyed, c.destroyed) == (1, 1)
    with pytest.raises(ValueError, match="graph cache size must be >= 1"):
        GraphCache(0)


# -- the runner with a stand-in engine -----------------------------------------------------------------
class Mode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


FAKE_TRT = types.SimpleNamespace(TensorIOMode=Mode, nptype=lambda dt: dt)


class Engine:
    """The few ICudaEngine reads EngineRunner.__init__ makes."""

    names = ("x", "y")
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return Mode.INPUT if name == "x" else Mode.OUTPUT

    def get_tensor_dtype(self, name):
        return "float32"


class Context:
    def __init__(self):
        self.enqueues = 0
        self.fail_from = None  # enqueue number from which execute_async_v3 returns False

    def set_input_shape(self, name, shape):
        return True

    def infer_shapes(self):
        return []

    def set_tensor_address(self, name, ptr):
        return True

    def execute_async_v3(self, stream):
        self.enqueues += 1
        return self.fail_from is None or self.enqueues < self.fail_from


@pytest.fixture()
def runner(monkeypatch):
    captured = []

    class Captured(Graph):
        def __init__(self, stream, enqueue):
            super().__init__(len(captured))
            if not enqueue():
                raise BackendError("enqueue failed while capturing")
            captured.append(self)

    monkeypatch.setattr(cuda, "CudaGraph", Captured)
    r = EngineRunner(FAKE_TRT, Engine(), "unet")
    r.context = Context()
    r.use_graph = True
    r.captured = captured
    return r


def run_at(r, shape, address):
    r.set_input_shapes({"x": shape})
    r.bind("x", address)
    r.bind("y", address + 4096)
    r.launch(stream=0)


def test_alternating_shapes_replay_their_own_graphs_instead_of_recapturing(runner):
    for _ in range(3):
        run_at(runner, (2, 4), 1 << 20)
        run_at(runner, (4, 4), 2 << 20)
    assert len(runner.captured) == 2  # one capture per (shapes, addresses), not one per call
    first, second = runner.captured
    assert first.launches == 2 and second.launches == 2  # the first call of each captured, the others replayed
    # per capture: one plain enqueue (the call's own work) + one inside the capture
    assert runner.context.enqueues == 4
    run_at(runner, (2, 4), 3 << 20)  # same shapes, new address: a new graph
    assert len(runner.captured) == 3


def test_the_cache_is_bounded(runner):
    for n in range(GRAPH_CACHE_SIZE + 2):
        run_at(runner, (n + 1, 4), 1 << 20)
    assert len(runner.graphs) == GRAPH_CACHE_SIZE
    assert [g.destroyed for g in runner.captured] == [1, 1] + [0] * GRAPH_CACHE_SIZE
    runner.close()
    assert all(g.destroyed == 1 for g in runner.captured)


def test_any_capture_error_falls_back_to_plain_enqueues(monkeypatch):
    class Broken:
        def __init__(self, stream, enqueue):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda, "CudaGraph", Broken)
    r = EngineRunner(FAKE_TRT, Engine(), "unet")
    r.context = Context()
    r.use_graph = True
    with pytest.warns(RuntimeWarning, match="unet: running without CUDA graphs .*not permitted"):
        run_at(r, (2, 4), 1 << 20)
    assert not r.use_graph and len(r.graphs) == 0
    assert r.context.enqueues == 1  # the call's work was done by the plain enqueue
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_at(r, (2, 4), 1 << 20)  # no second attempt, no second warning
    assert r.context.enqueues == 2


# -- CudaGraph against a recording CUDA runtime ----------------------------------------------------------
class Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorIllegalState = 401


class RecordingCudart:
    """The cuda-python calls CudaGraph makes, recorded; ``fail`` maps a call name to the error it returns."""

    cudaError_t = Err
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, **fail):
        self.calls, self.fail = [], fail

    def _r(self, name, *value):
        self.calls.append(name)
        err = self.fail.get(name, Err.cudaSuccess)
        return (err, *value) if value else (err,)

    def cudaStreamBeginCapture(self, stream, mode):
        return self._r("begin")

    def cudaStreamEndCapture(self, stream):
        return self._r("end", "graph" if "end" not in self.fail else None)

    def cudaGraphInstantiate(self, graph, flags):
        return self._r("instantiate", "exec" if "instantiate" not in self.fail else None)

    def cudaGraphDestroy(self, graph):
        return self._r(f"destroy {graph}")

    def cudaGraphExecDestroy(self, exec_):
        return self._r(f"destroy {exec_}")

    def cudaGetLastError(self):
        return self._r("clear error")

    def cudaGetErrorName(self, err):
        return (Err.cudaSuccess, err.name.encode())


@pytest.fixture()
def fake_cudart(monkeypatch):
    def install(**fail):
        rt = RecordingCudart(**fail)
        monkeypatch.setattr(cuda, "_CUDART", rt)
        return rt

    return install


STREAM = types.SimpleNamespace(handle=7)


def test_a_good_capture_is_instantiated_and_destroyed_in_full(fake_cudart):
    rt = fake_cudart()
    g = cuda.CudaGraph(STREAM, lambda: True)
    assert (g.graph, g.exec) == ("graph", "exec")
    g.destroy()
    assert rt.calls == ["begin", "end", "instantiate", "destroy exec", "destroy graph"]


@pytest.mark.parametrize("case, fail, enqueue, calls, message", [
    ("enqueue returns False", {}, lambda: False,
     ["begin", "end", "destroy graph", "clear error"], "enqueue failed while capturing"),
    ("capture invalidated", {"end": Err.cudaErrorStreamCaptureInvalidated}, lambda: True,
     ["begin", "end", "clear error"], "cudaStreamEndCapture: cudaErrorStreamCaptureInvalidated"),
    ("instantiation fails", {"instantiate": Err.cudaErrorIllegalState}, lambda: True,
     ["begin", "end", "instantiate", "destroy graph", "clear error"], "cudaGraphInstantiate: cudaErrorIllegalState"),
])
def test_a_failed_capture_ends_destroys_and_clears_the_error(fake_cudart, case, fail, enqueue, calls, message):
    rt = fake_cudart(**fail)
    with pytest.raises(BackendError, match=message):
        cuda.CudaGraph(STREAM, enqueue)
    assert rt.calls == calls, case


def test_an_enqueue_that_raises_still_ends_the_capture(fake_cudart):
    rt = fake_cudart()

    def enqueue():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cuda.CudaGraph(STREAM, enqueue)
    assert rt.calls == ["begin", "end", "destroy graph", "clear error"]


def test_without_a_gpu_the_real_runtime_refuses_the_capture_by_name():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    if cuda.device_count() > 0:
        pytest.skip("a GPU is present; this checks the no-GPU answer")
    cuda.clear_error()  # answers without a GPU too
    called = []
    with pytest.raises(BackendError, match=r"cudaStreamBeginCapture failed: cudaError(InsufficientDriver|NoDevice)"):
        cuda.CudaGraph(STREAM, lambda: called.append(1))
    assert called == []
