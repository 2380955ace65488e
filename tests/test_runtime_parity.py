"""The torch-free runtime on onnxruntime reproduces the PyTorch reference.

Same tiny model (seed 0), same requests, same initial noise: every generated
pixel is within 2/255 of the reference's, and the final latents agree to float32
rounding (relative error < 1e-4), for one image, a batch of two with CFG,
mixed and interpolated identities, no CFG, every scheduler, and faces read
through the face front end. The bundle is exported in another process (the
session's cache), so the reference builds its own tiny model and tokenizers from
the seed: the comparison also covers the bundle's tokenizer files.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest

from infiniteid import generation as gen
from infiniteid.bundle import BundleError
from infiniteid.commands.demo import demo_face, tiny_bundle
from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
from infiniteid.runtime import Runtime
from infiniteid.runtime.backend import DeviceLoop
from infiniteid.runtime.loop import LoopInputs, host_loop

H = W = 64
STEPS = 4
PIXEL_TOL = 2  # of 255
LATENT_REL_TOL = 1e-4


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)


@pytest.fixture(scope="module")
def rt(bundle_dir):
    r = Runtime(bundle_dir, backend="ort", intra_op_threads=2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def pipe():
    return InfiniteIDPipeline.tiny(seed=0)


def test_bundle_tokenizers_equal_the_reference(rt, pipe):
    prompts = ["a photo of a man in comic book style", "", "an astronaut, oil painting!"]
    np.testing.assert_array_equal(rt.tokenizer(prompts), pipe.c.tokenizer(prompts))
    np.testing.assert_array_equal(rt.tokenizer_2(prompts), pipe.c.tokenizer_2(prompts))


def face(seed: int) -> FaceInput:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


def settings(**kw) -> gen.BatchSettings:
    kw.setdefault("height", H)
    kw.setdefault("width", W)
    kw.setdefault("steps", STEPS)
    return gen.BatchSettings(**kw)


def assert_same(ours, ref, text: bool = False) -> None:
    assert len(ours.arrays) == len(ref.arrays)
    pairs = list(zip(ours.arrays, ref.arrays))
    if text:
        pairs += list(zip(ours.text_arrays, ref.text_arrays))
    for a, b in pairs:
        assert a.shape == b.shape and a.dtype == np.uint8
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max()
        assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255"
    ref_lat = ref.latents.numpy()
    rel = np.abs(ours.latents - ref_lat).max() / np.abs(ref_lat).max()
    assert rel < LATENT_REL_TOL, f"final latents differ by {rel:.2e} relative"


def test_one_image_with_given_noise(rt, pipe):
    req = [gen.GenerationRequest("a photo of a man in comic book style", faces=[face(1)], seed=3)]
    noise = np.random.default_rng(99).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
    ours = rt.generate(req, settings(), noise=noise, progress=False)
    ref = pipe.generate(req, settings(), noise=noise, progress=False)
    assert_same(ours, ref)
    assert ours.images[0].size == (W, H) and ours.images[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours.images[0]), ours.arrays[0])
    # the seed's own noise differs from the given one, and so does the image
    own = rt.generate(req, settings(), progress=False)
    assert np.abs(own.arrays[0].astype(int) - ours.arrays[0].astype(int)).max() > 10


def test_two_images_with_cfg_and_text_stream(rt, pipe):
    reqs = [
        gen.GenerationRequest("a photo of a man in comic book style", faces=[face(1)], seed=1),
        gen.GenerationRequest(
            "a woman wearing a red hat, oil painting", faces=[face(2)], negative_prompt="blurry low resolution",
            seed=2, guidance=3.0, id_scale=0.6,
        ),
    ]
    s = settings(height=64, width=96, return_text_stream=True)
    ours = rt.generate(reqs, s, progress=False)
    ref = pipe.generate(reqs, s, progress=False)
    assert_same(ours, ref, text=True)
    assert ours.arrays[0].shape == (64, 96, 3)
    assert set(ours.timings) == {"encode", "denoise", "decode"}


def test_mixed_identities(rt, pipe):
    reqs = [
        gen.GenerationRequest("a portrait of a person", faces=[face(1), face(2)], seed=5),
        gen.GenerationRequest("a person at the beach", faces=[face(3), face(4)], seed=6, guidance=7.0),
    ]
    ours = rt.generate(reqs, settings(), progress=False)
    ref = pipe.generate(reqs, settings(), progress=False)
    assert_same(ours, ref)


def test_interpolated_identities(rt, pipe):
    mix = gen.IdentityMix(mode="interpolate", alpha=0.3)
    req = [gen.GenerationRequest("a portrait of a person", faces=[face(1), face(2)], identity=mix, seed=7)]
    assert_same(rt.generate(req, settings(), progress=False), pipe.generate(req, settings(), progress=False))


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_other_schedulers(rt, pipe, scheduler):
    req = [gen.GenerationRequest("a knight in the forest", faces=[face(8)], seed=8)]
    s = settings(scheduler=scheduler)
    assert_same(rt.generate(req, s, progress=False), pipe.generate(req, s, progress=False))


def test_without_cfg(rt, pipe):
    reqs = [gen.GenerationRequest("a chef", faces=[face(9)], seed=9), gen.GenerationRequest("a wizard", faces=[face(10)], seed=10)]
    s = settings(cfg=False)
    assert_same(rt.generate(reqs, s, progress=False), pipe.generate(reqs, s, progress=False))


def test_unconditional_identity_is_id_encoder_on_zeros(rt, pipe):
    ours = rt.unconditional_identity()
    ref = pipe.unconditional_identity().numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_faces_through_the_front_end(bundle_dir, rt, tmp_path):
    """Face photos, not precomputed faces: insightface on onnxruntime with the synthetic models."""
    from infiniteid.face import FaceEmbedder, write_synthetic_face_models

    models = write_synthetic_face_models(tmp_path / "models", seed=0)
    photo = tmp_path / "face.png"
    demo_face().save(photo)
    ours_rt = Runtime(bundle_dir, face_models=models, intra_op_threads=2)
    ref = InfiniteIDPipeline.tiny(seed=0, face=FaceEmbedder.from_folder(models))
    req = [gen.GenerationRequest("a photo of a person", faces=[str(photo)], seed=11)]
    assert_same(ours_rt.generate(req, settings(), progress=False), ref.generate(req, settings(), progress=False))
    # a precomputed face from the front end's own result gives the same image
    result = ours_rt.face.embed(str(photo))
    again = ours_rt.generate([gen.GenerationRequest("a photo of a person", faces=[result], seed=11)], settings(), progress=False)
    first = ours_rt.generate(req, settings(), progress=False)
    np.testing.assert_array_equal(again.arrays[0], first.arrays[0])


class _DeviceLoopOrt:
    """The ort backend plus ``denoise``: records what the runtime hands a device loop."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, "ort-device-loop", []

    def run(self, component, feeds):
        return self.inner.run(component, feeds)

    def denoise(self, loop):
        self.seen.append(loop)
        return host_loop(self.inner, loop)

    def close(self):
        self.inner.close()


def test_device_loop_backends_get_loop_inputs(bundle_dir, rt, pipe):
    from infiniteid.runtime.ort_backend import OrtBackend

    backend = _DeviceLoopOrt(OrtBackend(rt.bundle, intra_op_threads=2))
    assert isinstance(backend, DeviceLoop)
    dev = Runtime(rt.bundle, backend=backend)
    reqs = [gen.GenerationRequest("a man", faces=[face(1)], seed=1), gen.GenerationRequest("a woman", faces=[face(2)], seed=2, guidance=2.0)]
    out = dev.generate(reqs, settings(scheduler="euler"), progress=False)
    (loop,) = backend.seen
    assert isinstance(loop, LoopInputs)
    assert loop.latents.shape == (4, 4, H // 8, W // 8) and loop.latents.dtype == np.float32
    assert set(loop.unet_feeds) == {"encoder_hidden_states", "text_embeds", "time_ids", "id_embeds", "id_scale"}
    assert loop.unet_feeds["encoder_hidden_states"].shape[0] == loop.layout.batch == 8
    assert loop.unet_feeds["id_embeds"].shape[0] == loop.layout.pairs == 4
    np.testing.assert_array_equal(loop.timesteps, loop.scheduler.timesteps)
    assert loop.steps == STEPS and loop.guidance.reshape(-1).tolist() == [5.0, 2.0]
    assert hasattr(loop.scheduler, "step_coefficients")
    assert_same(out, pipe.generate(reqs, settings(scheduler="euler"), progress=False))


def test_refusals(rt):
    req = gen.GenerationRequest("a man", faces=[face(1)])
    with pytest.raises(gen.InvalidRequest, match="exported with mixed attention on"):
        rt.generate([req], settings(mixed_attention=False), progress=False)
    with pytest.raises(gen.InvalidRequest, match="exported with adain on"):
        rt.generate([req], settings(adain=False), progress=False)
    with pytest.raises(gen.InvalidRequest, match="at most 4"):
        rt.generate([req] * 5, settings(), progress=False)
    with pytest.raises(gen.InvalidRequest, match=r"height=256 is outside the supported range \[64, 192\]"):
        rt.generate([req], settings(height=256), progress=False)
    with pytest.raises(gen.InvalidRequest, match="not a multiple of 16"):
        rt.generate([req], settings(width=72), progress=False)
    with pytest.raises(gen.InvalidRequest, match=r"request 2 mixes 3 faces \(63 identity tokens\); this bundle takes at most 2"):
        rt.generate([req, gen.GenerationRequest("b", faces=[face(2), face(3), face(4)])], settings(), progress=False)
    with pytest.raises(gen.InvalidRequest, match="noise must have shape"):
        rt.generate([req], settings(), noise=np.zeros((1, 4, 4, 4), np.float32), progress=False)
    with pytest.raises(gen.InvalidRequest, match="no face model folder is known"):
        rt.generate([gen.GenerationRequest("a man", faces=[np.zeros((64, 64, 3), np.uint8)])], settings(), progress=False)
    with pytest.raises(gen.InvalidRequest, match="no requests"):
        rt.generate([], settings(), progress=False)


@pytest.mark.slow
def test_fp16_bundle_close_to_fp32_reference(tmp_path, rt, pipe):
    """An fp16 bundle (U-Net and encoders in float16, VAE in float32): the backend casts at the
    boundary, so callers see float32, and the image stays close to the fp32 reference."""
    from infiniteid.export import ExportOptions, export_tiny_bundle

    export_tiny_bundle(tmp_path / "fp16", seed=0, options=ExportOptions(precision="fp16"))
    rt16 = Runtime(tmp_path / "fp16", intra_op_threads=2)
    assert rt16.bundle.component("unet").precision == "fp16"
    sess = rt16.backend.session("unet")
    assert {i.type for i in sess.get_inputs()} == {"tensor(float16)"}
    req = [gen.GenerationRequest("a photo of a man in comic book style", faces=[face(1)], seed=1)]
    ours = rt16.generate(req, settings(), progress=False)
    ref = pipe.generate(req, settings(), progress=False)
    assert ours.latents.dtype == np.float32
    diff = np.abs(ours.arrays[0].astype(int) - ref.arrays[0].astype(int)).max()
    assert diff <= 8, f"fp16 bundle differs from the fp32 reference by {diff}/255"
    shutil.rmtree(tmp_path / "fp16")


def test_face_models_from_the_manifest_or_the_argument(bundle_dir, tmp_path):
    """The manifest references the user's face model folder; an argument overrides it."""
    import json

    from infiniteid.face import write_synthetic_face_models

    referenced = write_synthetic_face_models(tmp_path / "referenced", seed=0)
    override = write_synthetic_face_models(tmp_path / "override", seed=1)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["face_models"] = {"path": str(referenced), "files": {}}
    (copy / "manifest.json").write_text(json.dumps(m))
    photo = tmp_path / "face.png"
    demo_face().save(photo)

    # written by hand, not by an export on this machine: the folder is followed only when trusted
    with pytest.raises(BundleError, match="face_models.path .* not recorded by an export on this machine"):
        Runtime(copy, intra_op_threads=1).face
    from_manifest = Runtime(copy, intra_op_threads=1, trust_face_models=True)
    assert from_manifest.bundle.face_models_folder(trust=True) == referenced
    assert Path(from_manifest.face.folder) == referenced.resolve()
    overridden = Runtime(copy, face_models=override, intra_op_threads=1)
    assert Path(overridden.face.folder) == override.resolve()
    # different recogniser weights, different embeddings
    a = from_manifest.face_input(str(photo)).embedding
    b = overridden.face_input(str(photo)).embedding
    assert a.shape == b.shape == (512,) and np.abs(a - b).max() > 1e-3
