"""The page at ``/`` in a real headless Chromium (Debian's package), driven over the DevTools
protocol: choose a face file, generate, and the image appears."""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infiniteid.commands.demo import demo_face, tiny_bundle
from infiniteid.serving.app import create_app
from infiniteid.serving.config import ServerConfig
from infiniteid.serving.server import BackgroundServer

from serving_util import call, decode_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 << 20, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def close(self):
        self.ws.close()


def _devtools_page(profile: Path, proc: subprocess.Popen) -> str:
    t0 = time.monotonic()
    port_file = profile / "DevToolsActivePort"
    while not port_file.is_file() or not port_file.read_text().strip():
        assert proc.poll() is None, "chromium exited"
        assert time.monotonic() - t0 < 60, "chromium did not open its DevTools port"
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)


def test_the_page_uploads_a_face_and_shows_the_image(bundle_dir, tmp_path):
    from infiniteid.face import write_synthetic_face_models

    models = write_synthetic_face_models(tmp_path / "models", seed=0)
    face = tmp_path / "face.png"
    demo_face(128).save(face)
    cfg = ServerConfig(bundle=bundle_dir, face_models=models, threads=1, default_steps=2, timeout=120.0)
    with BackgroundServer(create_app(cfg)) as server:
        t0 = time.monotonic()
        while call(server.url + "/readyz")[0] != 200:
            assert time.monotonic() - t0 < 120
            time.sleep(0.1)
        profile = tmp_path / "chromium-profile"
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            cdp = DevTools(_devtools_page(profile, proc))
            cdp.send("Page.enable")
            cdp.send("Page.navigate", url=server.url + "/")
            t0 = time.monotonic()
            while cdp.eval("document.readyState + ':' + !!document.getElementById('face')") != "complete:true":
                assert time.monotonic() - t0 < 30, "the page did not load"
                time.sleep(0.1)
            root = cdp.send("DOM.getDocument")["root"]["nodeId"]
            node = cdp.send("DOM.querySelector", nodeId=root, selector="#face")["nodeId"]
            cdp.send("DOM.setFileInputFiles", nodeId=node, files=[str(face)])
            cdp.eval("for (const [k, v] of [['steps', 2], ['height', 64], ['width', 64], ['seed', 5]]) "
                     "document.getElementById(k).value = v; document.getElementById('go').click(); true")
            t0 = time.monotonic()
            while True:
                width, status = cdp.eval("[document.getElementById('result').naturalWidth, "
                                         "document.getElementById('status').textContent]")
                if width:
                    break
                assert not status.startswith("error"), status
                assert time.monotonic() - t0 < 60, f"no image after 60 s (status: {status!r})"
                time.sleep(0.1)
            assert width == 64 and status.startswith("done in")
            assert cdp.eval("getComputedStyle(document.getElementById('result')).display") == "block"
            shot = base64.b64decode(cdp.send("Page.captureScreenshot", format="png")["data"])
            assert decode_png(shot).shape[2] == 3
            (tmp_path / "page.png").write_bytes(shot)
            cdp.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
