"""Ray Serve: a local single-node Ray with two CPU replicas of the tiny bundle, reached through
Serve's HTTP proxy on 127.0.0.1; results equal the single server's."""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from infiniteid.commands.demo import demo_face
from infiniteid.serving.app import create_app
from infiniteid.serving.config import ServerConfig
from infiniteid.serving.server import BackgroundServer

from serving_util import call, decode_png, png_bytes, post_json

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'infiniteid-rt[serve]')")

FACE = png_bytes(demo_face(128))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float) -> None:
    t0 = time.monotonic()
    while call(url + "/readyz")[0] != 200:
        assert time.monotonic() - t0 < timeout, "not ready"
        time.sleep(0.2)


def _jobs():
    import base64

    face = base64.b64encode(FACE).decode()
    return [{"prompt": f"a person, take {s}", "faces": [face], "seed": s, "height": 64, "width": 64, "steps": 2}
            for s in range(6)]


def _images(url: str):
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda j: post_json(url, j), _jobs()))
    assert [r[0] for r in replies] == [200] * 6, [r[2][:200] for r in replies]
    return [decode_png(__import__("base64").b64decode(json.loads(r[2])["image"])) for r in replies]


@pytest.mark.heavy  # ~55 s on two CPU cores (Ray start-up, two replicas loading and warming up)
def test_two_cpu_replicas_behind_serves_proxy_match_the_single_server(bundle_dir, face_models):
    from ray import serve

    from infiniteid.serving import ray_app

    cfg = dict(bundle=bundle_dir, face_models=face_models, threads=1, default_steps=2, queue=16, timeout=120.0)
    with BackgroundServer(create_app(ServerConfig(**cfg))) as single:
        _wait_ready(single.url, 120)
        want = _images(single.url)

    port = _free_port()
    temp = tempfile.mkdtemp(prefix="iid-ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False, _temp_dir=temp)
    try:
        url = ray_app.run(ServerConfig(**cfg, host="127.0.0.1", port=port), replicas=2, num_gpus=0, num_cpus=0.5)
        assert url == f"http://127.0.0.1:{port}"
        _wait_ready(url, 180)
        status = serve.status().applications["infiniteid"].deployments[ray_app.DEPLOYMENT]
        assert dict(status.replica_states) == {"RUNNING": 2}
        got = _images(url)
        for a, b in zip(got, want):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    finally:
        ray_app.stop()
        shutil.rmtree(temp, ignore_errors=True)
