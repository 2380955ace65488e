"""Weights files are data: safetensors and safe pickles load, code-carrying pickles are refused unrun."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from infiniteid.model.weights_file import WeightsFileError, flatten, load_weights_file


def test_safetensors_and_nested_pickle_load(tmp_path):
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    save_file({"image_proj.proj.weight": t}, str(tmp_path / "a.safetensors"))
    torch.save({"image_proj": {"proj.weight": t}, "ip_adapter": {"1.to_k_ip.weight": t * 2}}, tmp_path / "a.bin")
    st = load_weights_file(tmp_path / "a.safetensors")
    pk = flatten(load_weights_file(tmp_path / "a.bin"))
    assert torch.equal(st["image_proj.proj.weight"], t)
    assert set(pk) == {"image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"}
    assert torch.equal(pk["ip_adapter.1.to_k_ip.weight"], t * 2) and pk["ip_adapter.1.to_k_ip.weight"].dtype == torch.float16


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_code_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"image_proj": payload}, f)
    with pytest.raises(WeightsFileError, match="refused by the safe unpickler.*nothing in it was run"):
        load_weights_file(tmp_path / "evil.bin")
    assert not marker.exists()


def test_truncated_and_unknown_files_give_one_line(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "w.onnx").write_bytes(b"x")
    for name, msg in [
        ("cut.safetensors", "not a readable .safetensors file"),
        ("cut.bin", "not a readable torch file"),
        ("w.onnx", "unknown weights file type '.onnx'"),
        ("missing.bin", "weights file not found"),
    ]:
        with pytest.raises(WeightsFileError, match=msg) as e:
            load_weights_file(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(WeightsFileError, match="is a folder"):
        load_weights_file(tmp_path)
