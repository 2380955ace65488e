"""Hash verification is one call that reports its cost (for a server at start-up); generate keeps it opt-in."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from test_bundle_containment import make_bundle
from trt_testutil import sdxl_manifest

from infiniteid.bundle import BundleError, HashReport, file_digest
from infiniteid.runtime.loader import Bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("hashes") / "bundle")


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "bundle")
    return tmp_path / "bundle"


def _recorded(bundle: Path):
    """The files the manifest records a hash for: five graphs and the VAE decoder's external weights."""
    files = sorted((bundle / "onnx").iterdir())
    graphs = ("text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder")
    assert [f.name for f in files] == sorted([f"{c}.onnx" for c in graphs] + ["vae_decoder.onnx.data"])
    return files


def test_verification_reports_what_it_read(pristine):
    files = _recorded(pristine)
    assert Bundle.load(pristine).hashes is None  # not asked: nothing hashed
    b = Bundle.load(pristine, verify_hashes=True)
    assert (b.hashes.files, b.hashes.bytes) == (6, sum(f.stat().st_size for f in files))
    assert b.hashes.seconds > 0
    again = b.verify_hashes()
    assert (again.files, again.bytes) == (b.hashes.files, b.hashes.bytes)
    text = str(again)
    assert text.startswith(f"verified the sha256 of 6 files ({again.bytes / 1e9:.2f} GB) in ") and "GB/s" in text


def test_a_changed_file_is_named(copy):
    data = copy / "onnx" / "vae_decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1  # same size: only the hash can tell
    data.write_bytes(bytes(raw))
    b = Bundle.load(copy)  # sizes and structure are fine
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx\.data: sha256 differs from the manifest"):
        b.verify_hashes()
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx\.data: sha256 differs from the manifest"):
        Bundle.load(copy, verify_hashes=True)


def test_engine_plans_are_verified_against_their_sidecars(copy):
    from infiniteid.trt.engine_check import Target
    from infiniteid.trt.names import DeviceInfo, plan_path
    from infiniteid.trt.plan import BuildOptions, BuiltPlan, run_build

    target = Target(DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)), "11.4.0.106")
    folder = run_build(copy, sdxl_manifest(), BuildOptions(components=["unet", "vae_decoder"], step_graphs=False),
                       target, lambda job, f: BuiltPlan(data=f"plan of {job.name}".encode() * 100),
                       progress=False).folder
    b = Bundle.load(copy)
    plain = b.verify_hashes()
    with_plans = b.verify_hashes(engine_folder=folder)
    assert with_plans.files == plain.files + 2
    assert with_plans.bytes == plain.bytes + 100 * (len(b"plan of unet") + len(b"plan of vae_decoder"))
    # a sidecar cannot point the verification at another file
    side = folder / "unet.json"
    side.write_text(side.read_text().replace('"component": "unet"', '"component": "../../../outside"'))
    assert b.verify_hashes(engine_folder=folder).files == plain.files + 1
    side.write_text(side.read_text().replace('"component": "../../../outside"', '"component": "unet"'))
    plan_path(folder, "unet").write_bytes(b"plan of unex" * 100)  # same size, other bytes
    with pytest.raises(BundleError, match=r"unet\.plan: sha256 differs from the engine sidecar"):
        b.verify_hashes(engine_folder=folder)


def test_progress_callback_sees_every_byte(pristine):
    from infiniteid.bundle import verify_file_hashes

    seen = []
    report = verify_file_hashes(pristine, Bundle.load(pristine).manifest, on_bytes=seen.append)
    assert sum(seen) == report.bytes
    f = pristine / "onnx" / "unet.onnx"
    assert file_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert HashReport(2, 10, 1.0).add(HashReport(1, 5, 0.5)) == HashReport(3, 15, 1.5)
