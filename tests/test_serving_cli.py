"""``infiniteid serve`` and ``infiniteid bench`` as users run them (subprocesses, 127.0.0.1 only),
and the serving package's promise to load no torch."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from infiniteid.commands.demo import demo_face

from serving_util import call, decode_png, multipart, png_bytes

HEAVY = ("torch", "diffusers", "transformers")


def test_importing_the_server_loads_no_torch():
    code = f"""
import json, sys
import infiniteid.serving, infiniteid.serving.app, infiniteid.serving.engine, infiniteid.serving.batcher
import infiniteid.serving.loadgen, infiniteid.serving.server, infiniteid.serving.ray_app
import infiniteid.commands.serve, infiniteid.commands.bench
from infiniteid.serving.app import create_app
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_serve_command_serves_and_drains_on_sigterm(bundle_dir, face_models):
    """The command in its own interpreter: it says its URL, verifies hashes (and logs the cost),
    answers a multipart upload with a PNG, never imports torch, and exits 0 on SIGTERM."""
    code = (
        "import sys, runpy, atexit, json\n"
        f"atexit.register(lambda: print('HEAVY', json.dumps([m for m in {HEAVY!r} if m in sys.modules]), flush=True))\n"
        "sys.argv = ['infiniteid'] + sys.argv[1:]\n"
        "from infiniteid.cli import main\n"
        "raise SystemExit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(bundle_dir), "--port", "0", "--face-models", str(face_models),
         "--threads", "1", "--default-steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        deadline = time.monotonic() + 120
        while call(url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        body, ctype = multipart({"prompt": "a person", "height": 64, "width": 64}, [("face", "me.png", png_bytes(demo_face(128)))])
        status, headers, png = call(url + "/v1/generate", body, ctype, accept="image/png")
        assert status == 200 and headers["content-type"] == "image/png"
        assert decode_png(png).shape == (64, 64, 3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = line + out
    assert proc.returncode == 0, log
    assert re.search(r"verified the sha256 of \d+ files \(\d+\.\d+ GB\) in \d+\.\d+ s", log), log
    assert "warm-up generation done" in log and "stopped" in log
    assert "HEAVY []" in log, log


def test_serve_command_user_errors_are_one_line(tmp_path, bundle_dir):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "infiniteid.cli", "serve", *argv], capture_output=True,
                              text=True, timeout=120)

    out = run(str(tmp_path / "nope"))
    assert out.returncode == 1 and "bundle folder not found" in out.stderr and "Traceback" not in out.stderr
    out = run(str(bundle_dir), "--queue", "0")
    assert out.returncode == 1 and "--queue" in out.stderr and "Traceback" not in out.stderr
    out = run(str(bundle_dir), "--replicas", "2")
    assert out.returncode == 1 and "need --ray" in out.stderr


def test_bench_offline_and_against_a_local_server(bundle_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", INFINITEID_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "infiniteid.cli", "bench", str(bundle_dir), "--local-server", "--steps", "1",
         "--height", "64", "--width", "64", "--batch-sizes", "1,2", "--runs", "2", "--concurrency", "1,2",
         "--requests", "4", "--duration", "30", "--threads", "1", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "| batch |" in out.stdout and "| concurrency |" in out.stdout
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["machine"]["cpu"] and record["versions"]["onnxruntime-gpu"]
    offline, online = record["results"]
    assert [r["batch"] for r in offline["rows"]] == [1, 2] and offline["shape"]["height"] == 64
    for row in offline["rows"]:
        p = row["stages"]["total"]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / p["p50"])
    assert [lv["concurrency"] for lv in online["levels"]] == [1, 2]
    for lv in online["levels"]:
        assert lv["sent"] == 4 and lv["ok"] == 4 and lv["errors"] == 0
    assert "overhead" in online["server_overhead_at_batch_1"]


def test_serve_config_file_builder_sets_one_gpu_per_replica(bundle_dir):
    """What a Serve config file's ``import_path: infiniteid.serving.ray_app:build_app`` builds
    (no cluster needed to bind an application)."""
    pytest.importorskip("ray", reason="Ray Serve is not installed")
    from infiniteid.serving import ray_app

    d = ray_app.build_app({"bundle": str(bundle_dir), "replicas": 3, "num_gpus": 1, "queue": 10})._bound_deployment
    assert (d.name, d.num_replicas, d.ray_actor_options) == (ray_app.DEPLOYMENT, 3, {"num_gpus": 1.0, "num_cpus": 1.0})
    auto = ray_app.build_app({"bundle": str(bundle_dir), "autoscaling": {"min_replicas": 1, "max_replicas": 4}})
    cfg = auto._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas) == (1, 4)
    with pytest.raises(Exception, match="queue"):
        ray_app.build_app({"bundle": str(bundle_dir), "queue": 0})
