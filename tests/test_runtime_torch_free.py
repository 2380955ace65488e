"""The runtime imports no torch, diffusers or transformers: checked in fresh interpreters,
on import and through a whole generation (tokenizers, face front end, onnxruntime, decode)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from infiniteid.commands.demo import demo_face, tiny_bundle

HEAVY = ("torch", "diffusers", "transformers")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_runtime_loads_no_torch():
    code = f"""
import json, sys
import infiniteid.runtime
from infiniteid.runtime import Runtime, Bundle, OrtBackend, LoopInputs
import infiniteid.runtime.loader, infiniteid.runtime.ort_backend, infiniteid.runtime.generator
import infiniteid.runtime.loop, infiniteid.runtime.onnx_file, infiniteid.runtime.schedulers
import infiniteid.commands.generate, infiniteid.commands.demo, infiniteid.commands.inspect
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    assert _run(code) == []


def test_a_whole_generation_loads_no_torch(bundle_dir, tmp_path):
    from infiniteid.face import write_synthetic_face_models

    models = write_synthetic_face_models(tmp_path / "models")
    photo = tmp_path / "face.png"
    demo_face().save(photo)
    code = f"""
import json, sys
from infiniteid import generation as gen
from infiniteid.runtime import Runtime
rt = Runtime({str(bundle_dir)!r}, face_models={str(models)!r}, intra_op_threads=1)
out = rt.generate([gen.GenerationRequest("a photo of a person", faces=[{str(photo)!r}])],
                  gen.BatchSettings(height=64, width=64, steps=2), progress=False)
print(json.dumps({{"size": list(out.images[0].size), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    assert _run(code) == {"size": [64, 64], "heavy": []}


def test_inspect_loads_no_torch(bundle_dir):
    code = f"""
import io, json, sys, contextlib
from infiniteid.commands.inspect import render
from infiniteid.bundle import read_manifest
text = render(__import__("pathlib").Path({str(bundle_dir)!r}), read_manifest({str(bundle_dir)!r}))
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    assert _run(code) == []
