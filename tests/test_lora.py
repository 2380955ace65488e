"""LoRAs fused at export (``infiniteid export --lora``), with diffusers as the oracle.

The tiny model is written in the SDXL folder layout; three seeded LoRA files sized
for it are written in the layouts SDXL LoRAs are published in: diffusers/peft keys
(U-Net and first text encoder, scale 0.7), kohya keys in diffusers' module names
with ``alpha`` != rank (U-Net and both text encoders, 1.0), and kohya keys in the
SGM numbering kohya's SDXL trainer writes (U-Net, -0.5). The bundle exported with
all three fused (and the few-step scheduler override ``trailing``) is run by the
torch-free runtime; its text stream is plain SDXL, so it must equal diffusers' own
``StableDiffusionXLPipeline`` built from the same folder with the same files loaded
by ``load_lora_weights`` and weighted by ``set_adapters`` (LoRA layers applied at
run time, not fused: an independent path). Bound: 1/255 per pixel, the runtime's
measured agreement with the reference without LoRAs (README); the LoRAs move the
image by far more than that (checked), and fusing one file at the wrong scale fails it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infiniteid import generation as gen
from infiniteid.bundle import file_digest, read_manifest
from infiniteid.cli import main
from lora_testutil import kohya_lora, peft_lora, save_lora, target_layers

H = W = 64
STEPS = 4
PROMPT = "a photo of a woman wearing a red hat in the snow"
SCALE_A = 0.7
SCALE_SGM = -0.5


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
    sgm = save_lora(kohya_lora(c.unet, seed=3, sgm=True), root / "loras" / "kohya_sgm.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q") for k in load_file(sgm))
    faces = write_synthetic_face_models(root / "faces", seed=0)
    return w, a, b, sgm, faces


@pytest.fixture(scope="module")
def bundle(weights, tmp_path_factory):
    w, a, b, sgm, faces = weights
    out = tmp_path_factory.mktemp("lora-bundle") / "bundle"
    args = ["export", "--base", str(w.base), "--image-encoder", str(w.image_encoder), "--adapter", str(w.adapter),
            "--face-models", str(faces), "--out", str(out), "--no-progress", "--no-slim", "--max-batch", "1",
            "--lora", f"{a}:{SCALE_A}", "--lora", str(b), "--lora", f"{sgm}:{SCALE_SGM}", "--scheduler-config", "trailing"]
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
    _, a, b, sgm, _ = weights
    m = read_manifest(bundle)
    assert [(x["file"], x["sha256"], x["scale"]) for x in m.loras] == [
        (a.name, file_digest(a), SCALE_A), (b.name, file_digest(b), 1.0), (sgm.name, file_digest(sgm), SCALE_SGM)
    ]
    assert [x["components"] for x in m.loras] == [["unet", "text_encoder"], ["unet", "text_encoder", "text_encoder_2"], ["unet"]]
    from infiniteid.model.loading import tiny_components

    unet_layers = len(target_layers(tiny_components(0).unet))  # attention, feed-forward, proj_in/out, one conv
    assert unet_layers > 40
    assert [x["layers"] for x in m.loras] == [unet_layers + 18, unet_layers + 18 + 18, unet_layers]  # 3 text layers x 6 Linear each
    assert m.scheduler_override == {"timestep_spacing": "trailing"}
    assert m.scheduler_config["timestep_spacing"] == "trailing" and m.scheduler_config["beta_schedule"] == "scaled_linear"


def test_inspect_shows_the_loras(bundle, weights, capsys):
    _, a, b, sgm, _ = weights
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "LoRAs fused at export" in out and "(set at export over the base's: timestep_spacing=trailing)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith((a.name, b.name, sgm.name))]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        (a.name, "0.7", file_digest(a)[:12]), (b.name, "1", file_digest(b)[:12]), (sgm.name, "-0.5", file_digest(sgm)[:12])
    ]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the oracle holds two adapters at once
def test_bundle_with_loras_equals_diffusers_with_them_loaded(bundle, weights):
    """Few-step fast path (guidance 1: half the batch) and CFG 5: the runtime's text stream
    equals diffusers' SDXL pipeline with the two LoRAs loaded, within 1/255."""
    from infiniteid.runtime import Runtime

    w, a, b, sgm, _ = weights
    pipe = diffusers_pipeline(w.base)
    pipe.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    pipe.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    pipe.load_lora_weights(str(sgm.parent), weight_name=sgm.name, adapter_name="sgm")
    pipe.set_adapters(["a", "b", "sgm"], adapter_weights=[SCALE_A, 1.0, SCALE_SGM])
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


@pytest.mark.slow
def test_reference_with_loras_matches_the_bundle(bundle, weights, tmp_path):
    """``generate --base --lora`` (the PyTorch reference, LoRAs fused the same way) and
    ``generate --bundle`` on the LoRA bundle agree within 2/255 (the runtime's bound)."""
    from PIL import Image

    from infiniteid.commands.demo import demo_face

    w, a, b, sgm, faces = weights
    photo = tmp_path / "face.png"
    demo_face().save(photo)
    common = ["--face", str(photo), "--face-models", str(faces), "--prompt", PROMPT, "--steps", "4", "--guidance", "1",
              "--height", "64", "--width", "64", "--no-progress"]
    ref_png, rt_png = tmp_path / "ref.png", tmp_path / "rt.png"
    assert main(["generate", "--base", str(w.base), "--image-encoder", str(w.image_encoder), "--adapter", str(w.adapter),
                 "--lora", f"{a}:{SCALE_A}", "--lora", str(b), "--lora", f"{sgm}:{SCALE_SGM}", "--scheduler-config", "trailing",
                 "--out", str(ref_png), *common]) == 0
    assert main(["generate", "--bundle", str(bundle), "--out", str(rt_png), *common]) == 0
    ref, ours = (np.asarray(Image.open(p)).astype(int) for p in (ref_png, rt_png))
    assert np.abs(ref - ours).max() <= 2
    side = json.loads(ref_png.with_suffix(".json").read_text())["source"]
    assert [(x["file"], x["scale"]) for x in side["loras"]] == [(a.name, SCALE_A), (b.name, 1.0), (sgm.name, SCALE_SGM)]
    assert side["scheduler_override"] == {"timestep_spacing": "trailing"}


# -- files that do not fit: one line, before any export work -------------------------------
@pytest.fixture(scope="module")
def tiny():
    from infiniteid.model.loading import tiny_components

    return tiny_components(0)


def bad_lora(kind: str, tiny, folder):
    if kind == "sd15":  # cross-attention keys and values of width 768, as SD 1.5 LoRAs have
        sd = kohya_lora(tiny.unet, seed=3)
        for k in [k for k in sd if k.endswith(("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight"))]:
            sd[k] = torch.randn(sd[k].shape[0], 768)
        return save_lora(sd, folder / "sd15_style.safetensors")
    if kind == "blocks":  # a deeper U-Net's blocks
        sd = peft_lora(tiny.unet, seed=3)
        name = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = torch.randn(4, 128), torch.randn(128, 4)
        return save_lora(sd, folder / "deeper.safetensors")
    if kind == "layout":  # an IP-Adapter file, not a LoRA
        sd = {"image_proj.proj.weight": torch.randn(8, 8), "ip_adapter.1.to_k_ip.weight": torch.randn(8, 8)}
        return save_lora(sd, folder / "ip_adapter.safetensors")
    if kind == "truncated":
        p = save_lora(peft_lora(tiny.unet, seed=3), folder / "cut.safetensors")
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p
    if kind == "missing":
        return folder / "nowhere.safetensors"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("sd15", "sd15_style.safetensors: a LoRA for another model: 16 of "),
        ("blocks", "'down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q' is not in it"),
        ("layout", "ip_adapter.safetensors: unknown key layout (2 of 2 keys, e.g. 'image_proj.proj.weight'"),
        ("truncated", "cut.safetensors is not a readable .safetensors file (truncated or corrupt?)"),
        ("missing", "--lora: LoRA file not found: "),
    ],
)
def test_a_lora_that_does_not_fit_is_one_line_before_any_export(kind, message, tiny, tmp_path, capsys):
    lora = bad_lora(kind, tiny, tmp_path)
    out = tmp_path / "bundle"
    assert main(["export", "--tiny", "--lora", str(lora), "--out", str(out), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert message in err
    if kind == "sd15":
        assert "maps 768 -> 64 features, the layer 64 -> 64" in err and "is it made for this base model?" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".bundle")]


def test_a_bad_file_in_the_list_leaves_the_weights_untouched(tiny, tmp_path):
    from infiniteid.model.loading import tiny_components
    from infiniteid.model.lora import LoraError, LoraSpec, fuse_loras

    c = tiny_components(0)
    good = save_lora(peft_lora(c.unet, seed=1), tmp_path / "good.safetensors")
    bad = bad_lora("sd15", tiny, tmp_path)
    with pytest.raises(LoraError, match="a LoRA for another model"):
        fuse_loras(c, [LoraSpec(good), LoraSpec(bad)])
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(c.unet.state_dict()[k], v), k
    assert c.loras == []


def test_pickled_lora_fuses_like_its_safetensors_twin(tiny, tmp_path):
    """A kohya ``.bin`` goes through the weights-only unpickler and fuses bit for bit like the
    same tensors in ``.safetensors``; a pickle that would run code is refused unrun."""
    from infiniteid.model.loading import tiny_components
    from infiniteid.model.lora import LoraError, LoraSpec, fuse_loras

    sd = kohya_lora(tiny.unet, seed=4, text_encoders=(tiny.text_encoder,))
    fused = []
    for path in (save_lora(sd, tmp_path / "k.safetensors"), save_lora(sd, tmp_path / "k.bin")):
        c = tiny_components(0)
        (rec,) = fuse_loras(c, [LoraSpec(path, 0.5)])
        assert rec.components == ["unet", "text_encoder"] and rec.sha256 == file_digest(path)
        fused.append({**c.unet.state_dict(), **{f"te.{k}": v for k, v in c.text_encoder.state_dict().items()}})
    changed = [k for k in fused[0] if not torch.equal(fused[0][k], {**tiny.unet.state_dict(), **{f"te.{k}": v for k, v in tiny.text_encoder.state_dict().items()}}[k])]
    assert len(changed) >= len(target_layers(tiny.unet)) + 18
    for k in fused[0]:
        assert torch.equal(fused[0][k], fused[1][k]), k

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "x": Payload()}, str(evil))
    with pytest.raises(LoraError, match="refused by the safe unpickler"):
        fuse_loras(tiny_components(0), [LoraSpec(evil)])


@pytest.mark.parametrize(
    "text, path, scale",
    [("style.safetensors", "style.safetensors", 1.0), ("style.safetensors:0.8", "style.safetensors", 0.8),
     ("loras/a:b.safetensors", "loras/a:b.safetensors", 1.0), ("C:\\loras\\x.safetensors:-1", "C:\\loras\\x.safetensors", -1.0)],
)
def test_lora_argument_parsing(text, path, scale):
    from pathlib import Path

    from infiniteid.model.lora import LoraSpec

    assert LoraSpec.parse(text) == LoraSpec(Path(path), scale)


@pytest.mark.parametrize(
    "value, message",
    [
        ("sideways", "--scheduler-config: 'sideways' is neither a timestep spacing (trailing, leading, linspace) nor a file"),
        ('{"timestep_spacing": "uniform"}', "--scheduler-config: unsupported timestep_spacing 'uniform'"),
        ('{"steps_offset": "one"}', "--scheduler-config: steps_offset must be int, got 'one'"),
        ("[1, 2]", "must hold a JSON object of scheduler config keys"),
        ("{oops", "is not valid JSON"),
    ],
)
def test_bad_scheduler_config_is_one_line(value, message, tmp_path, capsys):
    arg = value
    if value.startswith(("{", "[")):
        arg = str(tmp_path / "scheduler_config.json")
        (tmp_path / "scheduler_config.json").write_text(value)
    assert main(["export", "--tiny", "--scheduler-config", arg, "--out", str(tmp_path / "b"), "--no-progress"]) == 1
    assert message in one_line_error(capsys)
    assert not (tmp_path / "b").exists()


def test_generate_with_a_bundle_refuses_lora(tmp_path, capsys):
    (tmp_path / "f.png").write_bytes(b"")
    args = ["generate", "--bundle", str(tmp_path), "--face", str(tmp_path / "f.png"), "--prompt", "p", "--out", str(tmp_path / "o.png")]
    assert main(args + ["--lora", "x.safetensors"]) == 1
    assert "--lora only applies with --base; a bundle has its LoRAs fused at export" in one_line_error(capsys, "generate")


def test_help_shows_lora_and_scheduler_examples(capsys):
    for command in ("export", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--lora FILE[:SCALE]" in out and "--scheduler-config SPACING|FILE" in out
        assert "--scheduler-config trailing" in out  # the few-step example
        assert "\\\n      --lora " in out  # continued over lines as a shell would take it
