"""Published IP-Adapter face files as the ID module, held to diffusers' own IP-Adapter pipeline.

For each kind a file in the published layout (tests/public_adapter_files.py) is loaded
(a) by diffusers' ``StableDiffusionXLPipeline.load_ip_adapter`` and run with its own
call, and (b) by our pipeline with mixed attention and AdaIN-mean off, which makes
the ID stream exactly SDXL + IP-Adapter. Same weights folder, noise, prompt, seed.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from infiniteid import generation as gen
from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
from infiniteid.model.weights_folder import save_weight_folders
from public_adapter_files import write_public_adapter

H = W = 64
STEPS = 3
GUIDANCE = 5.0
PROMPT = "a photo of a woman in comic book style"
KINDS = ("ip-adapter-plus-face", "ip-adapter-faceid-plusv2", "ip-adapter-faceid")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model in the real folder layout, a face (embedding + CLIP-sized crop), the noise."""
    root = tmp_path_factory.mktemp("public")
    pipe = InfiniteIDPipeline.tiny(seed=0)
    w = save_weight_folders(pipe.c, root / "weights")
    rng = np.random.default_rng(7)
    e = rng.standard_normal(512).astype(np.float32)
    size = pipe.c.clip_image.size
    face = FaceInput(e / np.linalg.norm(e), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    noise = gen.initial_noise(3, H, W)[None]
    return dict(root=root, weights=w, face=face, noise=noise, clip=pipe.c.clip_image, unet=pipe.c.unet)


@pytest.fixture(scope="module")
def reference(world):
    """Per kind, once: the published file (with FaceID's in-file LoRA) and diffusers' result on it."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = write_public_adapter(world["root"] / kind, kind, world["unet"], clip_dim=32, seed=11, lora=True)
            cache[kind] = (path, *run_diffusers(world, path, kind))
        return cache[kind]

    return get


def diffusers_pipeline(world):
    """diffusers' SDXL pipeline over the same folders (tokenizers, encoders, U-Net, VAE, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizerFast,
        CLIPVisionModelWithProjection,
    )

    w, clip = world["weights"], world["clip"]
    base = str(w.base)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizerFast.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizerFast.from_pretrained(base, subfolder="tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(w.image_encoder)),
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": clip.size},
            crop_size={"height": clip.size, "width": clip.size},
            image_mean=list(clip.mean),
            image_std=list(clip.std),
        ),
    )


def run_diffusers(world, path, kind):
    """diffusers' own call, as its IP-Adapter docs use each kind; returns (final latents, uint8 image)."""
    pipe = diffusers_pipeline(world)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    face = world["face"]
    crop = Image.fromarray(face.crop)
    kw = {}
    if kind == "ip-adapter-plus-face":
        kw["ip_adapter_image"] = crop
    else:
        emb = torch.from_numpy(face.embedding).reshape(1, 1, 1, -1)
        kw["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(emb), emb])]
        if kind == "ip-adapter-faceid-plusv2":
            proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            proj.clip_embeds = pipe.prepare_ip_adapter_image_embeds([crop], None, torch.device("cpu"), 1, True)[0]
            proj.shortcut = True
    final = {}

    def keep(p, i, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    out = pipe(
        PROMPT,
        height=H,
        width=W,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=torch.from_numpy(world["noise"]),
        output_type="np",
        callback_on_step_end=keep,
        **kw,
    )
    return final["latents"].numpy(), (out.images[0] * 255).round().astype(np.uint8)


def run_ours(world, adapter, **settings):
    w = world["weights"]
    pipe = InfiniteIDPipeline.from_pretrained(w.base, w.image_encoder, adapter)
    req = gen.GenerationRequest(PROMPT, faces=[world["face"]], guidance=GUIDANCE, seed=3)
    s = gen.BatchSettings(height=H, width=W, steps=STEPS, scheduler="ddim", **settings)
    out = pipe.generate([req], s, noise=world["noise"], progress=False)
    return out.latents[1:].numpy(), out.arrays[0], pipe


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_ip_adapter(world, reference, kind):
    path, ref_latents, ref_image = reference(kind)
    latents, image, pipe = run_ours(world, path, mixed_attention=False, adain=False)
    assert pipe.c.id_encoder.mapper.config.kind == kind
    assert rel_err(latents, ref_latents) < 1e-4
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1
    # The method's own attention on the same ID module: runs, and differs.
    mixed, _, _ = run_ours(world, path)
    assert np.isfinite(mixed).all() and rel_err(mixed, ref_latents) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export_and_runtime_match_diffusers(world, reference, kind):
    """The published file through export (ONNX) and the torch-free runtime on onnxruntime."""
    from infiniteid.export import ExportOptions, export_bundle
    from infiniteid.runtime import Runtime

    path, ref_latents, ref_image = reference(kind)
    w = world["weights"]
    pipe = InfiniteIDPipeline.from_pretrained(w.base, w.image_encoder, path)
    opts = ExportOptions(mixed_attention=False, adain=False, slim=False, check=False, max_batch=1)
    out = world["root"] / f"bundle-{kind}"
    manifest = export_bundle(pipe, out, opts, overwrite=True, progress=False)
    tokens = {"ip-adapter-plus-face": 16}.get(kind, 4)
    assert manifest.model["id_tokens"] == tokens and manifest.model["id_encoder"]["kind"] == kind
    # The profiles follow the kind's token count: one identity from the encoder, up to
    # max_identities (2) concatenated into the U-Net.
    enc = manifest.components["id_encoder"].tensor("id_embeds")
    assert (enc.min[1], enc.max[1]) == (tokens, tokens)
    unet = manifest.components["unet"].tensor("id_embeds")
    assert (unet.min[1], unet.opt[1], unet.max[1]) == (tokens, tokens, 2 * tokens)
    from infiniteid.commands.inspect import render

    assert f"adapter    kind {kind}," in render(out, manifest)  # inspect names the adapter's kind
    rt = Runtime(out, backend="ort", intra_op_threads=2)
    try:
        req = gen.GenerationRequest(PROMPT, faces=[world["face"]], guidance=GUIDANCE, seed=3)
        s = gen.BatchSettings(height=H, width=W, steps=STEPS, scheduler="ddim", mixed_attention=False, adain=False)
        got = rt.generate([req], s, noise=world["noise"], progress=False)
    finally:
        rt.close()
    assert rel_err(got.latents[1:], ref_latents) < 1e-4
    assert np.abs(got.arrays[0].astype(int) - ref_image.astype(int)).max() <= 2
