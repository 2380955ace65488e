"""A broken manifest is one line naming the key, never a traceback; ``inspect`` flags files whose size differs.

The manifests are SDXL-sized ones written from the export's own shape-range code
(no weights behind them), edited the way a user might break them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infiniteid.bundle import BundleError, read_manifest
from infiniteid.cli import main
from trt_testutil import sdxl_manifest


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "manifest.json").write_text(sdxl_manifest().to_json())
    return tmp_path


def edit(folder: Path, change) -> Path:
    d = json.loads((folder / "manifest.json").read_text())
    change(d)
    (folder / "manifest.json").write_text(json.dumps(d))
    return folder


def test_unedited_manifest_reads(folder):
    assert read_manifest(folder).resolution["max"] == 1536


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["resolution"].update(min="abc"), "resolution.min: expected an integer, got 'abc'"),
        (lambda d: d["resolution"].update(max=512, min=1024), "resolution: min 1024 is above max 512"),
        (lambda d: d["resolution"].update(multiple=0), "resolution.multiple: must be at least 1, got 0"),
        (lambda d: d.update(max_images="4"), "max_images: expected an integer, got '4'"),
        (lambda d: d.update(max_images=True), "max_images: expected an integer, got True"),
        (lambda d: d.update(model=[]), "model: expected an object, got []"),
        (lambda d: d["model"].update(id_tokens="261"), "model.id_tokens: expected an integer, got '261'"),
        (lambda d: d["model"].update(clip_image={"size": 224, "mean": [0.5]}), "model.clip_image.mean: expected a list of 3 numbers"),
        (lambda d: d["model"].update(vae_scaling_factor=None), "model.vae_scaling_factor: expected a number, got None"),
        (lambda d: d["components"]["unet"].pop("sha256"), "components.unet: missing key 'sha256'"),
        (lambda d: d["components"]["vae_decoder"].update(colour="red"), "components.vae_decoder: unknown key 'colour'"),
        (lambda d: d["components"]["unet"].update(size="6 MB"), "components.unet.size: expected an integer, got '6 MB'"),
        (lambda d: d["components"]["unet"].update(options=None), "components.unet.options: expected an object, got None"),
        (lambda d: d["components"]["unet"]["inputs"][5].update(max=[4, "x", 2048]),
         "components.unet.inputs[5].max[1]: expected an integer, got 'x'"),
        (lambda d: d["components"]["unet"]["inputs"][0].update(shape=[1.5, 4, "h", "w"]),
         "components.unet.inputs[0].shape[0]: expected an integer or a string, got 1.5"),
        (lambda d: d["components"]["text_encoder"]["outputs"][0].update(min=[1, 77]),
         "components.text_encoder.outputs[0]: shape, min, opt and max must have the same length"),
        (lambda d: d["components"].update(unet="onnx/unet.onnx"), "components.unet: expected an object, got 'onnx/unet.onnx'"),
        (lambda d: d.update(face_models={"path": 3, "files": {}}), "face_models.path: expected a string, got 3"),
        (lambda d: d.update(face_models={"files": {}}), "face_models: missing key 'path'"),
        (lambda d: d.update(tokenizers="tokenizer/tokenizer.json"), "tokenizers: expected a list of strings"),
        (lambda d: d.pop("scheduler_config"), "missing key 'scheduler_config'"),
        (lambda d: d.update(surprise=1), "unknown key 'surprise'"),
    ],
)
def test_bad_field_is_named(folder, change, message):
    edit(folder, change)
    with pytest.raises(BundleError) as e:
        read_manifest(folder)
    assert str(e.value).startswith(f"{folder / 'manifest.json'}: {message}"), str(e.value)


def test_cli_prints_one_line_for_a_bad_manifest(folder, capsys):
    edit(folder, lambda d: d["resolution"].update(min="abc"))
    for argv in (["inspect", str(folder)], ["generate", "--bundle", str(folder), "--face", str(folder / "manifest.json"),
                                          "--prompt", "p", "--out", str(folder / "x.png")]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.endswith("manifest.json: resolution.min: expected an integer, got 'abc'"), err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from infiniteid.commands.demo import tiny_bundle

    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


def test_inspect_flags_a_file_whose_size_differs(tiny, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny, copy)
    assert main(["inspect", str(copy)]) == 0
    clean = capsys.readouterr().out
    assert "SIZE DIFFERS" not in clean and "WARNING" not in clean and "MISSING" not in clean
    unet = copy / "onnx" / "unet.onnx"
    recorded = unet.stat().st_size
    unet.write_bytes(unet.read_bytes()[:1000])
    (copy / "tokenizer_2" / "tokenizer.json").unlink()
    assert main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("unet "))
    assert "1000 B SIZE DIFFERS (manifest 6.1 MiB)" in row and recorded > 6 * 2**20
    assert out.splitlines()[-1].startswith(
        f"WARNING    2 file(s) missing or not as the manifest records (truncated or replaced after export; the runtime "
        f"refuses this bundle): onnx/unet.onnx (1000 bytes, manifest {recorded}), tokenizer_2/tokenizer.json (missing)"), out
