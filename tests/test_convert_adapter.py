"""Published adapter files: convert-adapter, adapter format versions, and the errors wrong files give."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infiniteid.cli import main
from infiniteid.model.adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from infiniteid.model.pipeline import InfiniteIDPipeline
from infiniteid.model.processors import install_processors
from infiniteid.model.weights_folder import save_weight_folders
from public_adapter_files import FILE_NAMES, write_public_adapter

CLIP_DIM = 32  # the tiny CLIP vision model's width


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    pipe = InfiniteIDPipeline.tiny(seed=0)
    return dict(root=root, weights=save_weight_folders(pipe.c, root / "weights"), unet=pipe.c.unet)


def load(world, adapter, **kw):
    w = world["weights"]
    return InfiniteIDPipeline.from_pretrained(w.base, w.image_encoder, adapter, **kw)


def cli_error(capsys, *argv) -> str:
    """Run the CLI, expect exit status 1 and one error line (no traceback) on stderr; return it.
    Weight loading may draw progress bars before it; those are not error lines."""
    capsys.readouterr()  # drop what earlier steps printed
    assert main(list(map(str, argv))) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("infiniteid ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", ["ip-adapter-faceid-plusv2", "ip-adapter-plus-face"])
def test_convert_adapter_equals_the_published_file(world, tmp_path, capsys, kind):
    src = write_public_adapter(tmp_path / "src", kind, world["unet"], CLIP_DIM, seed=5, lora=True, fmt="safetensors")
    out = tmp_path / "converted.safetensors"
    assert main(["convert-adapter", str(src), "--base", str(world["weights"].base), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tokens = 16 if kind == "ip-adapter-plus-face" else 4
    assert f"kind {kind}, {tokens} ID tokens of width 64" in printed and "wrote" in printed
    meta = safe_open(str(out), framework="pt").metadata()
    assert (meta["format_version"], meta["kind"]) == ("2", kind)
    assert meta["source"].startswith(f"{src.name} sha256:")
    assert read_adapter_config(out).kind == kind

    direct, converted = load(world, src), load(world, out)
    # Same U-Net weights (ID projections, and FaceID's LoRA fused into to_q/k/v/out), same mapper.
    a, b = direct.c.unet.state_dict(), converted.c.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load(world, world["weights"].adapter).c.unet.state_dict()
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(a[q], base[q]) == (kind == "ip-adapter-plus-face")  # plus-face files carry no LoRA
    ma, mb = direct.c.id_encoder.mapper, converted.c.id_encoder.mapper
    g = torch.Generator().manual_seed(0)
    face, clip = torch.randn(2, 512, generator=g), torch.randn(2, 5, CLIP_DIM, generator=g)
    assert ma.config == mb.config and torch.equal(ma(face, clip), mb(face, clip))
    assert tuple(ma(face, clip).shape) == (2, tokens, 64)

    # An existing --out is not replaced silently.
    err = cli_error(capsys, "convert-adapter", src, "--base", world["weights"].base, "--out", out)
    assert "exists; pass --overwrite" in err


def test_format_version_1_files_still_load(world, tmp_path):
    pipe = InfiniteIDPipeline.tiny(seed=1)
    v2 = tmp_path / "v2.safetensors"
    save_adapter(v2, pipe.c.id_encoder.mapper, pipe.c.unet)
    meta = safe_open(str(v2), framework="pt").metadata()
    assert (meta["format_version"], meta["kind"]) == ("2", "infiniteid")
    # A version-1 file as version 1 wrote it: no kind entry, no config keys added since.
    cfg = json.loads(meta["id_encoder"])
    del cfg["shortcut_scale"]
    v1_meta = {k: v for k, v in meta.items() if k != "kind"}
    v1_meta.update(format_version="1", id_encoder=json.dumps(cfg, sort_keys=True))
    v1 = tmp_path / "v1.safetensors"
    save_file(load_file(str(v2)), str(v1), metadata=v1_meta)
    unet = UNet2DConditionModel.from_config(pipe.c.unet.config)
    install_processors(unet)
    mapper = load_adapter(v1, unet)
    assert mapper.config == pipe.c.id_encoder.mapper.config
    for k, v in pipe.c.id_encoder.mapper.state_dict().items():
        assert torch.equal(mapper.state_dict()[k], v)
    save_file(load_file(str(v2)), str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(AdapterError, match="format version '9'; this version reads 1 and 2"):
        load_adapter(tmp_path / "v9.safetensors", unet)


def _sd15_like_unet():
    """A U-Net with SD 1.5's cross-attention width (768), on the meta device (only its layout is used)."""
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=768,
            attention_head_dim=2,
            norm_num_groups=8,
        )


def test_wrong_files_give_one_line_errors(world, tmp_path, capsys):
    w = world["weights"]
    base = w.base

    def convert_error(src, *extra):
        return cli_error(capsys, "convert-adapter", src, "--base", base, "--out", tmp_path / "o.safetensors", *extra)

    sd15 = write_public_adapter(tmp_path / "sd15", "ip-adapter-plus-face", _sd15_like_unet(), 768, seed=1)
    assert "made for cross-attention width 768 (an SD 1.5 adapter?); this U-Net has 64" in convert_error(sd15)
    with pytest.raises(AdapterError, match="cross-attention width 768"):
        load(world, sd15)

    good = write_public_adapter(tmp_path / "good", "ip-adapter-plus-face", world["unet"], CLIP_DIM, seed=1)
    data = good.read_bytes()
    cut = tmp_path / "cut" / good.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    assert "is not a readable torch file (truncated or corrupt?)" in convert_error(cut)
    st = write_public_adapter(tmp_path / "st", "ip-adapter-faceid", world["unet"], CLIP_DIM, seed=1, fmt="safetensors")
    st.write_bytes(st.read_bytes()[:-100])
    assert "is not a readable .safetensors file (truncated or corrupt?)" in convert_error(st)

    odd = tmp_path / "model.bin"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, odd)
    assert "unknown key layout, expected an IP-Adapter file with 'image_proj' and 'ip_adapter' groups" in convert_error(odd)

    # Another base with the same width: layer counts differ.
    tree = torch.load(good, weights_only=True)
    del tree["ip_adapter"]["1.to_k_ip.weight"], tree["ip_adapter"]["1.to_v_ip.weight"]
    fewer = tmp_path / "fewer" / good.name
    fewer.parent.mkdir()
    torch.save(tree, fewer)
    assert "has ID projections for 7 cross-attention layers, this U-Net has 8" in convert_error(fewer)

    # Kind vs file, kind vs image encoder.
    wrong_kind = "has the image_proj key layout of ip-adapter-plus-face, not of ip-adapter-faceid"
    assert wrong_kind in convert_error(good, "--kind", "ip-adapter-faceid")
    export = ("export", "--base", base, "--image-encoder", w.image_encoder, "--face-models", tmp_path, "--out", tmp_path / "b")
    assert wrong_kind in cli_error(capsys, *export, "--adapter", good, "--adapter-kind", "ip-adapter-faceid")
    wide = write_public_adapter(tmp_path / "wide", "ip-adapter-plus-face", world["unet"], 48, seed=1)
    with pytest.raises(AdapterError, match="expects CLIP image states of width 48, the image encoder .* gives 32"):
        load(world, wide)
    assert "expects CLIP image states of width 48" in cli_error(capsys, *export, "--adapter", wide)

    # FaceID-Plus v1 and v2 share a layout: a file whose name does not tell is not guessed.
    plus = write_public_adapter(tmp_path / "plus", "ip-adapter-faceid-plusv2", world["unet"], CLIP_DIM, seed=1)
    renamed = plus.with_name("faceid-plus.bin")
    plus.rename(renamed)
    assert "pass --kind ip-adapter-faceid-plusv2" in convert_error(renamed)
    v1 = load(world, renamed, kind="ip-adapter-faceid-plus").c.id_encoder.mapper
    v2 = load(world, renamed, kind="ip-adapter-faceid-plusv2").c.id_encoder.mapper
    face, clip = torch.randn(1, 512), torch.randn(1, 5, CLIP_DIM)
    x = v1.face_tokens(face)
    assert torch.allclose(v2(face, clip), x + v1(face, clip), atol=1e-6)  # the v2 shortcut, scale 1
    assert FILE_NAMES["ip-adapter-faceid-plusv2"] != renamed.name


def test_help_lists_kinds_and_examples():
    from infiniteid.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    text = sub["convert-adapter"].format_help()
    assert "infiniteid convert-adapter ~/models/ip-adapter-plus-face_sdxl_vit-h.bin" in text
    for kind in ("ip-adapter-plus-face", "ip-adapter-faceid-plusv2", "ip-adapter-faceid-plus", "ip-adapter-faceid"):
        assert kind in text
    export = sub["export"].format_help()
    assert "--adapter-kind" in export and "ip-adapter-plus-face_sdxl_vit-h.bin" in export
