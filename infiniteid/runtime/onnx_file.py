"""A cheap structural check of an ``.onnx`` file.

A bundle copied half-way (a truncated ``unet.onnx``, a missing tail of ``unet.onnx.data``)
must end in a clear error naming the file, not in an onnxruntime
``InvalidProtobuf`` traceback or a crash deep inside a session.

An ONNX file is a protobuf ``ModelProto``. Protobuf's wire format is simple
enough to walk: each field is a varint key (field number, wire type) followed by
a varint, a fixed 4/8-byte value, or a length-prefixed payload. A truncated file
therefore shows up as a field whose payload runs past the end of the file. The
walk only descends where it must (model -> graph -> initializers -> their
external-data entries) and skips every other payload by its length, so it costs
a few reads even for a multi-gigabyte graph. ``onnx.load`` would parse every
embedded weight (a 1.4 GB fp32 text encoder) only for onnxruntime to parse it again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from ..bundle import inside_bundle

# Field numbers from onnx.proto (stable since IR version 3).
_MODEL_IR_VERSION = 1
_MODEL_GRAPH = 7
_MODEL_OPSET_IMPORT = 8
_GRAPH_INITIALIZER = 5
_TENSOR_NAME = 8
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_ENTRY_KEY = 1
_ENTRY_VALUE = 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

_VARINT, _FIXED64, _LEN, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


class OnnxFileError(ValueError):
    """The file is not a complete ONNX model; the message says what is wrong (not which file)."""


@dataclass
class ExternalTensor:
    """Where one initializer's weights live outside the ``.onnx`` file."""

    tensor: str
    location: str
    offset: int
    length: Optional[int]


@dataclass
class OnnxFileInfo:
    ir_version: int
    opsets: int
    external: List[ExternalTensor] = field(default_factory=list)


class _Reader:
    """Sequential protobuf reader over a byte range of an open file."""

    def __init__(self, f: BinaryIO, start: int, end: int):
        self.f, self.pos, self.end = f, start, end
        f.seek(start)

    def done(self) -> bool:
        return self.pos >= self.end

    def _byte(self) -> int:
        if self.pos >= self.end:
            raise OnnxFileError(f"ends in the middle of a field at byte {self.pos}")
        b = self.f.read(1)
        if not b:
            raise OnnxFileError(f"ends in the middle of a field at byte {self.pos}")
        self.pos += 1
        return b[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise OnnxFileError(f"malformed varint at byte {self.pos}")

    def field(self) -> Tuple[int, int, int, int]:
        """Next field: (number, wire type, payload start, payload end or varint value)."""
        key = self.varint()
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFileError(f"invalid field number 0 at byte {self.pos}")
        if wire == _VARINT:
            return number, wire, self.pos, self.varint()
        if wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            return number, wire, self.pos, self._skip(size)
        if wire == _LEN:
            size = self.varint()
            start = self.pos
            return number, wire, start, self._skip(size)
        raise OnnxFileError(f"unsupported protobuf wire type {wire} at byte {self.pos}")

    def _skip(self, size: int) -> int:
        if self.pos + size > self.end:
            raise OnnxFileError(
                f"a field of {size} bytes at byte {self.pos} runs past the end ({self.end} bytes): "
                "the file is truncated"
            )
        self.pos += size
        self.f.seek(self.pos)
        return self.pos

    def fields(self) -> Iterator[Tuple[int, int, int, int]]:
        while not self.done():
            yield self.field()

    def bytes_at(self, start: int, end: int) -> bytes:
        here = self.pos
        self.f.seek(start)
        data = self.f.read(end - start)
        self.f.seek(here)
        return data


def _external_entries(f: BinaryIO, start: int, end: int) -> Optional[ExternalTensor]:
    """An initializer (TensorProto) -> its external-data record, if it has one."""
    r = _Reader(f, start, end)
    name, external, entries = "", False, {}
    for number, wire, s, e in r.fields():
        if number == _TENSOR_NAME and wire == _LEN:
            name = r.bytes_at(s, e).decode("utf-8", "replace")
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = e == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            sub = _Reader(f, s, e)
            key = value = ""
            for n2, w2, s2, e2 in sub.fields():
                if w2 == _LEN and n2 in (_ENTRY_KEY, _ENTRY_VALUE):
                    text = sub.bytes_at(s2, e2).decode("utf-8", "replace")
                    key, value = (text, value) if n2 == _ENTRY_KEY else (key, text)
            r.f.seek(r.pos)
            entries[key] = value
    if not external:
        return None
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise OnnxFileError(f"initializer {name!r} has a malformed external-data offset/length") from None
    if "location" not in entries:
        raise OnnxFileError(f"initializer {name!r} is stored externally but names no file")
    return ExternalTensor(tensor=name, location=entries["location"], offset=offset, length=length)


def scan_onnx(path: Path) -> OnnxFileInfo:
    """Walk the file's protobuf structure; raise :class:`OnnxFileError` if it is incomplete."""
    size = os.path.getsize(path)
    if size == 0:
        raise OnnxFileError("is empty")
    info = OnnxFileInfo(ir_version=0, opsets=0)
    graph: Optional[Tuple[int, int]] = None
    with open(path, "rb") as f:
        r = _Reader(f, 0, size)
        for number, wire, s, e in r.fields():
            if number == _MODEL_IR_VERSION and wire == _VARINT:
                info.ir_version = e
            elif number == _MODEL_OPSET_IMPORT and wire == _LEN:
                info.opsets += 1
            elif number == _MODEL_GRAPH and wire == _LEN:
                graph = (s, e)
        if not info.ir_version:
            raise OnnxFileError("has no IR version: not an ONNX model")
        if graph is None:
            raise OnnxFileError("has no graph: not an ONNX model (or truncated before the graph)")
        g = _Reader(f, *graph)
        for number, wire, s, e in g.fields():
            if number == _GRAPH_INITIALIZER and wire == _LEN:
                ext = _external_entries(f, s, e)
                f.seek(g.pos)
                if ext is not None:
                    info.external.append(ext)
    return info


def check_onnx_file(path: Path, root: Optional[Path] = None) -> OnnxFileInfo:
    """:func:`scan_onnx` plus: every external-data file exists and is long enough.

    With ``root`` (the bundle folder), every external-data location must also
    resolve inside it (:func:`~infiniteid.bundle.inside_bundle`, a
    :class:`~infiniteid.bundle.BundleError` otherwise), checked for all tensors
    before any data file is looked at, so onnxruntime never opens a file outside.
    """
    info = scan_onnx(path)
    if root is not None:
        for t in info.external:
            inside_bundle(root, t.location, f"the external-data location of tensor {t.tensor!r}",
                          base=Path(path).parent, where=path)
    sizes: Dict[str, int] = {}
    for t in info.external:
        data = Path(path).parent / t.location
        if t.location not in sizes:
            if not data.is_file():
                raise OnnxFileError(f"stores tensor {t.tensor!r} in {data}, which is missing")
            sizes[t.location] = data.stat().st_size
        need = t.offset + (t.length or 0)
        if need > sizes[t.location]:
            raise OnnxFileError(
                f"needs {need} bytes of {data} for tensor {t.tensor!r}, but that file has "
                f"{sizes[t.location]} bytes: it is truncated"
            )
    return info
