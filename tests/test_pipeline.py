"""The PyTorch reference end to end on the tiny model: reduction to SDXL, determinism,
identity mixing and interpolation, adapter round trip."""
import copy

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from infiniteid import generation as gen
from infiniteid.layout import both_streams
from infiniteid.model.adapter import load_adapter, save_adapter
from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
from infiniteid.model.processors import INFERENCE, KWARG, TRAINING, IDConditioning, id_processors

H = W = 64
STEPS = 3


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def face(seed: int) -> FaceInput:
    """A precomputed face: a unit ArcFace-like embedding and an RGB crop."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    return InfiniteIDPipeline.tiny(seed=0)


def settings(**kw):
    return gen.BatchSettings(height=H, width=W, steps=STEPS, **kw)


def unet_inputs(pipe, pairs: int, seed: int):
    """Random U-Net inputs where both streams get the same sample and text conditioning."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.c.unet.config
    half = lambda *s: torch.randn(pairs, *s, generator=g)  # noqa: E731
    return dict(
        sample=both_streams(half(4, 8, 8)),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=both_streams(half(77, cfg.cross_attention_dim)),
        added_cond_kwargs={
            "text_embeds": both_streams(half(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)),
            "time_ids": torch.from_numpy(gen.sdxl_time_ids(H, W)).expand(2 * pairs, -1),
        },
    ), torch.randn(pairs, 8, cfg.cross_attention_dim, generator=g)


def test_method_reduces_to_sdxl(pipe):
    """Mixed attention off, AdaIN-mean off, ID scale 0: the ID stream is plain SDXL."""
    pairs = 2
    inputs, id_embeds = unet_inputs(pipe, pairs, seed=1)
    cond = IDConditioning(id_embeds, torch.zeros(pairs), mixed_attention=False, adain=False, mode=INFERENCE)
    with torch.no_grad():
        out = pipe.c.unet(**inputs, cross_attention_kwargs={KWARG: cond}).sample
        plain_unet = copy.deepcopy(pipe.c.unet)
        plain_unet.set_attn_processor(AttnProcessor2_0())
        plain = plain_unet(**inputs).sample
        on = pipe.c.unet(**inputs, cross_attention_kwargs={KWARG: IDConditioning(id_embeds, torch.ones(pairs))}).sample
    text, ident = out[:pairs], out[pairs:]
    assert rel_err(ident, text) < 1e-5
    assert rel_err(out, plain) < 1e-5
    assert rel_err(on[pairs:], text) > 1e-3  # the switches do something when on


def test_training_mode_ignores_prompt_embeddings(pipe):
    inputs, _ = unet_inputs(pipe, 1, seed=2)
    id_embeds = torch.randn(2, 8, pipe.c.unet.config.cross_attention_dim)
    cond = {KWARG: IDConditioning(id_embeds, mode=TRAINING)}
    with torch.no_grad():
        a = pipe.c.unet(**inputs, cross_attention_kwargs=cond).sample
        inputs["encoder_hidden_states"] = torch.randn_like(inputs["encoder_hidden_states"]) * 3
        b = pipe.c.unet(**inputs, cross_attention_kwargs=cond).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generation_is_deterministic_for_a_seed(pipe):
    req = lambda seed: gen.GenerationRequest("a photo of a person", faces=[face(1)], seed=seed)  # noqa: E731
    a = pipe.generate([req(7)], settings(), progress=False).arrays[0]
    b = pipe.generate([req(7)], settings(), progress=False).arrays[0]
    c = pipe.generate([req(8)], settings(), progress=False).arrays[0]
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_text_stream_image_is_returned_on_request(pipe):
    out = pipe.generate(
        [gen.GenerationRequest("a person", faces=[face(1)])], settings(return_text_stream=True), progress=False
    )
    assert out.text_arrays is not None and out.text_arrays[0].shape == (H, W, 3)
    assert out.text_images[0].size == (W, H)  # PIL, as the runtime returns
    assert out.latents.shape == (2, 4, H // 8, W // 8)


def test_mixing_two_identities_doubles_the_id_tokens(pipe):
    one, uncond1 = pipe.identity_tokens(gen.GenerationRequest("p", faces=[face(1)]))
    two, uncond2 = pipe.identity_tokens(gen.GenerationRequest("p", faces=[face(1), face(2)]))
    assert two.shape[0] == 2 * one.shape[0] and two.shape[1:] == one.shape[1:]
    assert uncond2.shape == two.shape and uncond1.shape == one.shape
    torch.testing.assert_close(two[: one.shape[0]], one)
    out = pipe.generate([gen.GenerationRequest("p", faces=[face(1), face(2)])], settings(), progress=False)
    assert out.arrays[0].shape == (H, W, 3)


@pytest.mark.parametrize("alpha,single", [(1.0, 1), (0.0, 2)])
def test_interpolation_endpoints_equal_the_single_identities(pipe, alpha, single):
    mix = gen.IdentityMix(mode="interpolate", alpha=alpha)
    blended = gen.GenerationRequest("p", faces=[face(1), face(2)], identity=mix, seed=3)
    alone = gen.GenerationRequest("p", faces=[face(single)], seed=3)
    c_blend, _ = pipe.identity_tokens(blended)
    c_alone, _ = pipe.identity_tokens(alone)
    # Equal up to float rounding: two faces go through the encoder as one batch of 2,
    # whose matmuls round differently from a batch of 1 (~5e-7 absolute).
    assert rel_err(c_blend, c_alone) < 1e-5
    a = pipe.generate([blended], settings(), progress=False).arrays[0]
    b = pipe.generate([alone], settings(), progress=False).arrays[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    other = pipe.generate([gen.GenerationRequest("p", faces=[face(3 - single)], seed=3)], settings(), progress=False)
    assert np.abs(a.astype(int) - other.arrays[0].astype(int)).max() > 1  # the identity matters


def test_interpolation_needs_two_faces(pipe):
    req = gen.GenerationRequest("p", faces=[face(1)], identity=gen.IdentityMix("interpolate", 0.5))
    with pytest.raises(gen.InvalidRequest, match="exactly 2 faces"):
        pipe.generate([req], settings(), progress=False)


def test_bad_resolution_is_refused(pipe):
    with pytest.raises(gen.InvalidRequest):
        pipe.generate([gen.GenerationRequest("p", faces=[face(1)])], gen.BatchSettings(height=70, width=64, steps=2))


def test_adapter_round_trip_is_bit_exact(tmp_path):
    src = InfiniteIDPipeline.tiny(seed=1)
    for p in id_processors(src.c.unet).values():  # make sure the ID projections are not at a default init
        torch.nn.init.normal_(p.to_k_ip.weight)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, src.c.id_encoder.mapper, src.c.unet)
    dst = InfiniteIDPipeline.tiny(seed=2)
    mapper = load_adapter(path, dst.c.unet)
    for (ka, a), (kb, b) in zip(src.c.id_encoder.mapper.state_dict().items(), mapper.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    src_ip, dst_ip = id_processors(src.c.unet), id_processors(dst.c.unet)
    assert list(src_ip) == list(dst_ip) and src_ip
    for name in src_ip:
        assert torch.equal(src_ip[name].to_k_ip.weight, dst_ip[name].to_k_ip.weight)
        assert torch.equal(src_ip[name].to_v_ip.weight, dst_ip[name].to_v_ip.weight)


def test_tiny_model_is_bit_identical_across_builds():
    """Two builds with one seed agree exactly, tokenizer included (no hash-order ties)."""
    a, b = InfiniteIDPipeline.tiny(seed=0), InfiniteIDPipeline.tiny(seed=0)
    prompts = ["a photo of a man in comic book style, smiling!", "zebra"]
    np.testing.assert_array_equal(a.c.tokenizer(prompts), b.c.tokenizer(prompts))
    np.testing.assert_array_equal(a.c.tokenizer_2(prompts), b.c.tokenizer_2(prompts))
    assert a.c.tokenizer.tokenizer.to_str() == b.c.tokenizer.tokenizer.to_str()
    for (ka, va), (kb, vb) in zip(a.c.unet.state_dict().items(), b.c.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
