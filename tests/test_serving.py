"""``infiniteid.serving`` on a real uvicorn server on 127.0.0.1 (ephemeral port) with the tiny bundle.

The server runs in this process (a background thread) so a test can hold the runtime
it serves: results are compared with the runtime's own output, and one test injects a
backend fault into the batches of one request. Traffic goes to 127.0.0.1 only, bounded
in count and time.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from infiniteid import generation as gen
from infiniteid.commands.demo import demo_face
from infiniteid.runtime import Runtime
from infiniteid.runtime.backend import BackendError
from infiniteid.serving.app import create_app
from infiniteid.serving.config import ServerConfig
from infiniteid.serving.server import BackgroundServer

from serving_util import call, decode_png, labelled, metric, multipart, png_bytes, post_json, total

POISON_ID_SCALE = 7.25  # a request with this ID scale makes its batch's U-Net call fail
SLOW_ID_SCALE = 3.75  # ... and this one makes each of its batch's U-Net calls take at least SLOW_STEP_S longer
SLOW_STEP_S = 0.25


class FaultyBackend:
    """The real onnxruntime backend, failing the U-Net call of any batch that holds a poisoned request
    and slowing down a batch that holds a slow one (so timeouts do not depend on this machine's speed)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.providers = inner.providers

    def run(self, component, feeds):
        if component == "unet" and np.any(np.isclose(feeds["id_scale"], POISON_ID_SCALE)):
            raise BackendError("injected fault")
        if component == "unet" and np.any(np.isclose(feeds["id_scale"], SLOW_ID_SCALE)):
            time.sleep(SLOW_STEP_S)
        return self.inner.run(component, feeds)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def runtime(bundle_dir, face_models):
    from infiniteid.runtime.ort_backend import OrtBackend
    from infiniteid.runtime.loader import Bundle

    bundle = Bundle.load(bundle_dir)
    rt = Runtime(bundle, backend=FaultyBackend(OrtBackend(bundle, intra_op_threads=1)), face_models=face_models)
    yield rt
    rt.close()


def wait_ready(url: str, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, _, body = call(url + "/readyz")
        if status == 200:
            return json.loads(body)
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


def config(bundle_dir, face_models, **kw) -> ServerConfig:
    base = dict(bundle=bundle_dir, face_models=face_models, threads=1, default_steps=2, queue=8, timeout=60.0,
                batch_window_ms=150.0)
    return ServerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def server(runtime, bundle_dir, face_models):
    app = create_app(config(bundle_dir, face_models), runtime=runtime)
    with BackgroundServer(app) as s:
        wait_ready(s.url)
        yield s


FACE = png_bytes(demo_face(128))
FACE_B64 = base64.b64encode(FACE).decode()


def job(seed: int, **kw):
    return {"prompt": f"a photo of a person, take {seed}", "faces": [FACE_B64], "seed": seed,
            "height": 64, "width": 64, "steps": 2, **kw}


def test_health_ready_page_and_docs(server):
    assert call(server.url + "/healthz")[0] == 200
    ready = wait_ready(server.url)
    assert ready["max_batch"] == 4 and ready["backend"] == "ort"
    assert ready["startup"]["warmup_s"] > 0  # the runtime was given ready-made: no load to time
    status, headers, body = call(server.url + "/", accept="text/html")
    assert status == 200 and b'id="face"' in body and b"/v1/generate" in body
    status, _, body = call(server.url + "/openapi.json")
    spec = json.loads(body)
    content = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)


def test_batched_results_equal_the_runtime(server, bundle_dir, face_models):
    """Concurrent compatible requests share a batch; each image equals the runtime's own output
    for that request alone (same seed, so same noise) within 1/255."""
    n = 4
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda s: post_json(server.url, job(s, guidance=3.0 + s)), range(10, 10 + n)))
    assert [r[0] for r in replies] == [200] * n, [r[2][:200] for r in replies]
    bodies = [json.loads(r[2]) for r in replies]
    assert max(b["batch"]["size"] for b in bodies) > 1, "no two requests shared a batch"
    images = [decode_png(base64.b64decode(b["image"])) for b in bodies]

    face = decode_png(FACE)
    with Runtime(bundle_dir, face_models=face_models, intra_op_threads=1) as rt:
        for i, s in enumerate(range(10, 10 + n)):
            req = gen.GenerationRequest(f"a photo of a person, take {s}", faces=[face], seed=s, guidance=3.0 + s)
            want = rt.generate([req], gen.BatchSettings(height=64, width=64, steps=2), progress=False).arrays[0]
            diff = np.abs(images[i].astype(int) - want.astype(int))
            assert diff.max() <= 1, f"request {i}: max difference {diff.max()}/255"
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 8  # different seeds, different images


def test_multipart_png_and_a_returning_face_hits_the_cache(server):
    face = png_bytes(demo_face(144))  # pixels no other test sends
    front = total(metric(server.url, "infiniteid_face_frontend_runs_total"))
    hits = total(metric(server.url, "infiniteid_cid_cache_hits_total"))
    body, ctype = multipart({"prompt": "a person", "seed": 3, "height": 64, "width": 64, "steps": 2},
                            [("face", "me.png", face)])
    first = call(server.url + "/v1/generate", body, ctype, accept="image/png")
    assert first[0] == 200 and first[1]["content-type"] == "image/png"
    assert total(metric(server.url, "infiniteid_face_frontend_runs_total")) == front + 1
    again = call(server.url + "/v1/generate", body, ctype, accept="image/png")
    assert again[0] == 200
    assert total(metric(server.url, "infiniteid_face_frontend_runs_total")) == front + 1  # not run again
    assert total(metric(server.url, "infiniteid_cid_cache_hits_total")) == hits + 1
    assert np.array_equal(decode_png(first[2]), decode_png(again[2]))


def _huge_png() -> bytes:
    """A decompression bomb's calling card: a PNG whose header declares 40000x40000 pixels
    (1.6 Gpx) around a few bytes of data. The server must refuse it from the header."""
    import struct
    import zlib

    from PIL import Image

    small = png_bytes(Image.new("RGB", (1, 1)))
    ihdr = small.index(b"IHDR")
    body = b"IHDR" + struct.pack(">II", 40000, 40000) + small[ihdr + 12: ihdr + 17]
    return small[: ihdr - 4] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + small[ihdr + 21:]


@pytest.mark.parametrize("case, payload, status, field", [
    ("no face", {"prompt": "x", "height": 64, "width": 64}, 422, "faces"),
    ("empty faces", {"prompt": "x", "faces": [], "height": 64, "width": 64}, 422, "faces"),
    ("not an image", {"prompt": "x", "faces": [base64.b64encode(b"%PDF-1.4 hello").decode()]}, 422, "faces.0"),
    ("not base64", {"prompt": "x", "faces": ["@@@"]}, 422, "faces.0"),
    ("huge image", {"prompt": "x", "faces": ["HUGE"]}, 413, "faces.0"),
    ("long prompt", {"prompt": "x" * 10_000, "faces": [FACE_B64]}, 422, "prompt"),
    ("bad resolution", {"prompt": "x", "faces": [FACE_B64], "height": 65, "width": 64}, 422, "height"),
    ("too large", {"prompt": "x", "faces": [FACE_B64], "height": 1024, "width": 64}, 422, "height"),
    ("alpha", {"prompt": "x", "faces": [FACE_B64, FACE_B64], "identity_mode": "interpolate", "alpha": 1.5}, 422, "alpha"),
    ("unknown field", {"prompt": "x", "faces": [FACE_B64], "cfg_rescale": 0.7}, 422, "cfg_rescale"),
    ("bad scheduler", {"prompt": "x", "faces": [FACE_B64], "scheduler": "lms"}, 422, "scheduler"),
    ("negative seed", {"prompt": "x", "faces": [FACE_B64], "seed": -1}, 422, "seed"),
    ("interpolate one face", {"prompt": "x", "faces": [FACE_B64], "identity_mode": "interpolate"}, 422, "face"),
    ("no face in it", {"prompt": "x", "faces": ["BLANK"], "height": 64, "width": 64}, 422, "face"),
])
def test_bad_requests_get_4xx_json_naming_the_problem(server, case, payload, status, field):
    from PIL import Image

    faces = payload.get("faces", [])
    payload = dict(payload, **({"faces": [
        base64.b64encode(_huge_png()).decode() if f == "HUGE" else
        base64.b64encode(png_bytes(Image.new("RGB", (128, 128), (90, 90, 90)))).decode() if f == "BLANK" else f
        for f in faces]} if faces else {}))
    got, _, body = post_json(server.url, payload)
    err = json.loads(body)
    assert got == status, (case, err)
    assert err.get("field") == field, (case, err)
    assert isinstance(err["error"], str) and err["error"]


def test_multipart_mistakes_and_limits(server):
    body, ctype = multipart({"prompt": "x"}, [])
    got = call(server.url + "/v1/generate", body, ctype)
    assert got[0] == 422 and json.loads(got[2])["field"] == "face"
    body, ctype = multipart({"prompt": "x", "colour": "blue"}, [("face", "f.png", FACE)])
    got = call(server.url + "/v1/generate", body, ctype)
    assert got[0] == 422 and json.loads(got[2]) == {"error": "unknown field 'colour'", "field": "colour"}
    body, ctype = multipart({"prompt": "x"}, [("face", "f.txt", b"not an image at all")])
    got = call(server.url + "/v1/generate", body, ctype)
    assert got[0] == 422 and json.loads(got[2])["field"] == "face"
    # a body declared past the 16 MiB upload limit is refused before it is read
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (17 << 20))
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413") and '"limit' not in reply and "the limit is 16777216" in reply
    got = call(server.url + "/v1/generate", b"prompt=x", "application/x-www-form-urlencoded")
    assert got[0] == 415
    got = post_json(server.url, job(1))  # and the server keeps serving
    assert got[0] == 200


def test_a_backend_failure_fails_only_its_batch(server):
    """A poisoned request and a normal one with other batch settings arrive together: the poisoned
    batch gets 500, the other batch 200, and the server keeps serving."""
    errors = (labelled(metric(server.url, "infiniteid_batches_total"), outcome="error") or [0])[0]
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post_json, server.url, job(5, id_scale=POISON_ID_SCALE))
        good = pool.submit(post_json, server.url, job(6, steps=3))
        bad, good = bad.result(), good.result()
    assert bad[0] == 500 and "injected fault" in json.loads(bad[2])["error"]
    assert good[0] == 200
    after = labelled(metric(server.url, "infiniteid_batches_total"), outcome="error")
    assert after and after[0] == errors + 1
    assert post_json(server.url, job(7))[0] == 200


def test_200_concurrent_requests_are_all_answered_and_the_metrics_add_up(server):
    before = metric(server.url, "infiniteid_requests_total")
    batches_before = metric(server.url, "infiniteid_batch_size_bucket")
    n = 200
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        return post_json(server.url, job(i % 7), timeout=120)

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(one, range(n)))
    elapsed = time.monotonic() - t0
    statuses = [r[0] for r in replies]
    assert set(statuses) <= {200, 429, 504}, sorted(set(statuses))
    assert statuses.count(200) >= 8 and statuses.count(429) >= 1
    for status, headers, _ in replies:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
    assert elapsed < 90
    after = metric(server.url, "infiniteid_requests_total")
    for code in (200, 429, 504):
        got = labelled(after, status=str(code))
        had = labelled(before, status=str(code))
        assert (got[0] if got else 0) - (had[0] if had else 0) == statuses.count(code), code
    assert total(after) - total(before) == n
    # micro-batching happened: some batch of this burst held more than one request
    hist = metric(server.url, "infiniteid_batch_size_bucket")
    le1 = labelled(hist, le="1.0")[0] - (labelled(batches_before, le="1.0") or [0])[0]
    count = labelled(hist, le="+Inf")[0] - (labelled(batches_before, le="+Inf") or [0])[0]
    assert count > le1, "every batch held a single request"
    assert metric(server.url, "infiniteid_queue_depth")[""] == 0


def test_a_request_past_its_timeout_gets_504_and_never_runs(runtime, bundle_dir, face_models):
    app = create_app(config(bundle_dir, face_models, timeout=1.0, batch_window_ms=0), runtime=runtime)
    with BackgroundServer(app) as s:
        wait_ready(s.url)
        assert post_json(s.url, job(1))[0] == 200  # the face is cached; quick requests fit the timeout
        ok_before = labelled(metric(s.url, "infiniteid_batches_total"), outcome="ok")[0]
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(post_json, s.url, job(2, steps=8, id_scale=SLOW_ID_SCALE))  # >= 2 s of U-Net calls
            time.sleep(0.3)  # the slow batch is running now
            quick = pool.submit(post_json, s.url, job(3))
            slow, quick = slow.result(), quick.result()
        assert slow[0] == 504 and quick[0] == 504
        assert "dropped" in json.loads(quick[2])["error"]
        deadline = time.monotonic() + 60
        while metric(s.url, "infiniteid_queue_depth")[""] != 0 or labelled(
                metric(s.url, "infiniteid_batches_total"), outcome="ok")[0] < ok_before + 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
        # only the slow batch ran (it had started); the queued request was dropped, not run
        assert labelled(metric(s.url, "infiniteid_batches_total"), outcome="ok")[0] == ok_before + 1
        assert post_json(s.url, job(4))[0] == 200


def test_shutdown_answers_the_requests_that_wait(runtime, bundle_dir, face_models):
    app = create_app(config(bundle_dir, face_models, batch_window_ms=0), runtime=runtime)
    s = BackgroundServer(app).start()
    wait_ready(s.url)
    assert post_json(s.url, job(1))[0] == 200
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post_json, s.url, job(i, steps=4, id_scale=SLOW_ID_SCALE)) for i in range(6)]
        deadline = time.monotonic() + 30
        while metric(s.url, "infiniteid_queue_depth")[""] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.stop()
        statuses = [f.result()[0] for f in futures]
    assert statuses == [200] * 6
    assert not s.thread.is_alive()
