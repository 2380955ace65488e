"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python.

cuda-python returns a tuple from every call, ``(error, value...)``, and never
raises; :func:`check` turns a non-success code into a :class:`BackendError` that
names the call. Without a driver or GPU every call returns
``cudaErrorInsufficientDriver`` or ``cudaErrorNoDevice``; :func:`device_count`
answers 0 then, so callers can refuse cleanly before touching TensorRT (whose
runtime crashes on a machine without a GPU).

Module path: ``cuda.bindings.runtime`` (cuda-python 12.6.2.post1 and later,
13.x); the older ``cuda.cudart`` is tried for older 12.x installs.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..runtime.backend import BackendError
from .names import DeviceInfo

_CUDART: Any = None


def cudart() -> Any:
    """The cuda-python runtime module (imported on first use)."""
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt  # cuda-python < 12.6.2.post1
            except ImportError:
                raise BackendError(
                    "the TensorRT backend needs cuda-python for device memory and streams: "
                    "pip install 'cuda-python>=12.6.2'"
                ) from None
        _CUDART = rt
    return _CUDART


def error_name(err: Any) -> str:
    rt = cudart()
    try:
        r = rt.cudaGetErrorName(err)
        name = r[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # an unknown code: show what we have
        return str(err)


def check(result: Any, what: str) -> Any:
    """``result`` of a cuda-python call -> its value (None, one value, or a tuple); raise on error."""
    rt = cudart()
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    if err != rt.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call {what} failed: {error_name(err)}")
    if len(result) == 1:
        return None
    if len(result) == 2:
        return result[1]
    return result[1:]


def device_count() -> int:
    """CUDA devices this process can use; 0 when there is no driver or GPU."""
    try:
        rt = cudart()
    except BackendError:
        return 0
    r = rt.cudaGetDeviceCount()
    if r[0] != rt.cudaError_t.cudaSuccess:
        return 0
    return int(r[1])


def require_device(device: int = 0) -> None:
    """Make ``device`` current; a clear error where there is no GPU."""
    n = device_count()
    if n == 0:
        rt = cudart()
        err = rt.cudaGetDeviceCount()[0]
        raise BackendError(
            f"the TensorRT backend needs an NVIDIA GPU and driver; none is usable here ({error_name(err)}). "
            "Use --backend ort on this machine"
        )
    if not 0 <= device < n:
        raise BackendError(f"CUDA device {device} does not exist; this machine has {n}")
    check(cudart().cudaSetDevice(device), "cudaSetDevice")


def device_info(device: int = 0) -> DeviceInfo:
    """Name and compute capability of ``device`` (for engine folder names and sidecars)."""
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return DeviceInfo(name=str(name).strip(), compute_capability=(int(props.major), int(props.minor)))


def memory_info() -> Tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc: 256-byte aligned, as TensorRT requires)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(max(nbytes, 1))
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __del__(self) -> None:  # best effort; close() frees explicitly
        try:
            self.free()
        except Exception:
            pass


class Stream:
    """A non-blocking CUDA stream (TensorRT recommends against the default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def copy_to_device(dst: int, host: np.ndarray, stream: Stream) -> None:
    """Host array -> device (asynchronous; keep ``host`` alive until the stream syncs)."""
    rt = cudart()
    check(
        rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
        "cudaMemcpyAsync(host to device)",
    )


def copy_to_host(host: np.ndarray, src: int, stream: Stream) -> None:
    """Device -> host array (asynchronous; synchronise the stream before reading ``host``)."""
    rt = cudart()
    check(
        rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
        "cudaMemcpyAsync(device to host)",
    )


def copy_on_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(
        rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
        "cudaMemcpyAsync(device to device)",
    )


def fill_zeros(dst: int, nbytes: int, stream: Stream) -> None:
    check(cudart().cudaMemsetAsync(dst, 0, nbytes, stream.handle), "cudaMemsetAsync")


def clear_error() -> None:
    """Reset this thread's last CUDA error (``cudaGetLastError``).

    A failed or invalidated stream capture leaves its error set for the thread;
    without this the next unrelated call reports it. trtexec clears it the same
    way before it falls back to plain enqueues.
    """
    cudart().cudaGetLastError()


def _discard(graph: Any) -> None:
    """Destroy a graph that will not be used, and clear the error its failure left."""
    rt = cudart()
    if graph is not None:
        rt.cudaGraphDestroy(graph)
    clear_error()


class CudaGraph:
    """One captured sequence of stream work, replayed with a single launch.

    Capture rules the caller keeps: the same tensor addresses and shapes at every
    replay, no synchronisation inside the captured function, a non-default stream.
    A capture that fails (the enqueue returns False or raises, ending the capture
    or instantiating the graph fails) raises :class:`BackendError` after ending
    the capture, destroying the partial graph and clearing the CUDA error, so the
    caller can go on without a graph on the same stream.
    """

    def __init__(self, stream: Stream, enqueue) -> None:
        rt = cudart()
        self.graph: Optional[Any] = None
        self.exec: Optional[Any] = None
        check(
            rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            ok = bool(enqueue())
        except BaseException:
            # End the capture whatever happened, or the stream stays unusable.
            _discard(self._end(stream)[1])
            raise
        err, graph = self._end(stream)
        if not ok or err is not None:
            _discard(graph)
            why = "enqueue failed while capturing" if not ok else f"cudaStreamEndCapture: {err}"
            raise BackendError(f"the engine could not be captured into a CUDA graph ({why})")
        r = rt.cudaGraphInstantiate(graph, 0)
        if r[0] != rt.cudaError_t.cudaSuccess:
            name = error_name(r[0])
            _discard(graph)
            raise BackendError(f"the captured CUDA graph could not be instantiated (cudaGraphInstantiate: {name})")
        self.graph, self.exec = graph, r[1]

    @staticmethod
    def _end(stream: Stream) -> Tuple[Optional[str], Any]:
        """End the capture: (error name or None, the graph or None)."""
        rt = cudart()
        r = rt.cudaStreamEndCapture(stream.handle)
        if r[0] != rt.cudaError_t.cudaSuccess:
            return error_name(r[0]), (r[1] if len(r) > 1 else None)
        return None, r[1]

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self.exec is not None:
            rt.cudaGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph is not None:
            rt.cudaGraphDestroy(self.graph)
            self.graph = None


class Event:
    """A CUDA event, for timing stream work (milliseconds between two events)."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        """Milliseconds from ``start`` to this event (both recorded; this one synchronised)."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None
