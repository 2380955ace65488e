"""LoRAs fused at export (``infiniteid export --lora``), with diffusers as the oracle.

The tiny model is written in the SDXL folder layout; two seeded LoRA files sized for
it are written in the layouts SDXL LoRAs are published in (diffusers/peft keys at
scale 0.7, and kohya keys with ``alpha`` != rank covering both text encoders). The
bundle exported with both fused (and the few-step scheduler override ``trailing``)
is run by the torch-free runtime; its text stream is plain SDXL, so it must equal
diffusers' own ``StableDiffusionXLPipeline`` built from the same folder with the same
two files loaded by ``load_lora_weights`` and weighted by ``set_adapters`` (LoRA
layers applied at run time, not fused: an independent path). Bound: 1/255 per pixel;
the runtime holds the reference within 1/255 without LoRAs (README), and the LoRAs
move the image by far more than that (checked).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from infiniteid import generation as gen
from infiniteid.bundle import file_digest, read_manifest
from infiniteid.cli import main
from lora_testutil import kohya_lora, peft_lora, save_lora, target_layers

H = W = 64
STEPS = 4
PROMPT = "a photo of a woman wearing a red hat in the snow"
SCALE_A = 0.7


def one_line_error(capsys, command: str = "export") -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"infiniteid {command}: error: ")
    return err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model as SDXL weight folders, synthetic face models, and the two LoRA files."""
    from infiniteid.face import write_synthetic_face_models
    from infiniteid.model.loading import tiny_components
    from infiniteid.model.weights_folder import save_weight_folders

    root = tmp_path_factory.mktemp("lora-weights")
    c = tiny_components(0)
    w = save_weight_folders(c, root / "weights")
    tes = (c.text_encoder, c.text_encoder_2)
    a = save_lora(peft_lora(c.unet, seed=1, text_encoders=tes[:1]), root / "loras" / "style_peft.safetensors")
    b = save_lora(kohya_lora(c.unet, seed=2, text_encoders=tes), root / "loras" / "fast_kohya.safetensors")
    faces = write_synthetic_face_models(root / "faces", seed=0)
    return w, a, b, faces


@pytest.fixture(scope="module")
def bundle(weights, tmp_path_factory):
    w, a, b, faces = weights
    out = tmp_path_factory.mktemp("lora-bundle") / "bundle"
    args = ["export", "--base", str(w.base), "--image-encoder", str(w.image_encoder), "--adapter", str(w.adapter),
            "--face-models", str(faces), "--out", str(out), "--no-progress", "--no-slim", "--max-batch", "1",
            "--lora", f"{a}:{SCALE_A}", "--lora", str(b), "--scheduler-config", "trailing"]
    assert main(args) == 0
    return out


def diffusers_pipeline(base):
    """diffusers' SDXL pipeline from the weight folders, with nothing of ours in it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

    kw = dict(local_files_only=True)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **kw),
        tokenizer=CLIPTokenizerFast.from_pretrained(base, subfolder="tokenizer", **kw),
        tokenizer_2=CLIPTokenizerFast.from_pretrained(base, subfolder="tokenizer_2", **kw),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw),
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing", **kw),
        add_watermarker=False,
    )


def diffusers_image(pipe, noise, guidance):
    with torch.no_grad():
        x = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, height=H, width=W,
                 latents=torch.from_numpy(noise), output_type="np").images[0]
    return (x * 255).round().astype(np.uint8)


def a_face():
    from infiniteid.runtime import FaceInput

    rng = np.random.default_rng(5)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(e / np.linalg.norm(e), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


@pytest.mark.slow
def test_manifest_lists_each_lora_with_sha256_and_scale(bundle, weights):
    _, a, b, _ = weights
    m = read_manifest(bundle)
    assert [(x["file"], x["sha256"], x["scale"]) for x in m.loras] == [
        (a.name, file_digest(a), SCALE_A), (b.name, file_digest(b), 1.0)
    ]
    assert m.loras[0]["components"] == ["unet", "text_encoder"]
    assert m.loras[1]["components"] == ["unet", "text_encoder", "text_encoder_2"]
    from infiniteid.model.loading import tiny_components

    unet_layers = len(target_layers(tiny_components(0).unet))  # attention, feed-forward, proj_in/out, one conv
    assert unet_layers > 40
    assert [x["layers"] for x in m.loras] == [unet_layers + 18, unet_layers + 18 + 18]  # 3 text layers x 6 Linear each
    assert m.scheduler_override == {"timestep_spacing": "trailing"}
    assert m.scheduler_config["timestep_spacing"] == "trailing" and m.scheduler_config["beta_schedule"] == "scaled_linear"


@pytest.mark.slow
def test_bundle_with_loras_equals_diffusers_with_them_loaded(bundle, weights):
    """Few-step fast path (guidance 1: half the batch) and CFG 5: the runtime's text stream
    equals diffusers' SDXL pipeline with the two LoRAs loaded, within 1/255."""
    from infiniteid.runtime import Runtime

    w, a, b, _ = weights
    pipe = diffusers_pipeline(w.base)
    pipe.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    pipe.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[SCALE_A, 1.0])
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True).input_ids
    rt = Runtime(bundle, backend="ort", intra_op_threads=2)
    try:
        np.testing.assert_array_equal(rt.tokenizer([PROMPT]), np.asarray(ids))  # same token ids on both sides
        noise = np.random.default_rng(7).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
        for guidance in (1.0, 5.0):
            req = [gen.GenerationRequest(PROMPT, faces=[a_face()], guidance=guidance, seed=0)]
            s = gen.BatchSettings(height=H, width=W, steps=STEPS, scheduler="ddim", cfg=guidance != 1.0,
                                  return_text_stream=True)
            ours = rt.generate(req, s, noise=noise, progress=False).text_arrays[0].astype(int)
            theirs = diffusers_image(pipe, noise, guidance).astype(int)
            assert np.abs(ours - theirs).max() <= 1, f"guidance {guidance}: max pixel difference {np.abs(ours - theirs).max()}/255"
            pipe.disable_lora()
            plain = diffusers_image(pipe, noise, guidance).astype(int)
            pipe.enable_lora()
            assert np.abs(plain - theirs).max() > 20  # the LoRAs matter: a dropped one could not pass
    finally:
        rt.close()
