"""Engine folders, sidecars, atomic writes and the refusal of mismatched engines (no TensorRT needed)."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from trt_testutil import fake_digest, sdxl_manifest

from infiniteid.runtime.backend import BackendError
from infiniteid.trt.engine_check import (
    EngineMismatch,
    Target,
    build_command,
    check_sidecar,
    find_engine_folder,
    load_sidecars,
    version_ok,
)
from infiniteid.trt.names import (
    DeviceInfo,
    EngineError,
    EngineSidecar,
    engine_folder,
    engine_folder_name,
    plan_path,
    read_sidecar,
    sidecar_path,
    slug,
    write_atomic,
    write_sidecar,
)

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0))
L4 = DeviceInfo("NVIDIA L4", (8, 9))
FLAGS = {"precision": "fp16", "shapes": "static", "height": 1024, "width": 1024, "images": 1, "cfg": True,
         "opt_level": 3, "workspace_gb": None, "version_compatible": False}


def test_engine_folder_names():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("  NVIDIA GeForce RTX 4090 / D ") == "nvidia-geforce-rtx-4090-d"
    assert engine_folder_name(H100, "11.4.0.106") == "nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106"
    assert engine_folder_name(DeviceInfo("NVIDIA RTX PRO 6000", (12, 0)), "10.16.1.11") == \
        "nvidia-rtx-pro-6000-sm120-trt10.16.1.11"
    assert engine_folder(Path("/b"), L4, "10.16.1.11") == Path("/b/engines/nvidia-l4-sm89-trt10.16.1.11")
    with pytest.raises(EngineError, match="not a TensorRT version"):
        engine_folder_name(H100, "../../x")


def make_sidecar(component="unet", **kw) -> EngineSidecar:
    d = dict(component=component, plan=f"{component}.plan", plan_bytes=10, tensorrt_version="11.4.0.106",
             device=H100.name, compute_capability="9.0", onnx_file=f"onnx/{component}.onnx",
             onnx_sha256=fake_digest(component, "fp16"), precision="fp16",
             profiles=[{"sample": {"min": [4, 4, 128, 128], "opt": [4, 4, 128, 128], "max": [4, 4, 128, 128]}}],
             build=dict(FLAGS), build_seconds=12.5)
    d.update(kw)
    return EngineSidecar(**d)


def test_sidecar_round_trip_and_contents(tmp_path):
    sc = make_sidecar()
    path = write_sidecar(tmp_path, sc)
    assert path == sidecar_path(tmp_path, "unet") == tmp_path / "unet.json"
    d = json.loads(path.read_text())
    for key in ("tensorrt_version", "device", "compute_capability", "profiles", "onnx_sha256", "build",
                "build_seconds", "created"):
        assert key in d
    assert d["format"] == "infiniteid-engine" and d["format_version"] == 1
    back = read_sidecar(path)
    assert back == sc and back.static() and not back.version_compatible


def test_bad_sidecars_are_clear_errors(tmp_path):
    with pytest.raises(EngineError, match="engine sidecar missing"):
        read_sidecar(tmp_path / "x.json")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_sidecar(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(EngineError, match="not an engine sidecar"):
        read_sidecar(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"format": "infiniteid-engine", "format_version": 9}))
    with pytest.raises(EngineError, match="sidecar format version 9 is not understood"):
        read_sidecar(tmp_path / "c.json")


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "unet.plan"
    write_atomic(target, b"old plan")

    def half_then_fail(f):
        f.write(b"new pl")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old plan"
    assert os.listdir(tmp_path) == ["unet.plan"]  # no temporary left behind
    write_atomic(target, memoryview(b"new plan"))
    assert target.read_bytes() == b"new plan"


def test_build_command_reproduces_the_flags():
    assert build_command("/data/my bundle", FLAGS) == \
        "infiniteid build '/data/my bundle' --precision fp16 --shapes static --height 1024 --width 1024 --images 1 --opt-level 3"
    dyn = {**FLAGS, "shapes": "dynamic", "precision": None, "workspace_gb": 8.0, "version_compatible": True,
           "timing_cache": "/c/t.cache"}
    assert build_command("b", dyn) == \
        "infiniteid build b --shapes dynamic --opt-level 3 --workspace 8 --timing-cache /c/t.cache --version-compatible"
    assert build_command("b") == "infiniteid build b --shapes static"
    # A sidecar is a file: whatever text it holds is printed quoted, never as shell syntax.
    evil = {"precision": "fp16; rm -rf ~", "shapes": "static", "height": "1024 && x", "workspace_gb": "8 | y"}
    line = build_command("b", evil)
    assert line == "infiniteid build b --precision 'fp16; rm -rf ~' --shapes static --height '1024 && x' --workspace '8 | y'"
    assert shlex.split(line)[4] == "fp16; rm -rf ~"


def test_version_rules():
    assert version_ok("11.4.0.106", "11.4.0.106", False)
    assert not version_ok("11.4.0.106", "11.5.0.1", False)
    assert version_ok("11.4.0.106", "11.5.0.1", True)  # version-compatible: newer runtime, same major
    assert not version_ok("11.5.0.1", "11.4.0.106", True)  # never an older runtime
    # TensorRT documents version-compatible plans loading on later majors too: deserialisation decides
    assert version_ok("10.16.1.11", "11.4.0.106", True)
    assert not version_ok("10.16.1.11", "11.4.0.106", False)  # a plain plan: only the exact version
    assert not version_ok("11.4.0.106", "10.16.1.11", True)  # an older major never
    assert version_ok("11.4.0.106", "11.4.0.107", True) and not version_ok("11.4.0.107", "11.4.0.106", True)


@pytest.fixture()
def built(tmp_path):
    """A bundle folder with engines for the H100 under TensorRT 11.4 (plans are placeholders)."""
    manifest = sdxl_manifest()
    folder = engine_folder(tmp_path, H100, "11.4.0.106")
    for c, spec in manifest.components.items():
        write_atomic(plan_path(folder, c), b"x" * 10)
        write_sidecar(folder, make_sidecar(c, onnx_sha256=spec.sha256, precision=spec.precision))
    return tmp_path, folder, manifest


def test_matching_engines_pass(built):
    bundle, folder, manifest = built
    target = Target(H100, "11.4.0.106")
    assert find_engine_folder(bundle, target) == folder
    sidecars, notes = load_sidecars(bundle, folder, manifest, list(manifest.components), target)
    assert sorted(sidecars) == sorted(manifest.components) and notes == []


def test_other_tensorrt_version_is_refused_with_the_rebuild_command(built):
    bundle, folder, manifest = built
    with pytest.raises(EngineMismatch) as e:
        load_sidecars(bundle, folder, manifest, ["unet"], Target(H100, "11.5.0.1"))
    msg = str(e.value)
    assert "built with TensorRT 11.4.0.106, this machine runs TensorRT 11.5.0.1" in msg
    assert f"Rebuild with: infiniteid build {bundle} --precision fp16 --shapes static --height 1024" in msg
    assert isinstance(e.value, BackendError)  # printed by the CLI as one line


def test_other_gpu_is_refused(built):
    bundle, folder, manifest = built
    with pytest.raises(EngineMismatch, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\), "
                                             r"this GPU is NVIDIA L4 \(8.9\)"):
        load_sidecars(bundle, folder, manifest, ["vae_decoder"], Target(L4, "11.4.0.106"))
    # the same architecture under another name runs, with a note
    h100_pcie = DeviceInfo("NVIDIA H100 PCIe", (9, 0))
    _, notes = load_sidecars(bundle, folder, manifest, ["unet"], Target(h100_pcie, "11.4.0.106"))
    assert len(notes) == 1 and "tactics were tuned for the other GPU" in notes[0]


def test_missing_engine_folder_lists_what_exists(built):
    bundle, folder, manifest = built
    with pytest.raises(EngineMismatch) as e:
        find_engine_folder(bundle, Target(L4, "11.4.0.106"))
    msg = str(e.value)
    assert "no TensorRT engines for this machine (NVIDIA L4, sm 8.9, TensorRT 11.4.0.106" in msg
    assert "nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106 (TensorRT 11.4.0.106, NVIDIA H100 80GB HBM3, sm 9.0)" in msg
    assert f"Build them here with: infiniteid build {bundle}" in msg


def test_reexported_onnx_is_refused(built):
    bundle, folder, manifest = built
    manifest.components["unet"].sha256 = fake_digest("unet", "re-exported")
    with pytest.raises(EngineMismatch, match="built from another ONNX file .* the bundle was re-exported"):
        load_sidecars(bundle, folder, manifest, ["unet"], Target(H100, "11.4.0.106"))


def test_damaged_or_missing_plan_is_refused(built):
    bundle, folder, manifest = built
    plan_path(folder, "unet").write_bytes(b"xx")
    with pytest.raises(EngineMismatch, match="has 2 bytes, the build wrote 10"):
        load_sidecars(bundle, folder, manifest, ["unet"], Target(H100, "11.4.0.106"))
    plan_path(folder, "unet").unlink()
    with pytest.raises(EngineMismatch, match="engine file missing"):
        load_sidecars(bundle, folder, manifest, ["unet"], Target(H100, "11.4.0.106"))
    sidecar_path(folder, "vae_decoder").unlink()
    with pytest.raises(EngineMismatch, match="engine sidecar missing. Build the engines with: infiniteid build"):
        load_sidecars(bundle, folder, manifest, ["vae_decoder"], Target(H100, "11.4.0.106"))


def test_sidecar_of_another_component_is_refused(built):
    bundle, folder, manifest = built
    sc = make_sidecar("vae_decoder")
    with pytest.raises(EngineMismatch, match="describes component 'vae_decoder', not 'unet'"):
        check_sidecar(sc, "unet", sc.onnx_sha256, Target(H100, "11.4.0.106"), bundle, folder)


def test_version_compatible_engines_are_found_for_a_newer_runtime(tmp_path):
    manifest = sdxl_manifest()
    folder = engine_folder(tmp_path, H100, "11.4.0.106")
    vc = {**FLAGS, "version_compatible": True}
    for c, spec in manifest.components.items():
        write_atomic(plan_path(folder, c), b"x" * 10)
        write_sidecar(folder, make_sidecar(c, onnx_sha256=spec.sha256, build=vc))
    newer = Target(H100, "11.6.0.1")
    assert find_engine_folder(tmp_path, newer) == folder
    sidecars, _ = load_sidecars(tmp_path, folder, manifest, ["unet"], newer)
    assert sidecars["unet"].version_compatible
    with pytest.raises(EngineMismatch):
        find_engine_folder(tmp_path, Target(H100, "11.3.0.1"))


def test_version_compatible_engines_from_an_older_major_are_offered_to_a_newer_one(tmp_path):
    """A 10.x version-compatible plan is handed to an 11.x runtime (it decides); a plain one is refused."""
    manifest = sdxl_manifest()
    folder = engine_folder(tmp_path, H100, "10.16.1.11")
    for c, spec in manifest.components.items():
        write_atomic(plan_path(folder, c), b"x" * 10)
        write_sidecar(folder, make_sidecar(c, onnx_sha256=spec.sha256, tensorrt_version="10.16.1.11",
                                           build={**FLAGS, "version_compatible": True}))
    eleven = Target(H100, "11.4.0.106")
    assert find_engine_folder(tmp_path, eleven) == folder
    sidecars, _ = load_sidecars(tmp_path, folder, manifest, ["unet"], eleven)
    assert sidecars["unet"].tensorrt_version == "10.16.1.11"
    plain = make_sidecar("unet", onnx_sha256=manifest.components["unet"].sha256, tensorrt_version="10.16.1.11")
    with pytest.raises(EngineMismatch, match="built with TensorRT 10.16.1.11, this machine runs TensorRT 11.4.0.106"):
        check_sidecar(plain, "unet", plain.onnx_sha256, eleven, tmp_path, folder)


def test_changed_external_weights_are_refused_even_with_the_same_onnx_file(built):
    """Large graphs keep weights in <component>.onnx.data: new weights, same .onnx bytes, must still rebuild."""
    from infiniteid.trt.engine_check import component_digest

    bundle, folder, manifest = built
    spec = manifest.components["unet"]
    assert component_digest(spec) == spec.sha256  # no external weights: the file's hash
    spec.external_sha256 = fake_digest("unet", "weights", "v1")
    with_v1 = component_digest(spec)
    assert with_v1 != spec.sha256
    with pytest.raises(EngineMismatch, match="built from another ONNX file"):
        load_sidecars(bundle, folder, manifest, ["unet"], Target(H100, "11.4.0.106"))
    spec.external_sha256 = fake_digest("unet", "weights", "v2")
    assert component_digest(spec) != with_v1
