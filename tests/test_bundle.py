"""The bundle writer and the bundle format: manifest, files, atomic writing, bad bundles.

One tiny bundle is exported per module (without the onnxslim pass, which
test_export.py covers, to keep this file quick); with a small external-data
threshold so that the U-Net's weights go to ``onnx/unet.onnx.data``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from infiniteid.bundle import FORMAT_VERSION, BundleError, Manifest, check_files, read_manifest, write_manifest
from infiniteid.contract import COMPONENTS
from infiniteid.export import ExportOptions, export_bundle, export_tiny_bundle
from infiniteid.export import bundle_writer
from infiniteid.export.bundle_writer import face_models_record, state_dict_digest
from infiniteid.model.pipeline import InfiniteIDPipeline
from infiniteid.tokenize import PromptTokenizer

FAST = dict(slim=False, check=False)
UNET_EXTERNAL = 2 * 2**20  # 2 MiB: only the tiny U-Net (about 6 MiB) is above it


@pytest.fixture(scope="module")
def exported_with_pipe(tmp_path_factory):
    parent = tmp_path_factory.mktemp("parent")
    out = parent / "bundle"
    pipe = InfiniteIDPipeline.tiny(0)
    manifest = export_bundle(pipe, out, ExportOptions(external_data_threshold=UNET_EXTERNAL, **FAST), progress=False)
    return out, manifest, pipe


@pytest.fixture(scope="module")
def exported(exported_with_pipe):
    return exported_with_pipe[:2]


@pytest.fixture()
def copy(exported, tmp_path):
    """A private copy of the exported bundle, to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(exported[0], dst)
    return dst


# -- what a good bundle holds -------------------------------------------------------
def test_layout_and_nothing_outside(exported):
    out, manifest = exported
    assert sorted(os.listdir(out.parent)) == ["bundle"], "no temporary sibling left behind"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["manifest.json", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"]
        + [f"onnx/{c}.onnx" for c in COMPONENTS]
        + ["onnx/unet.onnx.data"]
    )


def test_manifest_round_trips_and_files_check(exported):
    out, manifest = exported
    back = read_manifest(out)
    assert back == manifest
    assert back.format_version == FORMAT_VERSION == 1
    check_files(out, back, verify_hashes=True)
    assert set(back.components) == set(COMPONENTS)


def test_manifest_model_resolution_and_options(exported):
    _, m = exported
    assert m.model["kind"] == "tiny"
    assert m.model["id_tokens"] == 21 and m.model["max_length"] == 77
    assert m.model["vae_scaling_factor"] == pytest.approx(0.13025) and m.model["vae_scale_factor"] == 8
    assert m.model["clip_image"]["size"] == 32 and m.model["force_zeros_for_empty_prompt"] is True
    assert m.model["cross_attention_dim"] == m.model["text_hidden"] + m.model["text_hidden_2"] == 64
    assert m.resolution == {"multiple": 16, "min": 64, "max": 192, "default_height": 128, "default_width": 128}
    assert m.max_images == 4
    assert m.scheduler_config["num_train_timesteps"] == 1000
    unet = m.components["unet"]
    assert unet.options["mixed_attention"] is True and unet.options["adain"] is True
    assert unet.external_data == "onnx/unet.onnx.data" and unet.external_size > 0 and unet.external_sha256
    assert m.components["vae_decoder"].options["scaling_in_graph"] is True
    assert m.components["vae_decoder"].precision == "fp32"
    sample = unet.tensor("sample")
    assert (sample.min, sample.opt, sample.max) == ([2, 4, 8, 8], [4, 4, 16, 16], [16, 4, 24, 24])
    ids = unet.tensor("id_embeds")
    assert (ids.min, ids.opt, ids.max) == ([1, 21, 64], [2, 21, 64], [8, 42, 64])  # 2 identities mixed
    assert {"torch", "onnx", "onnxslim", "diffusers", "transformers", "onnx_opset", "python"} <= set(m.tools)
    assert m.sources["model"] == "tiny(seed=0)" and len(m.sources["state_dict/unet"]) == 64
    assert m.face_models is None and m.created


def test_tokenizers_are_the_pipelines(exported_with_pipe):
    """The exported pipeline's own tokenizers. (The tiny tokenizer is trained in process and
    its BPE trainer breaks frequency ties differently per instance, so a *fresh* tiny(0) may
    number words differently: the bundle's tokenizer files are what make it reproducible.)"""
    out, _, pipe = exported_with_pipe
    prompts = ["a photo of a man in comic book style", "", "wizard " * 90]
    for rel, tok in (("tokenizer/tokenizer.json", pipe.c.tokenizer), ("tokenizer_2/tokenizer.json", pipe.c.tokenizer_2)):
        np.testing.assert_array_equal(PromptTokenizer.from_file(out / rel)(prompts), tok(prompts))


def test_every_graph_loads_with_external_weights(exported):
    out, m = exported
    for c in m.components.values():
        s = ort.InferenceSession(str(out / c.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in s.get_inputs()] == [t.name for t in c.inputs]


def test_source_digests_identify_the_seed():
    a, b, c = (InfiniteIDPipeline.tiny(s) for s in (0, 0, 1))
    assert state_dict_digest(a.c.unet) == state_dict_digest(b.c.unet) != state_dict_digest(c.c.unet)


def test_face_models_are_referenced_not_copied(tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    (folder / "scrfd_10g_bnkps.onnx").write_bytes(b"detector")
    (folder / "glintr100.onnx").write_bytes(b"arcface")
    rec = face_models_record(folder)
    assert rec["path"] == str(folder) and sorted(rec["files"]) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    from infiniteid.bundle import face_models_recorded_here

    assert face_models_recorded_here(rec)  # tagged by this machine: the runtime follows it without asking
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no .onnx face models"):
        face_models_record(empty)
    with pytest.raises(BundleError, match="face model folder not found"):
        face_models_record(tmp_path / "nope")


# -- bad bundles: each error names the file ------------------------------------------
def test_missing_onnx_file(copy):
    (copy / "onnx" / "id_encoder.onnx").unlink()
    with pytest.raises(BundleError) as e:
        check_files(copy, read_manifest(copy))
    assert str(copy / "onnx" / "id_encoder.onnx") in str(e.value) and "missing" in str(e.value)


def test_missing_tokenizer(copy):
    (copy / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer_2/tokenizer.json: tokenizer file missing"):
        check_files(copy, read_manifest(copy))


def test_missing_external_weights(copy):
    (copy / "onnx" / "unet.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"unet\.onnx\.data: external weights of component 'unet' missing"):
        check_files(copy, read_manifest(copy))


@pytest.mark.parametrize("rel", ["onnx/text_encoder_2.onnx", "onnx/unet.onnx.data"])
def test_truncated_file(copy, rel):
    p = copy / rel
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as e:
        check_files(copy, read_manifest(copy))
    msg = str(e.value)
    assert msg.startswith(str(p)) and "truncated" in msg and f"manifest records {len(data)}" in msg


def test_changed_file_caught_by_hash(copy):
    p = copy / "onnx" / "vae_decoder.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    p.write_bytes(bytes(data))
    check_files(copy, read_manifest(copy))  # sizes agree
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx: sha256 differs"):
        check_files(copy, read_manifest(copy), verify_hashes=True)


def _edit_manifest(folder: Path, **changes) -> Path:
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


def test_unknown_manifest_version(copy):
    path = _edit_manifest(copy, format_version=2)
    with pytest.raises(BundleError) as e:
        read_manifest(copy)
    assert str(path) in str(e.value) and "version 2 is not understood" in str(e.value)


def test_not_a_bundle_manifest(copy):
    _edit_manifest(copy, format="something-else")
    with pytest.raises(BundleError, match="not an InfiniteID-RT bundle manifest"):
        read_manifest(copy)


def test_corrupt_manifest_json(copy):
    (copy / "manifest.json").write_text('{"format": "infiniteid-bundle", ')
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        read_manifest(copy)


def test_manifest_missing_a_component(copy):
    d = json.loads((copy / "manifest.json").read_text())
    del d["components"]["unet"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="components missing: unet"):
        read_manifest(copy)


def test_write_manifest_validates(exported, tmp_path):
    _, m = exported
    bad = Manifest(**{**m.__dict__, "components": {k: v for k, v in m.components.items() if k != "vae_decoder"}})
    with pytest.raises(BundleError, match="components missing: vae_decoder"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / "manifest.json").exists()


# -- atomic writing -------------------------------------------------------------------
class Stop(Exception):
    pass


def _interrupt_after(name: str):
    def hook(done: str) -> None:
        if done == name:
            raise Stop(f"stopped after {done}")

    return hook


def test_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    saved = tempfile.tempdir
    with pytest.raises(Stop):
        export_tiny_bundle(out, options=ExportOptions(on_component=_interrupt_after("id_encoder"), **FAST))
    assert os.listdir(tmp_path) == [], "no output folder and no temporary sibling"
    assert tempfile.tempdir == saved
    with pytest.raises(BundleError, match="bundle folder not found"):
        read_manifest(out)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the U-Net export (after three graphs were written)."""
    real = bundle_writer.export_component

    def export_until_unet(pipeline, name, *args, **kwargs):
        if name == "unet":
            assert len(list((args[0]).parent.glob("*.onnx"))) == 3  # the encoders are on disk
            raise KeyboardInterrupt
        return real(pipeline, name, *args, **kwargs)

    monkeypatch.setattr(bundle_writer, "export_component", export_until_unet)
    with pytest.raises(KeyboardInterrupt):
        export_tiny_bundle(tmp_path / "bundle", options=ExportOptions(**FAST))
    assert os.listdir(tmp_path) == []


def test_partial_folder_never_loads(tmp_path, exported):
    """What a killed export leaves (its staging folder: everything but the manifest) is refused."""
    partial = tmp_path / ".bundle.partial-deadbeef"
    shutil.copytree(exported[0], partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing; this folder is not a bundle"):
        read_manifest(partial)


def test_existing_folder_refused_without_overwrite(exported):
    out, m = exported
    before = (out / "manifest.json").read_text()
    with pytest.raises(BundleError, match="already exists; choose another output folder or pass --overwrite"):
        export_tiny_bundle(out, options=ExportOptions(**FAST))
    assert (out / "manifest.json").read_text() == before


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        export_tiny_bundle(precious, options=ExportOptions(**FAST), overwrite=True)
    assert (precious / "holiday.jpg").read_bytes() == b"jpeg"


@pytest.mark.slow
def test_overwrite_replaces_a_bundle(copy):
    (copy / "stale.txt").write_text("from the old bundle")
    m = export_tiny_bundle(copy, seed=1, options=ExportOptions(**FAST), overwrite=True)
    assert not (copy / "stale.txt").exists()
    assert read_manifest(copy) == m and m.sources["model"] == "tiny(seed=1)"
    assert sorted(os.listdir(copy.parent)) == ["copy"]
