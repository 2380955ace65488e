"""Engine code is opt-in: plans that carry host code load only when trusted or built on this machine.

TensorRT cannot run here; the decision (:mod:`infiniteid.trt.trust`) is plain
Python and is tested on real sidecars and plan files written by the real build
code (:func:`infiniteid.trt.plan.run_build`, with the one TensorRT call replaced
by a function returning bytes). The TensorRT side is one assignment per plan,
``runtime.engine_host_code_allowed = <decision>``, whose name the API-name test
checks against the TensorRT 10/11 bindings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from trt_testutil import sdxl_manifest

from infiniteid import provenance
from infiniteid.bundle import file_digest
from infiniteid.trt.engine_check import Target
from infiniteid.trt.names import DeviceInfo, EngineSidecar, plan_path, read_sidecar, sidecar_path
from infiniteid.trt.plan import BuildOptions, BuiltPlan, run_build
from infiniteid.trt.trust import EngineCodeRefused, allow_host_code, built_here, host_code

TARGET = Target(DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)), "11.4.0.106")


def fake_tensorrt(job, folder):
    return BuiltPlan(data=f"plan of {job.name}".encode())


def build(bundle: Path, **opts) -> Path:
    """Build with the real build code; returns the engine folder."""
    return run_build(bundle, sdxl_manifest(), BuildOptions(components=["unet"], step_graphs=False, **opts), TARGET,
                     fake_tensorrt, progress=False).folder


def never_hashed() -> str:
    raise AssertionError("the plan was hashed although the decision did not need it")


def decide(folder: Path, trust: bool = False, sidecar: EngineSidecar = None) -> bool:
    plan = plan_path(folder, "unet")
    sc = sidecar or read_sidecar(sidecar_path(folder, "unet"))
    return allow_host_code("unet", sc, lambda: file_digest(plan), trust, plan, rebuild="infiniteid build b/")


@pytest.fixture
def other_machine(tmp_path, monkeypatch):
    """Switch to another machine's key (the tests' own key is restored afterwards)."""
    def switch():
        monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "other-machine.key"))
    return switch


def test_build_records_the_plan_hash_and_this_machines_tag(tmp_path):
    folder = build(tmp_path, version_compatible=True)
    sc = read_sidecar(sidecar_path(folder, "unet"))
    assert sc.plan_sha256 == hashlib.sha256(b"plan of unet").hexdigest() == file_digest(plan_path(folder, "unet"))
    assert len(sc.built_here) == 64 and built_here(sc, sc.plan_sha256)
    assert provenance.key_path().stat().st_mode & 0o777 == 0o600


def test_plans_without_host_code_never_get_it(tmp_path):
    folder = build(tmp_path)
    sc = read_sidecar(sidecar_path(folder, "unet"))
    assert host_code(sc) == []
    assert allow_host_code("unet", sc, never_hashed, False, "x") is False
    assert allow_host_code("unet", sc, never_hashed, True, "x") is False  # the flag allows, it does not force


def test_a_version_compatible_plan_from_elsewhere_needs_the_flag(tmp_path, other_machine):
    folder = build(tmp_path, version_compatible=True)
    assert decide(folder) is True  # built here: allowed without asking
    other_machine()  # the same bundle on another machine
    with pytest.raises(EngineCodeRefused) as err:
        decide(folder)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{plan_path(folder, 'unet')}: the unet engine carries host code")
    assert "embedded TensorRT lean runtime library (a version-compatible plan)" in msg
    assert "Pass --trust-engine-code (trust_engine_code=True)" in msg and "only if you trust whoever built" in msg
    assert msg.endswith("or build the engines on this machine: infiniteid build b/")
    sc = read_sidecar(sidecar_path(folder, "unet"))
    assert allow_host_code("unet", sc, never_hashed, True, "x") is True  # the flag: allowed, nothing hashed


def test_serialised_plugin_libraries_need_the_flag_too(tmp_path, other_machine):
    folder = build(tmp_path)
    sc = read_sidecar(sidecar_path(folder, "unet"))
    sc.build["plugins_to_serialize"] = ["libmy_plugins.so"]
    assert host_code(sc) == ["serialised plugin libraries (libmy_plugins.so)"]
    other_machine()
    with pytest.raises(EngineCodeRefused, match=r"carries host code \(serialised plugin libraries"):
        decide(folder, sidecar=sc)
    assert decide(folder, trust=True, sidecar=sc) is True


def test_a_changed_plan_is_no_longer_built_here(tmp_path):
    folder = build(tmp_path, version_compatible=True)
    plan_path(folder, "unet").write_bytes(b"plan of something else")
    with pytest.raises(EngineCodeRefused, match="does not show it was built on this machine"):
        decide(folder)


@pytest.mark.parametrize("forgery", ["no tag", "random tag", "tag of another plan", "hash of another plan"])
def test_a_sidecar_cannot_claim_it_was_built_here(tmp_path, forgery):
    """Anyone can write a sidecar: only a tag made with this machine's key for this plan's hash counts."""
    folder = build(tmp_path, version_compatible=True)
    d = json.loads(sidecar_path(folder, "unet").read_text())
    other = hashlib.sha256(b"another plan").hexdigest()
    if forgery == "no tag":
        d["built_here"] = ""
    elif forgery == "random tag":
        d["built_here"] = hashlib.sha256(b"guess").hexdigest()
    elif forgery == "tag of another plan":  # a tag copied from a plan this machine did build
        d["built_here"] = provenance.tag("tensorrt-plan", other)
    else:  # the sidecar's hash no longer matches the file
        d["plan_sha256"] = other
        d["built_here"] = provenance.tag("tensorrt-plan", other)
    sidecar_path(folder, "unet").write_text(json.dumps(d))
    with pytest.raises(EngineCodeRefused):
        decide(folder)
    assert decide(folder, trust=True) is True


def test_sidecars_from_before_the_tag_still_load(tmp_path):
    """Sidecars written by earlier builds have no plan_sha256/built_here: read fine, treated as not built here."""
    folder = build(tmp_path, version_compatible=True)
    d = json.loads(sidecar_path(folder, "unet").read_text())
    del d["plan_sha256"], d["built_here"]
    sidecar_path(folder, "unet").write_text(json.dumps(d))
    sc = read_sidecar(sidecar_path(folder, "unet"))
    assert sc.plan_sha256 == "" and not built_here(sc, file_digest(plan_path(folder, "unet")))
    with pytest.raises(EngineCodeRefused):
        decide(folder)


def test_the_backend_sets_host_code_only_from_the_decision():
    """The TensorRT backend's one TensorRT-facing line takes the decision; nothing sets it True outright."""
    src = (Path(__file__).resolve().parents[1] / "infiniteid" / "runtime" / "trt_backend.py").read_text()
    assert "engine_host_code_allowed = True" not in src
    assert src.count("engine_host_code_allowed") == 1
    assert "runtime.engine_host_code_allowed = self.host_code_allowed[name]" in src


def test_no_key_means_nothing_was_built_here(tmp_path, monkeypatch):
    monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "none" / "machine.key"))
    assert provenance.made_here("tensorrt-plan", "x", "0" * 64) is False
    assert not (tmp_path / "none").exists()  # checking never creates a key
    t = provenance.tag("tensorrt-plan", "x")
    assert provenance.made_here("tensorrt-plan", "x", t) and not provenance.made_here("face-models", "x", t)


@pytest.mark.parametrize("args, message", [
    (["--bundle", "b", "--backend", "ort", "--trust-engine-code"],
     "--trust-engine-code applies to the trt backend only"),
    (["--base", "sdxl", "--image-encoder", "clip", "--adapter", "a.safetensors", "--face-models", "m",
      "--trust-engine-code"], "--trust-engine-code only apply with --bundle"),
])
def test_trust_flag_on_the_command_line(args, message, capsys, tmp_path):
    from infiniteid.cli import main

    face = tmp_path / "f.png"
    face.write_bytes(b"")  # never read: the flag is refused first
    assert main(["generate", *args, "--face", str(face), "--prompt", "p", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert "--trust-engine-code" in main_help("generate") and "--trust-engine-code" in main_help("check")


def main_help(command: str) -> str:
    from infiniteid.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
def test_backend_with_a_version_compatible_plan_from_elsewhere(tmp_path_factory, other_machine):
    """On a GPU with TensorRT: built here it loads; as another machine it is refused; with the flag it loads."""
    import shutil

    from trt_testutil import tiny_bundle

    from infiniteid.cli import main
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.trt_backend import TrtBackend

    bundle = tmp_path_factory.mktemp("vc") / "bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory, "fp32"), bundle)
    assert main(["build", str(bundle), "--version-compatible", "--components", "vae_decoder", "--no-step-graph",
                 "--no-progress"]) == 0
    with TrtBackend(Bundle.load(bundle), components=["vae_decoder"]) as be:
        assert be.host_code_allowed == {"vae_decoder": True}
    other_machine()
    with pytest.raises(EngineCodeRefused, match="carries host code"):
        TrtBackend(Bundle.load(bundle), components=["vae_decoder"])
    with TrtBackend(Bundle.load(bundle), components=["vae_decoder"], trust_engine_code=True) as be:
        assert be.host_code_allowed == {"vae_decoder": True}
