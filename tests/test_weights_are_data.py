"""Weights are data everywhere the project reads them.

* Adapter and LoRA files go through :mod:`infiniteid.model.weights_file`
  (``.safetensors``, or pickles through ``torch.load(weights_only=True)``; its own
  test feeds a code-carrying pickle). The project's own adapter format is
  ``.safetensors`` only (:mod:`infiniteid.model.adapter`).
* SDXL and CLIP folders are read by diffusers' and transformers'
  ``from_pretrained`` (local files only). For ``.bin`` weights both go through
  their ``load_state_dict``, checked here to refuse a code-carrying pickle unrun.
* No other code in the package unpickles: a scan of the sources.
"""
from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "infiniteid"
#: the one module allowed to call torch.load (always with weights_only=True)
SAFE_LOADER = PACKAGE / "model" / "weights_file.py"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_bin(tmp_path: Path) -> Path:
    """A torch-style checkpoint whose unpickling would run a shell command."""
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "payload": _RunsCode(tmp_path / "ran")}, path)
    return path


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_from_pretrained_loaders_refuse_a_code_pickle_unrun(tmp_path, library):
    path = _evil_bin(tmp_path)
    if library == "diffusers":
        from diffusers.models.model_loading_utils import load_state_dict
    else:
        from transformers.modeling_utils import load_state_dict
    with pytest.raises(Exception) as err:
        load_state_dict(str(path))
    chain, e = [], err.value
    while e is not None and len(chain) < 10:  # the library may wrap the unpickler's error
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e) for e in chain), chain
    assert not (tmp_path / "ran").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_other_module_unpickles():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(ROOT)
        for call, name in _calls(tree):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}
            if name == "torch.load":
                if path != SAFE_LOADER or kw.get("weights_only") != "True":
                    offenders.append(f"{rel}:{call.lineno}: torch.load")
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load",
                          "cloudpickle.load"):
                offenders.append(f"{rel}:{call.lineno}: {name}")
            elif kw.get("allow_pickle") == "True" or kw.get("trust_remote_code") == "True" \
                    or kw.get("weights_only") == "False":
                offenders.append(f"{rel}:{call.lineno}: {name}({', '.join(f'{k}={v}' for k, v in kw.items())})")
    assert offenders == []
    # the scan sees calls: the safe loader's own call is found
    assert any(name == "torch.load" for _, name in _calls(ast.parse(SAFE_LOADER.read_text())))
