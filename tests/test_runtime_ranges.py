"""The bundle's shape ranges hold on every backend: the runtime refuses, before any
backend runs, what the bundle's TensorRT engines would refuse (the tiny bundle takes
at most 2 mixed faces: 42 identity tokens of 21 each)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infiniteid.cli import main
from infiniteid.commands.demo import tiny_bundle
from infiniteid.generation import BatchSettings, GenerationRequest, IdentityMix, InvalidRequest
from infiniteid.runtime import FaceInput, Runtime
from infiniteid.runtime.ort_backend import OrtBackend
from infiniteid.runtime.ranges import check_feeds, identity_token_limit


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


class Counting:
    """The real onnxruntime backend, counting the component runs it is asked for."""

    name = "ort"

    def __init__(self, bundle):
        self.inner = OrtBackend(bundle, intra_op_threads=1)
        self.calls = []

    def run(self, component, feeds):
        self.calls.append(component)
        return self.inner.run(component, feeds)

    def close(self):
        self.inner.close()


def face(seed: int) -> FaceInput:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def rt(bundle_dir):
    from infiniteid.runtime.loader import Bundle

    b = Bundle.load(bundle_dir)
    return Runtime(b, backend=Counting(b))


def test_limit_read_from_the_manifest(rt):
    assert identity_token_limit(rt.bundle.component("unet"), rt.bundle.model["id_tokens"]) == (21, 42)
    assert identity_token_limit(rt.bundle.component("unet")) == (21, 42)  # without model.id_tokens: the range's min


def test_too_many_faces_refused_before_any_backend_run(rt):
    settings = BatchSettings(height=64, width=64, steps=1)
    ok = [GenerationRequest("p", faces=[face(0), face(1)]),
          GenerationRequest("p", faces=[face(0), face(1)], identity=IdentityMix("interpolate", 0.3))]
    rt.check(ok, settings)  # two faces: 42 tokens, the maximum itself
    rt.backend.calls.clear()
    three = GenerationRequest("p", faces=[face(0), face(1), face(2)])
    with pytest.raises(InvalidRequest) as e:
        rt.generate([ok[0], three], settings, progress=False)
    assert str(e.value) == (
        "request 2 mixes 3 faces (63 identity tokens); this bundle takes at most 2 faces per request (42 tokens): "
        "pass fewer faces or re-export with --max-identities 3")
    assert rt.backend.calls == []


def test_every_component_feed_checked_against_its_range(rt):
    unet = rt.bundle.component("unet")
    check_feeds(unet, {"id_embeds": np.zeros((2, 42, 64), np.float32)})
    with pytest.raises(InvalidRequest, match=r"^unet input 'id_embeds': 'id_tokens' \(axis 1\) is 63, this bundle takes 21\.\.42 "):
        check_feeds(unet, {"id_embeds": np.zeros((2, 63, 64), np.float32)})
    with pytest.raises(InvalidRequest, match=r"^unet input 'encoder_hidden_states': 'batch' \(axis 0\) is 17, this bundle takes 2\.\.16"):
        check_feeds(unet, {"encoder_hidden_states": np.zeros((17, 77, 64), np.float32)})
    # and through the runtime's own calls: nine prompts at once on the text encoder (at most 8 here: prompts and negatives of 4 images)
    rt.backend.calls.clear()
    with pytest.raises(InvalidRequest, match=r"^text_encoder input 'input_ids': 'images' \(axis 0\) is 9, this bundle takes 1\.\.8"):
        rt.encode_prompts(["a"] * 9)
    assert rt.backend.calls == []


def test_cli_refuses_three_faces_in_one_line(bundle_dir, tmp_path, capsys):
    from infiniteid.commands.demo import demo_face
    from infiniteid.face import write_synthetic_face_models

    models = write_synthetic_face_models(tmp_path / "models", seed=0)
    argv = ["generate", "--bundle", str(bundle_dir), "--prompt", "p", "--out", str(tmp_path / "o.png"), "--no-progress",
            "--face-models", str(models)]
    for k in range(3):
        demo_face().save(tmp_path / f"face{k}.png")
        argv += ["--face", str(tmp_path / f"face{k}.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("infiniteid generate: error: request 1 mixes 3 faces (63 identity tokens); this bundle takes at most "
                   "2 faces per request (42 tokens): pass fewer faces or re-export with --max-identities 3"), err
    assert not (tmp_path / "o.png").exists()
