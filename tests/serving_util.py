"""What the serving tests share: a stdlib HTTP client (JSON and multipart) and metric parsing."""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def png_bytes(image) -> bytes:
    b = io.BytesIO()
    image.save(b, format="PNG")
    return b.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def multipart(fields: Dict[str, Any], files: Sequence[Tuple[str, str, bytes]]) -> Tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: text fields + (field, filename, bytes) files."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def call(url: str, body: Optional[bytes] = None, content_type: str = "application/json",
         accept: str = "application/json", timeout: float = 120.0) -> Tuple[int, Dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers={"Accept": accept} if body is None else
                                 {"Content-Type": content_type, "Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, payload: Dict[str, Any], **kw: Any) -> Tuple[int, Dict[str, str], bytes]:
    return call(url + "/v1/generate", json.dumps(payload).encode(), "application/json", **kw)


def metric_values(text: str, name: str) -> Dict[str, float]:
    """``{labels: value}`` of every sample named ``name`` in Prometheus text."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, value = line.rsplit(" ", 1)
        if key == name or key.startswith(name + "{"):
            out[key[len(name):]] = float(value)
    return out


def metric(url: str, name: str) -> Dict[str, float]:
    status, _, body = call(url + "/metrics", accept="text/plain")
    assert status == 200
    return metric_values(body.decode(), name)


def total(values: Dict[str, float]) -> float:
    return float(sum(values.values()))


def labelled(values: Dict[str, float], **labels: str) -> List[float]:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [v for k, v in values.items() if all(w in k for w in want)]
