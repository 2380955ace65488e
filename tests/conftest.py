"""Test-wide set-up: skip hooks for the ``gpu`` and ``tensorrt`` markers (registered in pytest.ini).

Without a CUDA device, Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before any ``@triton.jit`` function is defined, so it is set here, before
test modules are imported.
"""
from __future__ import annotations

import importlib.util
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _tensorrt_builder_available() -> bool:
    """The full TensorRT (builder + a GPU), not just the lean runtime bindings."""
    if importlib.util.find_spec("tensorrt") is None or not _cuda_available():
        return False
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except (ImportError, OSError):
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    no_trt = pytest.mark.skip(reason="needs TensorRT with its builder library and a GPU (not installable here)")
    has_trt = None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords:
            if has_trt is None:
                has_trt = _tensorrt_builder_available()
            if not has_trt:
                item.add_marker(no_trt)


@pytest.fixture(autouse=True, scope="session")
def _machine_key_in_a_temporary_folder(tmp_path_factory):
    """Exports and builds tag what they write with this machine's key (infiniteid.provenance): tests keep
    theirs in a temporary folder, never in the user's configuration."""
    key = tmp_path_factory.mktemp("machine-key") / "machine.key"
    old = os.environ.get("INFINITEID_MACHINE_KEY")
    os.environ["INFINITEID_MACHINE_KEY"] = str(key)
    yield key
    if old is None:
        os.environ.pop("INFINITEID_MACHINE_KEY", None)
    else:
        os.environ["INFINITEID_MACHINE_KEY"] = old


# -- shared artefacts: the tiny bundle (exported once per session into the cache folder), synthetic face models,
# -- and a face photo. A test module may define its own fixture of the same name to get a different one.
@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    from infiniteid.commands.demo import tiny_bundle

    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


@pytest.fixture(scope="session")
def face_models(tmp_path_factory):
    from infiniteid.face import write_synthetic_face_models

    return write_synthetic_face_models(tmp_path_factory.mktemp("face-models"), seed=0)


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    from infiniteid.commands.demo import demo_face

    p = tmp_path_factory.mktemp("photo") / "face.png"
    demo_face().save(p)
    return p
