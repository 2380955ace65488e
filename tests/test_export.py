"""ONNX export of every component: parity with the PyTorch reference on onnxruntime.

Relative error, everywhere in this file: ``max|a - b| / max|b|`` with ``b`` the
PyTorch fp32 reference (one number per tensor; scale-free, so one bound serves
latents, hidden states and images alike).

Bounds:

* fp32 graphs: < 1e-4. The graph does the reference's arithmetic in the same
  precision; what differs is summation order and fused kernels (ORT vs ATen),
  a few fp32 ulps per op: observed 3e-7 (encoders) .. 1e-6 (U-Net) .. 2.3e-6 (VAE).
* fp16 graphs: < 1e-2. Every op rounds its output to fp16 (unit roundoff
  2^-11 = 4.9e-4); rounding errors add along the graph's depth while the
  normalisations (LayerNorm, GroupNorm) keep activations at unit scale, so the
  error grows roughly with the number of roundings on a path, not geometrically.
  Observed on the tiny model (inputs rounded to fp16 too): 6e-4 (ID encoder),
  8e-4..1.0e-3 (text encoders), 8e-4..1.1e-3 (U-Net), 1.2e-3..1.5e-3 (VAE).
  1e-2 (about 20 roundings' worth) leaves margin for other CPUs' summation
  orders without hiding a wrong graph, which shows up as O(1e-1..1) error.

Every check runs at shapes the export never traced (the tracer saw 2 images,
U-Net batch 4, a 64x80 image and one identity's 21 ID tokens): other batch
sizes, other resolutions, and mixed identities (twice the tokens).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from infiniteid.contract import COMPONENTS
from infiniteid.export import ExportOptions, ModelInfo, export_component
from infiniteid.export.model_info import trace_symbols
from infiniteid.generation import InvalidRequest
from infiniteid.imageproc import clip_pixels
from infiniteid.layout import BatchLayout
from infiniteid.model.pipeline import InfiniteIDPipeline
from infiniteid.model.processors import INFERENCE, KWARG, IDConditioning, IDCrossAttnProcessor, MixedSelfAttnProcessor

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|``, ``b`` the reference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pipe() -> InfiniteIDPipeline:
    return InfiniteIDPipeline.tiny(0)


@pytest.fixture(scope="module")
def graphs(pipe, tmp_path_factory):
    """Export a component on first use, once per (name, precision, switches)."""
    root = tmp_path_factory.mktemp("graphs")
    cache: Dict[Tuple, Tuple[Path, object]] = {}

    def get(name: str, precision: str = "fp32", **kw):
        key = (name, precision, tuple(sorted(kw.items())))
        if key not in cache:
            opts = ExportOptions(precision=precision, vae_precision=precision, **kw)
            path = root / f"{len(cache)}" / f"{name}.onnx"
            spec = export_component(pipe, name, path, opts)
            cache[key] = (path, spec)
        return cache[key]

    return get


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(path: Path, feeds: Dict[str, np.ndarray], half: bool = False):
    feeds = {k: (v.astype(np.float16) if half and v.dtype == np.float32 else v) for k, v in feeds.items()}
    return [o.astype(np.float32) for o in session(path).run(None, feeds)]


# -- inputs and references ----------------------------------------------------------
PROMPT_SETS = [
    ["a photo of a woman"],
    ["", "an astronaut in the city at night in comic book style", "a red hat " * 40],  # empty, plain, truncated
    ["portrait", "a chef", "a knight", "a wizard", "sketch"],
]


def text_reference(pipe, prompts):
    embeds, pooled = pipe.encode_prompts(prompts)
    return embeds.numpy(), pooled.numpy()


def face_inputs(n: int, seed: int, size: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # ArcFace embeddings are L2-normalised
    images = rng.integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)
    from infiniteid.imageproc import ClipImageConfig

    pix = np.stack([clip_pixels(im, ClipImageConfig(size=size)) for im in images])
    return {"face_embeds": emb, "clip_pixels": pix}


def unet_inputs(images: int, cfg: bool, height: int, width: int, identities: int, seed: int) -> Dict[str, np.ndarray]:
    """Inputs of one two-stream U-Net call in the contract's layout."""
    layout = BatchLayout(images=images, cfg=cfg)
    rng = np.random.default_rng(seed)
    b, p = layout.batch, layout.pairs
    return {
        "sample": rng.standard_normal((b, 4, height // 8, width // 8)).astype(np.float32),
        "timestep": np.array([rng.integers(1, 1000)], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((b, 77, 64)).astype(np.float32),
        "text_embeds": rng.standard_normal((b, 32)).astype(np.float32),
        "time_ids": np.tile(np.array([height, width, 0, 0, height, width], np.float32), (b, 1)),
        "id_embeds": rng.standard_normal((p, 21 * identities, 64)).astype(np.float32),
        "id_scale": rng.uniform(0.5, 1.5, p).astype(np.float32),
    }


@torch.no_grad()
def unet_reference(pipe, feeds, mixed_attention=True, adain=True) -> np.ndarray:
    """What InfiniteIDPipeline.generate's U-Net call computes for these inputs."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    cond = IDConditioning(
        id_embeds=t["id_embeds"], id_scale=t["id_scale"], mixed_attention=mixed_attention, adain=adain, mode=INFERENCE
    )
    return pipe.c.unet(
        t["sample"],
        t["timestep"][0],
        encoder_hidden_states=t["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
        cross_attention_kwargs={KWARG: cond},
    ).sample.numpy()


@torch.no_grad()
def vae_reference(pipe, latent: np.ndarray) -> np.ndarray:
    vae = pipe.c.vae
    return vae.decode(torch.from_numpy(latent) / vae.config.scaling_factor).sample.numpy()


UNET_SHAPES = [  # (images, cfg, height, width, identities): none of them traced
    (2, True, 96, 128, 2),  # batch 8, mixed identities: 42 ID tokens
    (1, False, 128, 64, 1),  # batch 2 (no CFG)
    (1, True, 192, 192, 1),  # the largest declared resolution
]


# -- fp32 parity ----------------------------------------------------------------------
def test_trace_shapes_differ_from_the_tested_ones(pipe):
    info = ModelInfo.from_pipeline(pipe)
    opts = ExportOptions().resolve(info.resolution_multiple, info.default_size)
    sym = trace_symbols("unet", info, opts)
    assert (sym["batch"], sym["latent_height"], sym["latent_width"], sym["id_tokens"]) == (4, 8, 10, 21)
    assert sym["images"] == 2


@pytest.mark.parametrize("prompts", PROMPT_SETS, ids=["1", "3", "5"])
def test_text_encoders_match_encode_prompts(pipe, graphs, prompts):
    te1, _ = graphs("text_encoder")
    te2, _ = graphs("text_encoder_2")
    ids1, ids2 = pipe.c.tokenizer(prompts), pipe.c.tokenizer_2(prompts)
    (h1,) = run(te1, {"input_ids": ids1})
    h2, pooled = run(te2, {"input_ids": ids2})
    ref_embeds, ref_pooled = text_reference(pipe, prompts)
    assert h1.shape == (len(prompts), 77, 32) and pooled.shape == (len(prompts), 32)
    assert rel_err(np.concatenate([h1, h2], axis=-1), ref_embeds) < FP32_BOUND
    assert rel_err(pooled, ref_pooled) < FP32_BOUND


@pytest.mark.parametrize("n", [1, 3, 5])
def test_id_encoder_matches_reference(pipe, graphs, n):
    path, _ = graphs("id_encoder")
    feeds = face_inputs(n, seed=n, size=32)
    (got,) = run(path, feeds)
    with torch.no_grad():
        ref = pipe.c.id_encoder(torch.from_numpy(feeds["face_embeds"]), torch.from_numpy(feeds["clip_pixels"])).numpy()
    assert got.shape == (n, 21, 64)
    assert rel_err(got, ref) < FP32_BOUND


def test_id_encoder_gives_the_unconditional_identity_on_zeros(pipe, graphs):
    path, _ = graphs("id_encoder")
    (got,) = run(path, {"face_embeds": np.zeros((1, 512), np.float32), "clip_pixels": np.zeros((1, 3, 32, 32), np.float32)})
    assert rel_err(got[0], pipe.unconditional_identity().numpy()) < FP32_BOUND


@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (3, 4, 8, 12)])
def test_vae_decoder_divides_by_the_scaling_factor_and_matches(pipe, graphs, shape):
    path, spec = graphs("vae_decoder")
    latent = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    (got,) = run(path, {"latent": latent})
    assert got.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert rel_err(got, vae_reference(pipe, latent)) < FP32_BOUND
    assert spec.options["scaling_in_graph"] is True


@pytest.mark.slow
@pytest.mark.parametrize("shape", UNET_SHAPES, ids=["mixed-ids-b8", "no-cfg-b2", "max-res"])
def test_unet_matches_reference_at_unseen_shapes(pipe, graphs, shape):
    path, _ = graphs("unet")
    feeds = unet_inputs(*shape, seed=shape[2])
    (got,) = run(path, feeds)
    ref = unet_reference(pipe, feeds)
    assert got.shape == feeds["sample"].shape
    assert rel_err(got, ref) < FP32_BOUND


@pytest.mark.slow
@pytest.mark.parametrize("mixed, adain", [(False, True), (True, False)])
def test_unet_ablations_are_baked_in(pipe, graphs, mixed, adain):
    path, spec = graphs("unet", mixed_attention=mixed, adain=adain)
    assert spec.options["mixed_attention"] is mixed and spec.options["adain"] is adain
    feeds = unet_inputs(2, True, 96, 128, 2, seed=5)
    (got,) = run(path, feeds)
    assert rel_err(got, unet_reference(pipe, feeds, mixed_attention=mixed, adain=adain)) < FP32_BOUND
    # ...and the switch really changed the graph: the default export computes something else.
    (default,) = run(graphs("unet")[0], feeds)
    assert rel_err(got, default) > 1e-3


@pytest.mark.slow
def test_unet_graph_has_no_branches_and_keeps_our_processors(pipe, graphs):
    path, _ = graphs("unet")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"If", "Loop"}, "the ablation switches must constant-fold away"
    procs = pipe.c.unet.attn_processors.values()
    assert any(isinstance(p, MixedSelfAttnProcessor) for p in procs)
    assert any(isinstance(p, IDCrossAttnProcessor) for p in procs)


# -- the graphs' I/O is the manifest's --------------------------------------------------
@pytest.mark.parametrize("name", [c for c in COMPONENTS if c != "unet"])
def test_graph_io_matches_its_spec(graphs, name):
    path, spec = graphs(name)
    s = session(path)
    types = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}
    for have, want in ((s.get_inputs(), spec.inputs), (s.get_outputs(), spec.outputs)):
        assert [t.name for t in have] == [t.name for t in want]
        for h, w in zip(have, want):
            assert h.type == types[w.dtype]
            fixed_tokens = name == "id_encoder"  # one identity: T_id fixed by the model
            expect = [d if isinstance(d, str) and not (fixed_tokens and d == "id_tokens") else lo for d, lo in zip(w.shape, w.min)]
            assert list(h.shape) == expect
    assert spec.file == f"{name}.onnx" and spec.size == path.stat().st_size and spec.external_data is None


def test_text_encoder_2_declares_the_documented_ranges(graphs):
    _, spec = graphs("text_encoder_2")
    ids = spec.tensor("input_ids")
    assert (ids.min, ids.opt, ids.max) == ([1, 77], [2, 77], [8, 77])  # 1 .. 2*opt_batch .. 2*max_batch


# -- fp16 -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", PROMPT_SETS[:2], ids=["1", "3"])
def test_fp16_text_encoders_within_bound(pipe, graphs, prompts):
    te1, spec1 = graphs("text_encoder", "fp16")
    te2, _ = graphs("text_encoder_2", "fp16")
    assert spec1.precision == "fp16" and spec1.outputs[0].dtype == "float16" and spec1.inputs[0].dtype == "int64"
    (h1,) = run(te1, {"input_ids": pipe.c.tokenizer(prompts)})
    h2, pooled = run(te2, {"input_ids": pipe.c.tokenizer_2(prompts)})
    ref_embeds, ref_pooled = text_reference(pipe, prompts)
    assert rel_err(np.concatenate([h1, h2], -1), ref_embeds) < FP16_BOUND
    assert rel_err(pooled, ref_pooled) < FP16_BOUND


def test_fp16_id_encoder_within_bound(pipe, graphs):
    path, _ = graphs("id_encoder", "fp16")
    feeds = face_inputs(3, seed=9, size=32)
    (got,) = run(path, feeds, half=True)
    with torch.no_grad():
        ref = pipe.c.id_encoder(torch.from_numpy(feeds["face_embeds"]), torch.from_numpy(feeds["clip_pixels"])).numpy()
    assert rel_err(got, ref) < FP16_BOUND


def test_fp16_export_leaves_the_pipeline_fp32(pipe, graphs):
    path, _ = graphs("text_encoder_2", "fp16")
    assert next(pipe.c.text_encoder_2.parameters()).dtype == torch.float32
    assert pipe.c.text_encoder_2.config._attn_implementation == "sdpa"  # only the fp16 copy traced eagerly
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type in (1, 10)]
    half = sum(len(t.raw_data) for t in weights if t.data_type == 10)
    assert half / sum(len(t.raw_data) for t in weights) > 0.95, "weights of an fp16 graph are fp16"


def test_fp16_vae_on_request(pipe, graphs):
    path, spec = graphs("vae_decoder", "fp16")
    assert spec.precision == "fp16" and spec.inputs[0].dtype == "float16"
    latent = np.random.default_rng(3).standard_normal((2, 4, 12, 8)).astype(np.float32)
    (got,) = run(path, {"latent": latent}, half=True)
    assert rel_err(got, vae_reference(pipe, latent)) < FP16_BOUND


@pytest.mark.slow
@pytest.mark.parametrize("shape", UNET_SHAPES[:2], ids=["mixed-ids-b8", "no-cfg-b2"])
def test_fp16_unet_within_bound(pipe, graphs, shape):
    path, spec = graphs("unet", "fp16")
    assert {t.name: t.dtype for t in spec.inputs}["timestep"] == "float16"
    feeds = unet_inputs(*shape, seed=11)
    (got,) = run(path, feeds, half=True)
    assert rel_err(got, unet_reference(pipe, feeds)) < FP16_BOUND


# -- options ------------------------------------------------------------------------------
def test_external_data_past_the_threshold(pipe, tmp_path):
    path = tmp_path / "onnx" / "text_encoder.onnx"
    spec = export_component(pipe, "text_encoder", path, ExportOptions(external_data_threshold=0), root=tmp_path)
    data = tmp_path / "onnx" / "text_encoder.onnx.data"
    assert spec.file == "onnx/text_encoder.onnx" and spec.external_data == "onnx/text_encoder.onnx.data"
    assert data.is_file() and data.stat().st_size == spec.external_size > path.stat().st_size
    prompts = ["a photo of a man", "a dog"]
    ids = pipe.c.tokenizer(prompts)
    (h1,) = run(path, {"input_ids": ids})
    with torch.no_grad():
        ref = pipe.c.text_encoder(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2].numpy()
    assert rel_err(h1, ref) < FP32_BOUND
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"height": 100}, "height=100 is not a multiple of 16"),
        ({"width": 72}, "width=72 is not a multiple of 16"),
        ({"height": 256, "max_resolution": 192}, "height=256 is outside the supported range [64, 192]"),
        ({"min_resolution": 40}, "min resolution 40 is not a multiple of 16"),
        ({"min_resolution": 128, "max_resolution": 96}, "larger than max resolution"),
        ({"precision": "bf16"}, "precision must be one of fp32, fp16"),
        ({"opset": 21}, "opset must be an integer in [17, 20]"),
        ({"max_batch": 0}, "max batch must be a positive integer"),
        ({"opt_batch": 3, "max_batch": 2}, "opt batch 3 is larger than max batch 2"),
    ],
)
def test_illegal_options_are_refused_before_any_work(pipe, tmp_path, kw, message):
    with pytest.raises(InvalidRequest) as e:
        export_component(pipe, "vae_decoder", tmp_path / "x" / "vae_decoder.onnx", ExportOptions(**kw))
    assert message in str(e.value)
    assert not (tmp_path / "x").exists()


def test_resolution_defaults_follow_the_model():
    opts = ExportOptions().resolve(32, 1024)
    assert (opts.height, opts.width, opts.min_resolution, opts.max_resolution) == (1024, 1024, 512, 1536)
    opts = ExportOptions(height=2048, width=768).resolve(32, 1024)
    assert (opts.min_resolution, opts.max_resolution) == (512, 2048)  # the range widens to hold the optimum
    assert ExportOptions().resolve(16, 128).min_resolution == 64


@pytest.mark.slow
def test_attention_plugin_graph_runs_on_onnxruntime(pipe, graphs):
    path, spec = graphs("unet", attention_plugin=True)
    assert spec.options["attention_plugin"] is True
    model = onnx.load(str(path))
    assert any(n.op_type == "MixedAttention" and n.domain == "infiniteid" for n in model.graph.node)
    feeds = unet_inputs(2, True, 96, 128, 2, seed=7)
    (got,) = run(path, feeds)  # onnxruntime inlines the node's function body
    assert rel_err(got, unet_reference(pipe, feeds)) < FP32_BOUND


def test_unknown_component(pipe, tmp_path):
    with pytest.raises(InvalidRequest, match="unknown component 'vae'"):
        export_component(pipe, "vae", tmp_path / "vae.onnx")
