"""The real-weight loading path, exercised on the tiny model written in the real folder layout."""
import numpy as np
import pytest

from infiniteid import generation as gen
from infiniteid.model.adapter import AdapterError
from infiniteid.model.loading import WeightsError
from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
from infiniteid.model.weights_folder import save_weight_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pipe = InfiniteIDPipeline.tiny(seed=0)
    return pipe, save_weight_folders(pipe.c, tmp_path_factory.mktemp("weights"))


def test_from_pretrained_reproduces_the_model(folders):
    pipe, w = folders
    loaded = InfiniteIDPipeline.from_pretrained(w.base, w.image_encoder, w.adapter)
    for prompt in ("a photo of a man in comic book style", ""):
        np.testing.assert_array_equal(pipe.c.tokenizer([prompt]), loaded.c.tokenizer([prompt]))
        np.testing.assert_array_equal(pipe.c.tokenizer_2([prompt]), loaded.c.tokenizer_2([prompt]))
    rng = np.random.default_rng(0)
    e = rng.standard_normal(512).astype(np.float32)
    face = FaceInput(e / np.linalg.norm(e), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    req = [gen.GenerationRequest("a photo of a man", faces=[face], seed=1)]
    s = gen.BatchSettings(height=64, width=64, steps=3)
    a = pipe.generate(req, s, progress=False)
    b = loaded.generate(req, s, progress=False)
    # Same weights, but CPU kernels may sum in another order for other memory
    # alignment: latents agree to float rounding, pixels within one grey level.
    la, lb = a.latents.numpy(), b.latents.numpy()
    assert np.abs(la - lb).max() / np.abs(la).max() < 1e-5
    assert np.abs(a.arrays[0].astype(int) - b.arrays[0].astype(int)).max() <= 1


def test_missing_folders_are_clear_errors(folders, tmp_path):
    _, w = folders
    with pytest.raises(WeightsError, match="SDXL base folder not found"):
        InfiniteIDPipeline.from_pretrained(tmp_path / "nope", w.image_encoder, w.adapter)
    with pytest.raises(WeightsError, match="CLIP image encoder folder not found"):
        InfiniteIDPipeline.from_pretrained(w.base, tmp_path / "nope", w.adapter)
    with pytest.raises((AdapterError, FileNotFoundError), match="adapter"):
        InfiniteIDPipeline.from_pretrained(w.base, w.image_encoder, tmp_path / "nope.safetensors")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(WeightsError, match="missing vae"):
        InfiniteIDPipeline.from_pretrained(tmp_path / "half", w.image_encoder, w.adapter)
