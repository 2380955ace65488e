"""A bundle reads only files inside its own folder.

Every path a bundle names (component files, external weights, tokenizers, the
external-data locations inside its ONNX files, engine folders, plans and
sidecars) must resolve inside the bundle folder; ``..``, absolute paths and
symlinks pointing out are refused with one line naming the key, before the file
is opened. Each case uses a file outside that would otherwise load: the same
bundle pointing at an inside copy of it loads.

The bundle here is built in the test (small valid ONNX graphs behind an
SDXL-shaped manifest), so no export is needed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_testutil import sdxl_manifest

from infiniteid.bundle import BundleError, file_digest, inside_bundle, write_manifest
from infiniteid.contract import COMPONENTS
from infiniteid.runtime.loader import Bundle
from infiniteid.runtime.onnx_file import check_onnx_file

# -- every file opened by Python code, recorded by an audit hook --------------------------------
_OPENED: list = []
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


class OpenedFiles:
    """``with OpenedFiles() as seen:`` -> ``seen.under(folder)`` lists what was opened inside ``folder``."""

    def __enter__(self):
        _OPENED.clear()
        _RECORDING[0] = True
        return self

    def __exit__(self, *exc):
        _RECORDING[0] = False

    def under(self, folder: Path):
        root = os.path.realpath(folder)
        return [p for p in _OPENED if p == root or p.startswith(root + os.sep)]


# -- a small bundle -----------------------------------------------------------------------------
def _model(scale: float) -> onnx.ModelProto:
    w = (np.eye(8, dtype=np.float32) * scale)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_bundle(folder: Path) -> Path:
    """Five small graphs (the VAE decoder's weights in ``onnx/vae_decoder.onnx.data``), two tokenizers, a manifest."""
    (folder / "onnx").mkdir(parents=True)
    m = sdxl_manifest()
    for i, c in enumerate(COMPONENTS):
        path = folder / "onnx" / f"{c}.onnx"
        spec = m.components[c]
        if c == "vae_decoder":
            onnx.save_model(_model(i + 1.0), str(path), save_as_external_data=True,
                            location="vae_decoder.onnx.data", size_threshold=0)
            data = folder / "onnx" / "vae_decoder.onnx.data"
            spec.external_data = "onnx/vae_decoder.onnx.data"
            spec.external_size, spec.external_sha256 = data.stat().st_size, file_digest(data)
        else:
            onnx.save_model(_model(i + 1.0), str(path))
        spec.size, spec.sha256 = path.stat().st_size, file_digest(path)
    for rel in m.tokenizers:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps({"model": {"type": "BPE"}, "note": rel}))
    write_manifest(folder, m)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("pristine") / "bundle")


@pytest.fixture
def world(pristine, tmp_path):
    """(bundle, outside): a private copy of the bundle and a sibling folder outside it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine, bundle)
    outside = tmp_path / "outside"
    outside.mkdir()
    return bundle, outside


def _edit(bundle: Path, fn) -> None:
    d = json.loads((bundle / "manifest.json").read_text())
    fn(d)
    (bundle / "manifest.json").write_text(json.dumps(d))


# (manifest key, how to read it from the manifest dict, how to set it)
KEYS = {
    "components.unet.file": ("onnx/unet.onnx", lambda d, v: d["components"]["unet"].__setitem__("file", v)),
    "components.vae_decoder.external_data": (
        "onnx/vae_decoder.onnx.data",
        lambda d, v: d["components"]["vae_decoder"].__setitem__("external_data", v)),
    "tokenizers[1]": ("tokenizer_2/tokenizer.json", lambda d, v: d.__setitem__("tokenizers", [d["tokenizers"][0], v])),
}


def test_the_bundle_loads(pristine):
    b = Bundle.load(pristine, verify_hashes=True)
    assert b.onnx["vae_decoder"].external[0].location == "vae_decoder.onnx.data"
    assert b.onnx_path("unet") == (pristine / "onnx" / "unet.onnx").resolve()


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_path_leading_out_is_refused_and_not_opened(world, key, kind):
    bundle, outside = world
    rel, setter = KEYS[key]
    # A file that would load: the bundle's own file, moved outside.
    target = outside / Path(rel).name
    shutil.move(str(bundle / rel), target)
    if kind == "dotdot":
        _edit(bundle, lambda d: setter(d, f"{rel.split('/')[0]}/../../outside/{target.name}"))
    elif kind == "absolute":
        _edit(bundle, lambda d: setter(d, str(target)))
    else:  # the manifest is untouched; the file in the bundle is a symlink out
        os.symlink(target, bundle / rel)

    with OpenedFiles() as seen:
        with pytest.raises(BundleError) as err:
            Bundle.load(bundle)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "refused" in msg, msg
    assert ("absolute path" in msg) if kind == "absolute" else (f"resolves to {target.resolve()}" in msg)
    assert seen.under(outside) == [], "a file outside the bundle was opened"

    # Control: the same file back inside (under the name the manifest now uses, or instead of the link) loads.
    if kind == "symlink":
        (bundle / rel).unlink()
        shutil.copy(target, bundle / rel)
    else:
        shutil.copy(target, bundle / rel)
        _edit(bundle, lambda d: setter(d, rel))
    Bundle.load(bundle, verify_hashes=True)


def test_a_symlinked_folder_leading_out_is_refused(world):
    bundle, outside = world
    shutil.move(str(bundle / "tokenizer"), outside / "tokenizer")
    os.symlink(outside / "tokenizer", bundle / "tokenizer")
    with pytest.raises(BundleError, match=r"tokenizers\[0\] = 'tokenizer/tokenizer.json' resolves to .*outside"):
        Bundle.load(bundle)


def test_symlinks_inside_the_bundle_are_fine(world):
    bundle, _ = world
    shutil.move(str(bundle / "onnx" / "unet.onnx"), bundle / "onnx" / "unet-v2.onnx")
    os.symlink("unet-v2.onnx", bundle / "onnx" / "unet.onnx")
    assert Bundle.load(bundle).onnx_path("unet").name == "unet-v2.onnx"


@pytest.mark.parametrize("bad", ["", 3, None, "nul\0byte"])
def test_a_path_that_is_no_path_is_refused(pristine, bad):
    with pytest.raises(BundleError, match=r"components\.unet\.file must be a path relative to the bundle folder"):
        inside_bundle(pristine, bad, "components.unet.file")


# -- the locations written inside ONNX files ------------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_onnx_external_data_leading_out_is_refused_before_onnxruntime(world, kind):
    """The manifest is clean; the VAE decoder's graph itself names weights outside the bundle."""
    bundle, outside = world
    onnx_path = bundle / "onnx" / "vae_decoder.onnx"
    data = outside / "vae_decoder.onnx.data"
    shutil.move(str(bundle / "onnx" / "vae_decoder.onnx.data"), data)
    if kind == "symlink":
        os.symlink(data, bundle / "onnx" / "vae_decoder.onnx.data")
        location = "vae_decoder.onnx.data"
    else:
        location = "../../outside/vae_decoder.onnx.data" if kind == "dotdot" else str(data)
        model = onnx.load_model(str(onnx_path), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, str(onnx_path))
    # The manifest records no external weights: only the graph's own location leads out.
    _edit(bundle, lambda d: d["components"]["vae_decoder"].update(
        external_data=None, external_size=0, external_sha256=None,
        size=onnx_path.stat().st_size, sha256=file_digest(onnx_path)))
    # The structure check alone (no bundle root) follows the location: the weights are complete.
    assert check_onnx_file(onnx_path).external[0].location == location

    with OpenedFiles() as seen:
        with pytest.raises(BundleError) as err:
            Bundle.load(bundle)  # raises before any session exists
    msg = str(err.value)
    assert "\n" not in msg and "tensor 'w'" in msg and "refused" in msg and "ONNXRuntimeError" not in msg, msg
    assert msg.startswith(f"{onnx_path.resolve()}: the external-data location of tensor 'w'")
    assert seen.under(outside) == []


# -- engine folders -------------------------------------------------------------------------------
def _engine_folder(bundle: Path) -> Path:
    folder = bundle / "engines" / "nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106"
    folder.mkdir(parents=True)
    (folder / "unet.plan").write_bytes(b"plan")
    (folder / "unet.json").write_text("{}")
    return folder


@pytest.mark.parametrize("what", ["folder", "plan", "sidecar"])
def test_engine_files_leading_out_are_refused(world, what):
    from infiniteid.trt.names import check_engine_folder, list_engine_folders

    bundle, outside = world
    folder = _engine_folder(bundle)
    assert list_engine_folders(bundle) == [folder.resolve()]
    assert Bundle.load(bundle).engine_dirs() == [folder.resolve()]
    name = {"folder": "", "plan": "unet.plan", "sidecar": "unet.json"}[what]
    moved = outside / (name or folder.name)
    shutil.move(str(folder / name) if name else str(folder), moved)
    os.symlink(moved, folder / name if name else folder)
    key = f"engines/{folder.name}" + (f"/{name}" if name else "")
    with OpenedFiles() as seen:
        for call in (lambda: list_engine_folders(bundle), lambda: check_engine_folder(bundle, folder),
                     lambda: Bundle.load(bundle).engine_dirs()):
            with pytest.raises(BundleError) as err:
                call()
            assert f"{bundle}: {key} resolves to {moved}" in str(err.value) and "\n" not in str(err.value)
    assert seen.under(outside) == []


def test_inspect_marks_paths_leading_out(world, capsys):
    from infiniteid.cli import main

    bundle, outside = world
    _edit(bundle, lambda d: d["components"]["unet"].__setitem__("file", "../outside/unet.onnx"))
    folder = _engine_folder(bundle)
    shutil.move(str(folder / "unet.plan"), outside / "unet.plan")
    os.symlink(outside / "unet.plan", folder / "unet.plan")
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    unet_row = next(line for line in out.splitlines() if line.startswith("unet "))
    assert "REFUSED (outside the bundle)" in unet_row
    assert "REFUSED (leads outside the bundle)" in out


# -- the manifest's face-model folder: a user path --------------------------------------------------
@pytest.fixture
def faces(tmp_path) -> Path:
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    (folder / "glintr100.onnx").write_bytes(b"arcface")
    return folder


def _with_faces(bundle: Path, record) -> Bundle:
    _edit(bundle, lambda d: d.__setitem__("face_models", record))
    return Bundle.load(bundle)


def test_face_folder_recorded_by_an_export_here_is_followed(world, faces, monkeypatch, tmp_path):
    from infiniteid import provenance
    from infiniteid.bundle import tag_face_models

    bundle, _ = world
    record = tag_face_models({"path": str(faces), "files": {"glintr100.onnx": file_digest(faces / "glintr100.onnx")}})
    b = _with_faces(bundle, record)
    assert b.face_models_recorded_here() and b.face_models_folder() == faces
    monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "another-machine.key"))
    assert not b.face_models_recorded_here()
    with pytest.raises(BundleError, match="not recorded by an export on this machine"):
        b.face_models_folder()


@pytest.mark.parametrize("forgery", ["untagged", "tag of another folder"])
def test_face_folder_from_elsewhere_needs_the_user(world, faces, forgery):
    from infiniteid.bundle import tag_face_models

    bundle, _ = world
    record = {"path": str(faces), "files": {}}
    if forgery == "tag of another folder":
        record["recorded_here"] = tag_face_models({"path": "/somewhere/else", "files": {}})["recorded_here"]
    b = _with_faces(bundle, record)
    with pytest.raises(BundleError) as err:
        b.face_models_folder()
    msg = str(err.value)
    assert "\n" not in msg and f"face_models.path = {str(faces)!r} is a folder outside the bundle" in msg
    assert "--face-models DIR" in msg and "trust_face_models=True" in msg
    assert b.face_models_folder(trust=True) == faces


def test_relative_face_folder_stays_inside(world):
    bundle, _ = world
    (bundle / "faces").mkdir()
    assert _with_faces(bundle, {"path": "faces", "files": {}}).face_models_folder() == (bundle / "faces").resolve()
    with pytest.raises(BundleError, match=r"face_models.path = '../outside' resolves to .*outside the bundle"):
        _with_faces(bundle, {"path": "../outside", "files": {}}).face_models_folder(trust=True)


def test_inspect_says_whether_the_face_folder_is_followed(world, faces, capsys):
    from infiniteid.bundle import tag_face_models
    from infiniteid.cli import main

    bundle, _ = world
    _edit(bundle, lambda d: d.__setitem__("face_models", tag_face_models({"path": str(faces), "files": {}})))
    assert main(["inspect", str(bundle)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("face models"))
    assert str(faces) in line and "recorded by an export on this machine: used unless --face-models" in line
    _edit(bundle, lambda d: d.__setitem__("face_models", {"path": str(faces), "files": {}}))
    assert main(["inspect", str(bundle)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("face models"))
    assert "not recorded on this machine: not used; pass --face-models" in line



def test_build_writes_nothing_through_a_symlink_leading_out(world):
    from infiniteid.trt.engine_check import Target
    from infiniteid.trt.names import DeviceInfo
    from infiniteid.trt.plan import BuildOptions, BuiltPlan, run_build

    bundle, outside = world
    os.symlink(outside, bundle / "engines")
    with pytest.raises(BundleError, match=r"engines/nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106 resolves to .*outside"):
        run_build(bundle, Bundle.load(bundle).manifest, BuildOptions(components=["unet"], step_graphs=False),
                  Target(DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)), "11.4.0.106"),
                  lambda job, folder: BuiltPlan(data=b"plan"), progress=False)
    assert list(outside.iterdir()) == []
