"""Loading bundles: every broken bundle is a BundleError naming the file and the problem,
and the onnxruntime backend checks feeds against the manifest before running."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infiniteid.bundle import BundleError
from infiniteid.commands.demo import tiny_bundle
from infiniteid.runtime.backend import BackendError, make_backend
from infiniteid.runtime.loader import Bundle
from infiniteid.runtime.onnx_file import OnnxFileError, check_onnx_file
from infiniteid.runtime.ort_backend import CPU, OrtBackend


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """The tiny bundle, exported once per test session (shared through the demo's cache logic)."""
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def test_good_bundle_loads(bundle_dir):
    b = Bundle.load(bundle_dir, verify_hashes=True)
    assert set(b.manifest.components) == {"text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder"}
    assert b.onnx_path("unet").name == "unet.onnx"
    assert all(info.ir_version > 0 and info.opsets >= 1 for info in b.onnx.values())
    assert b.unet_option("mixed_attention") is True
    assert b.engine_dirs() == []


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        Bundle.load(tmp_path)


def test_unknown_manifest_version(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json: manifest format version 99 is not understood"):
        Bundle.load(copy)


def test_manifest_not_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        Bundle.load(copy)


def test_missing_onnx_file(copy):
    (copy / "onnx" / "unet.onnx").unlink()
    with pytest.raises(BundleError, match=r"onnx/unet\.onnx: ONNX file of component 'unet' missing"):
        Bundle.load(copy)


def test_missing_tokenizer(copy):
    (copy / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer_2/tokenizer\.json: tokenizer file missing"):
        Bundle.load(copy)


@pytest.mark.parametrize("component", ["unet", "vae_decoder", "text_encoder"])
def test_truncated_onnx_file(copy, component):
    path = copy / "onnx" / f"{component}.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg and repr(component) in msg
    assert "onnxruntime" not in msg.lower()


def test_garbage_onnx_file(copy):
    """Same size as the real file (so only the structure check can tell), but not a model."""
    path = copy / "onnx" / "id_encoder.onnx"
    size = path.stat().st_size
    path.write_bytes((b"this is not a model\n" * (size // 20 + 1))[:size])
    with pytest.raises(BundleError, match=r"id_encoder\.onnx: ONNX file of component 'id_encoder' is unusable"):
        Bundle.load(copy)


def test_empty_onnx_file(copy):
    (copy / "onnx" / "vae_decoder.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx: .*component 'vae_decoder'.*(empty|has 0 bytes)"):
        Bundle.load(copy)


def test_structure_check_finds_truncation_without_the_manifest(bundle_dir, tmp_path):
    """The protobuf walk alone (no recorded size) sees that a graph file ends too early."""
    data = (bundle_dir / "onnx" / "unet.onnx").read_bytes()
    assert check_onnx_file(bundle_dir / "onnx" / "unet.onnx").ir_version > 0
    for frac in (0.1, 0.5, 0.99):
        p = tmp_path / "unet.onnx"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(OnnxFileError, match="truncated|ends in the middle"):
            check_onnx_file(p)


def test_changed_file_fails_hash_check(copy):
    path = copy / "onnx" / "vae_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a weight: structure intact, content changed
    path.write_bytes(bytes(data))
    Bundle.load(copy)  # structure is fine
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx: sha256 differs from the manifest"):
        Bundle.load(copy, verify_hashes=True)


def test_manifest_tensor_names_must_match_the_contract(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["components"]["unet"]["inputs"][0]["name"] = "latents"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"component 'unet' declares inputs .*'latents'"):
        Bundle.load(copy)


# -- the ONNX structure check on models with external weights ----------------------------
def _external_model(folder: Path) -> Path:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def test_external_data_checked(tmp_path):
    path = _external_model(tmp_path)
    info = check_onnx_file(path)
    assert [(t.tensor, t.location, t.length) for t in info.external] == [("w", "m.onnx.data", 64 * 64 * 4)]
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(OnnxFileError, match=r"needs 16384 bytes of .*m\.onnx\.data for tensor 'w'.*1000 bytes: it is truncated"):
        check_onnx_file(path)
    data.unlink()
    with pytest.raises(OnnxFileError, match=r"stores tensor 'w' in .*m\.onnx\.data, which is missing"):
        check_onnx_file(path)


def test_structure_check_agrees_with_onnx(tmp_path):
    """Every prefix of a small model that onnx itself cannot parse is refused by the walker too."""
    path = _external_model(tmp_path)
    data = path.read_bytes()
    for cut in range(1, len(data), 7):
        p = tmp_path / "cut.onnx"
        p.write_bytes(data[:cut])
        try:
            onnx.load_model(str(p), load_external_data=False)
            onnx_ok = True
        except Exception:
            onnx_ok = False
        try:
            check_onnx_file(p)
            ours_ok = True
        except OnnxFileError:
            ours_ok = False
        assert not (ours_ok and not onnx_ok), f"a {cut}-byte prefix passed our check but onnx cannot parse it"


# -- the onnxruntime backend -------------------------------------------------------------
@pytest.fixture(scope="module")
def backend(bundle_dir):
    b = OrtBackend(Bundle.load(bundle_dir), intra_op_threads=1)
    yield b
    b.close()


def test_backend_registry_and_providers(bundle_dir, backend):
    b = make_backend("ort", Bundle.load(bundle_dir), providers=[CPU], intra_op_threads=2, inter_op_threads=1)
    assert isinstance(b, OrtBackend)
    assert b.active_providers("vae_decoder") == [CPU]
    assert b.describe()["intra_op_threads"] == 2
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        make_backend("nope", Bundle.load(bundle_dir))
    with pytest.raises(BackendError, match="provider 'NoSuchExecutionProvider' is not available"):
        OrtBackend(Bundle.load(bundle_dir), providers=["NoSuchExecutionProvider"])
    with pytest.raises(BackendError, match="intra_op_threads must be a positive integer"):
        OrtBackend(Bundle.load(bundle_dir), intra_op_threads=0)


def test_backend_runs_and_returns_float32(backend):
    ids = np.zeros((2, 77), dtype=np.int64)
    out = backend.run("text_encoder_2", {"input_ids": ids})
    assert set(out) == {"hidden_states", "text_embeds"}
    assert out["hidden_states"].shape[:2] == (2, 77) and out["hidden_states"].dtype == np.float32
    # int32 ids are accepted and widened to the graph's int64
    out32 = backend.run("text_encoder_2", {"input_ids": ids.astype(np.int32)})
    np.testing.assert_array_equal(out["text_embeds"], out32["text_embeds"])


def test_backend_checks_feeds(backend):
    ids = np.zeros((1, 77), dtype=np.int64)
    with pytest.raises(BackendError, match=r"text_encoder: wrong inputs \(missing \['input_ids'\]; unknown \['ids'\]\)"):
        backend.run("text_encoder", {"ids": ids})
    with pytest.raises(BackendError, match=r"input 'input_ids' must have rank 2 \['images', 77\], got shape \[77\]"):
        backend.run("text_encoder", {"input_ids": ids[0]})
    with pytest.raises(BackendError, match=r"input 'input_ids' must have size 77 on axis 1"):
        backend.run("text_encoder", {"input_ids": ids[:, :10]})
    with pytest.raises(BackendError, match=r"input 'input_ids' must be int64, got float32"):
        backend.run("text_encoder", {"input_ids": ids.astype(np.float32)})
    with pytest.raises(BackendError, match=r"input 'latent' must be float32, got int64"):
        backend.run("vae_decoder", {"latent": np.zeros((1, 4, 8, 8), dtype=np.int64)})


def test_backend_reports_graph_manifest_mismatch(copy):
    """A graph whose names differ from its manifest entry is refused when its session opens."""
    m = json.loads((copy / "manifest.json").read_text())
    for key in ("file", "size", "sha256"):
        if key in m["components"]["text_encoder"]:
            m["components"]["vae_decoder"][key] = m["components"]["text_encoder"][key]
    (copy / "manifest.json").write_text(json.dumps(m))
    b = OrtBackend(Bundle.load(copy), intra_op_threads=1)
    with pytest.raises(BundleError, match=r"text_encoder\.onnx: the graph's inputs \['input_ids'\] differ from the manifest's \['latent'\]"):
        b.run("vae_decoder", {"latent": np.zeros((1, 4, 8, 8), dtype=np.float32)})
