"""``infiniteid export``'s cheap checks come before its expensive work: arguments and the
output folder before PyTorch is imported, one export per output folder (a lock), missing
parent folders created, SIGTERM handled like Ctrl-C, staging folders of killed exports
removed by the next export of the same output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from infiniteid.cli import main
from infiniteid.export.output_folder import lock_path, output_lock, remove_stale_staging

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli_without_torch(argv):
    """Run the CLI in a fresh interpreter; return (status, stderr, whether torch got imported)."""
    code = ("import sys; from infiniteid.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    return p.returncode, p.stderr.strip(), p.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "max batch must be a positive integer, got 0"),
        (["--opset", "13"], "opset must be an integer in [17, 20], got 13"),
        (["--precision", "fp16", "--min-resolution", "512", "--max-resolution", "256"],
         "min resolution 512 is larger than max resolution 256"),
        (["--base", "nowhere"], "--tiny exports the tiny model; drop --base"),
        (["--height", "100"], "height=100 is not a multiple of 16 (the VAE and U-Net downsampling need it); try 96 or 112"),
    ],
)
def test_bad_arguments_refused_before_torch_is_imported(tmp_path, flags, message):
    rc, err, torch_imported = run_cli_without_torch(["export", "--tiny", "--out", str(tmp_path / "x" / "tiny"), *flags])
    assert rc == 1 and err == f"infiniteid export: error: {message}", err
    assert torch_imported == "False"
    assert os.listdir(tmp_path) == []  # not even the parent folder


def test_tiny_geometry_is_the_tiny_models():
    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.model.tiny_geometry import RESOLUTION

    pipe = InfiniteIDPipeline.tiny(0)
    assert RESOLUTION == (pipe.resolution_multiple, pipe.default_height) == (16, 128)


def test_output_under_a_file_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "--tiny", "--out", str(tmp_path / "file" / "sub" / "tiny")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"infiniteid export: error: {tmp_path / 'file'}: is a file, so the output folder "
        f"{tmp_path / 'file' / 'sub' / 'tiny'} cannot be created under it")


def test_second_export_to_the_same_output_refused_at_once(tmp_path, capsys):
    out = tmp_path / "tiny"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from infiniteid.export.output_folder import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        assert main(["export", "--tiny", "--out", str(out), "--no-progress"]) == 1
        assert time.perf_counter() - t0 < 5  # refused before any model is built
        assert capsys.readouterr().err.strip() == (
            f"infiniteid export: error: {out}: another export to this folder is running (process {holder.pid}); "
            "wait for it to finish or choose another output folder")
        assert os.listdir(tmp_path) == [lock_path(out).name]
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and os.listdir(tmp_path) == []  # the lock file goes with its holder
    with output_lock(out), output_lock(out):  # re-entrant in one process
        assert lock_path(out).is_file()
    assert not lock_path(out).exists()


def test_stale_staging_of_this_output_only(tmp_path):
    for name in (".tiny.partial-deadbeef", ".tiny.replaced-cafe", ".tinyx.partial-1", ".other.partial-2", "tiny.partial-3"):
        (tmp_path / name / "onnx").mkdir(parents=True)
    removed = remove_stale_staging(tmp_path / "tiny")
    assert sorted(p.name for p in removed) == [".tiny.partial-deadbeef", ".tiny.replaced-cafe"]
    assert sorted(os.listdir(tmp_path)) == [".other.partial-2", ".tinyx.partial-1", "tiny.partial-3"]


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "new" / "folders" / "tiny"  # parents do not exist yet: created
    proc = subprocess.Popen([sys.executable, "-m", "infiniteid", "export", "--tiny", "--out", str(out), "--no-slim",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.parent.glob(".tiny.partial-*/onnx")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "interrupted", err
    assert os.listdir(out.parent) == []  # no staging folder, no lock file, no bundle


def test_next_export_removes_what_a_killed_one_left(tmp_path):
    """A ``kill -9`` leaves its staging folder (no manifest); the next export of that output removes
    it as soon as it holds the output's lock (the lock every export takes first: the command, as
    the test above shows, and ``export_bundle``)."""
    out = tmp_path / "tiny"
    stale = tmp_path / ".tiny.partial-deadbeef" / "onnx"
    stale.mkdir(parents=True)
    (stale / "unet.onnx").write_bytes(b"half")
    (tmp_path / ".other.partial-1").mkdir()
    with output_lock(out):
        assert sorted(os.listdir(tmp_path)) == [".other.partial-1", ".tiny.lock"]
    assert os.listdir(tmp_path) == [".other.partial-1"]
