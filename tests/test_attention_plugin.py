"""The ``infiniteid::MixedAttention`` ONNX node: export, function body, onnxruntime parity.

The plugin-mode U-Net (one custom node per ``attn1``, plus the ops computing
``delta``) must run on onnxruntime through the node's function body and equal the
plain export (mixed attention as ordinary ops) at shapes it was not traced at.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from infiniteid.kernels import mixed_attention
from infiniteid.kernels.onnx_op import (
    CUSTOM_OPSETS,
    DOMAIN,
    OP_TYPE,
    add_function_bodies,
    attention_plugin,
    function_proto,
    has_plugin_nodes,
    plugin_export_enabled,
    strip_function_bodies,
)
from infiniteid.kernels.reference import mixed_attention_math
from infiniteid.model.processors import KWARG, IDConditioning, MixedSelfAttnProcessor
from infiniteid.model.tiny import TinySizes, tiny_unet
from infiniteid.model.processors import install_processors

OPSET = 17


def run_ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def export(module, args, names, axes, plugin: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    with attention_plugin(plugin), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, dynamo=False, opset_version=OPSET, custom_opsets=CUSTOM_OPSETS,
            input_names=names, output_names=["out"], dynamic_axes=axes,
        )
    return onnx.load_from_string(buf.getvalue())


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


class Attn(torch.nn.Module):
    """Just mixed attention, for focused checks of the node."""

    def __init__(self, adain: bool, scale=None):
        super().__init__()
        self.adain, self.scale = adain, scale

    def forward(self, q, k, v):
        return mixed_attention(q, k, v, adain=self.adain, scale=self.scale, backend="torch")


def qkv(seed, b, h, n, d):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen) + 2 * torch.randn(b, h, 1, d, generator=gen) for _ in range(3)]


AXES = {name: {0: "batch", 2: "tokens"} for name in ("q", "k", "v")}


@pytest.mark.parametrize("adain", [True, False])
def test_node_and_function_body_match_the_reference(adain):
    model = export(Attn(adain, scale=0.21), tuple(qkv(0, 4, 2, 33, 16)), ["q", "k", "v"], AXES, plugin=True)
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == 1 and nodes[0].domain == DOMAIN and list(nodes[0].input)[:3] == ["q", "k", "v"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["adain"] == int(adain) and attrs["scale"] == pytest.approx(0.21)
    assert attrs["plugin_namespace"] == b"infiniteid" and attrs["plugin_version"] == b"1"
    assert attrs["aot"] == 1  # TensorRT's parser takes the AOT implementation (STRICT_AOT)
    add_function_bodies(model)
    onnx.checker.check_model(model, full_check=True)
    for seed, (b, n) in enumerate([(4, 77), (8, 100), (2, 5)]):  # unseen batch sizes and token counts
        q, k, v = qkv(seed + 10, b, 2, n, 16)
        got = run_ort(model, {"q": q, "k": k, "v": v})
        want = mixed_attention_math(q.double(), k.double(), v.double(), adain=adain, scale=0.21).numpy()
        assert rel(got, want) < 1e-5


def test_function_body_helpers():
    model = export(Attn(True), tuple(qkv(1, 4, 1, 9, 16)), ["q", "k", "v"], AXES, plugin=True)
    assert has_plugin_nodes(model) and len(model.functions) == 0
    add_function_bodies(model)
    add_function_bodies(model)  # idempotent
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    assert any(i.domain == DOMAIN and i.version == 1 for i in model.opset_import)
    strip_function_bodies(model)
    assert len(model.functions) == 0 and has_plugin_nodes(model)
    plain = export(Attn(True), tuple(qkv(1, 4, 1, 9, 16)), ["q", "k", "v"], AXES, plugin=False)
    assert not has_plugin_nodes(plain)
    assert len(add_function_bodies(plain).functions) == 0  # nothing to add
    with pytest.raises(ValueError, match="opset >= 15"):
        function_proto(13)


def test_attention_plugin_context_is_scoped():
    assert not plugin_export_enabled()
    with attention_plugin():
        assert plugin_export_enabled()
        with attention_plugin(False):
            assert not plugin_export_enabled()
        assert plugin_export_enabled()
    assert not plugin_export_enabled()


def test_eager_call_inside_the_context_still_computes_mixed_attention():
    q, k, v = qkv(2, 4, 2, 20, 16)
    with attention_plugin():
        got = mixed_attention(q, k, v, adain=True)
    want = mixed_attention_math(q.double(), k.double(), v.double(), adain=True)
    assert rel(got.numpy(), want.numpy()) < 1e-5


class UNetStep(torch.nn.Module):
    """One two-stream U-Net call, the inputs the export traces."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, id_embeds):
        cond = IDConditioning(id_embeds=id_embeds, mixed_attention=True, adain=True)
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            cross_attention_kwargs={KWARG: cond},
        ).sample


def unet_inputs(seed: int, images: int, h: int, w: int, sizes: TinySizes) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch = 4 * images  # two streams x (uncond, cond)
    return {
        "sample": torch.randn(batch, 4, h, w, generator=gen),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 7, sizes.cross_attention_dim, generator=gen),
        "text_embeds": torch.randn(batch, sizes.pooled, generator=gen),
        "time_ids": torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]]).expand(batch, 6).contiguous(),
        "id_embeds": torch.randn(batch // 2, 5, sizes.cross_attention_dim, generator=gen),
    }


@pytest.mark.slow
def test_tiny_unet_plugin_export_runs_on_onnxruntime_and_equals_plain_export():
    sizes = TinySizes()
    torch.manual_seed(0)
    unet = tiny_unet(sizes)
    install_processors(unet)
    n_attn1 = sum(isinstance(p, MixedSelfAttnProcessor) for p in unet.attn_processors.values())
    step = UNetStep(unet).eval()
    sample = unet_inputs(0, 1, 12, 20, sizes)
    names = list(sample)
    axes = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "encoder_hidden_states": {0: "batch"},
        "text_embeds": {0: "batch"},
        "time_ids": {0: "batch"},
        "id_embeds": {0: "pairs"},
    }
    plain = export(step, tuple(sample.values()), names, axes, plugin=False)
    plugin = export(step, tuple(sample.values()), names, axes, plugin=True)
    assert not has_plugin_nodes(plain)
    assert sum(n.op_type == OP_TYPE for n in plugin.graph.node) == n_attn1 > 0
    add_function_bodies(plugin)
    onnx.checker.check_model(plugin)
    for seed, (images, h, w) in enumerate([(1, 12, 20), (2, 10, 14)]):  # traced shape, then an unseen one
        feeds = unet_inputs(seed + 1, images, h, w, sizes)
        a = run_ort(plain, feeds)
        b = run_ort(plugin, feeds)
        with torch.no_grad():
            ref = step(*feeds.values()).double().numpy()
        assert rel(b, a) < 1e-5
        assert rel(b, ref) < 1e-5


@pytest.mark.slow
def test_dynamo_export_emits_the_node_too():
    from infiniteid.kernels.onnx_op import custom_translation_table

    q, k, v = qkv(3, 4, 2, 24, 16)
    with attention_plugin(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            Attn(True, scale=0.25), (q, k, v), dynamo=True, opset_version=18,
            custom_translation_table=custom_translation_table(), input_names=["q", "k", "v"],
        )
    model = prog.model_proto
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    assert len(nodes) == 1
    assert {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}["aot"] == 1
    add_function_bodies(model)
    got = run_ort(model, {"q": q, "k": k, "v": v})
    want = mixed_attention_math(q.double(), k.double(), v.double(), adain=True, scale=0.25).numpy()
    assert rel(got, want) < 1e-5
