"""Mixed attention as one custom ONNX node, ``infiniteid::MixedAttention``.

Why: TensorRT maps an ONNX node whose op type has no built-in importer (and that
carries a ``plugin_namespace`` attribute) to a registered plugin of that name, so
this node becomes the Triton kernel inside an engine (:mod:`.trt_plugin`). Other
runtimes get an ONNX *function body* for the same node (:func:`add_function_bodies`):
onnxruntime inlines model-local functions, so the very same file runs on a CPU.

The node (domain ``infiniteid``, version 1):

* inputs ``q, k, v``: ``(B, H, N, D)``, batch ``[text; ID]`` (see :mod:`infiniteid.layout`);
  ``delta``: ``(B/2, H, 2, D)`` float32, ``[mean(K_t) - mean(K_id), mean(V_t) - mean(V_id)]``
  (ordinary ONNX ops in front of the node compute it: see :func:`infiniteid.kernels.fold.mean_delta`);
* attributes ``adain`` (int 0/1), ``scale`` (float), ``plugin_namespace`` (string,
  read by TensorRT's parser), ``plugin_version`` (string);
* output like ``q``: mixed attention of the ID rows, plain attention of the text rows.

How the export uses it::

    from infiniteid.kernels.onnx_op import attention_plugin, add_function_bodies, CUSTOM_OPSETS
    with attention_plugin():
        torch.onnx.export(unet, args, path, dynamo=False, custom_opsets=CUSTOM_OPSETS, ...)
    model = onnx.load(path); add_function_bodies(model); onnx.save(model, path)

Inside :func:`attention_plugin`, :func:`infiniteid.kernels.mixed_attention` (what
``MixedSelfAttnProcessor`` calls) emits the node. The TorchScript exporter
(``dynamo=False``) picks up the symbolic registered here; the dynamo exporter needs
``custom_translation_table=custom_translation_table()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Dict, Iterator, Optional

import torch

from .fold import mean_delta, mixed_attention_fold

DOMAIN = "infiniteid"
OP_TYPE = "MixedAttention"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
#: The node's ``aot`` attribute: TensorRT's parser then asks for the AOT implementation
#: (``STRICT_AOT``), so a JIT implementation added later cannot make parsing ambiguous.
PLUGIN_AOT = 1
#: pass as ``torch.onnx.export(..., custom_opsets=CUSTOM_OPSETS)``
CUSTOM_OPSETS = {DOMAIN: DOMAIN_VERSION}

_PLUGIN_EXPORT: contextvars.ContextVar[bool] = contextvars.ContextVar("infiniteid_attention_plugin", default=False)


@contextlib.contextmanager
def attention_plugin(enabled: bool = True) -> Iterator[None]:
    """Within this block, mixed attention is exported as the ``infiniteid::MixedAttention`` node."""
    token = _PLUGIN_EXPORT.set(bool(enabled))
    try:
        yield
    finally:
        _PLUGIN_EXPORT.reset(token)


@torch.compiler.assume_constant_result
def plugin_export_enabled() -> bool:
    """Whether :func:`attention_plugin` is active. A compiler tracing the U-Net (torch.compile,
    torch.export) reads it once as a constant instead of breaking the graph on the ContextVar."""
    return _PLUGIN_EXPORT.get()


# ----------------------------------------------------------------------------
# the torch-side operator that the exporters see
# ----------------------------------------------------------------------------
@torch.library.custom_op("infiniteid::mixed_attention", mutates_args=())
def _mixed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, adain: bool, scale: float
) -> torch.Tensor:
    return mixed_attention_fold(q, k, v, adain=adain, scale=scale, delta=delta)


@_mixed_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, adain: bool, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def plugin_node(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, adain: bool = True, scale: Optional[float] = None
) -> torch.Tensor:
    """Mixed attention through the custom operator (exported as one node plus the delta ops)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    delta = mean_delta(k, v, dtype=torch.float32)
    return torch.ops.infiniteid.mixed_attention(q, k, v, delta, bool(adain), float(scale))


def _symbolic(g, q, k, v, delta, adain, scale):  # TorchScript exporter (dynamo=False)
    from torch.onnx import symbolic_helper

    adain_c = symbolic_helper._maybe_get_const(adain, "b")
    scale_c = symbolic_helper._maybe_get_const(scale, "f")
    if symbolic_helper._is_value(adain_c) or symbolic_helper._is_value(scale_c):
        raise RuntimeError("infiniteid::mixed_attention needs constant adain and scale to export")
    out = g.op(
        f"{DOMAIN}::{OP_TYPE}", q, k, v, delta,
        adain_i=int(bool(adain_c)), scale_f=float(scale_c),
        plugin_namespace_s=DOMAIN, plugin_version_s=PLUGIN_VERSION, aot_i=PLUGIN_AOT,
    )
    out.setType(q.type())
    return out


torch.onnx.register_custom_op_symbolic("infiniteid::mixed_attention", _symbolic, 1)


def custom_translation_table() -> Dict[Callable, Callable]:
    """For the dynamo exporter: ``torch.onnx.export(..., custom_translation_table=...)``."""
    import onnxscript

    node = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPE, op_schema=op_schema())

    def translate(q, k, v, delta, adain: bool, scale: float):
        return node(
            q, k, v, delta, adain=int(bool(adain)), scale=float(scale),
            plugin_namespace=DOMAIN, plugin_version=PLUGIN_VERSION, aot=PLUGIN_AOT,
        )

    return {torch.ops.infiniteid.mixed_attention.default: translate}


def op_schema():
    """The node's ``onnx.defs.OpSchema`` (the dynamo exporter builds nodes from schemas)."""
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        doc="Infinite-ID mixed self-attention of a two-stream batch [text; ID].",
        inputs=[
            OpSchema.FormalParameter("q", "T"),
            OpSchema.FormalParameter("k", "T"),
            OpSchema.FormalParameter("v", "T"),
            OpSchema.FormalParameter("delta", "tensor(float)"),
        ],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", floats, "q, k, v and the output share one float type")],
        attributes=[
            OpSchema.Attribute("adain", OpSchema.AttrType.INT, "1: AdaIN-mean on"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
            OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: TensorRT takes the AOT implementation"),
        ],
    )


# ----------------------------------------------------------------------------
# ONNX function body (runs the node on onnxruntime or any other ONNX runtime)
# ----------------------------------------------------------------------------
def _default_opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("model imports no default-domain opset")


def function_proto(opset: int):
    """``infiniteid::MixedAttention`` as an ONNX function over default-domain ops (opset >= 15).

    Written with explicit concatenation, like the reference: the text half attends
    to its own keys, the ID half to ``[K_id + adain*dk; K_t]`` / ``[V_id + adain*dv; V_t]``.
    """
    import onnx
    from onnx import TensorProto, helper

    if opset < 15:
        raise ValueError(f"the MixedAttention function body needs opset >= 15 (CastLike), got {opset}")

    def const(name: str, values, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    def attr_const(name: str, attr: str, kind) -> onnx.NodeProto:
        node = helper.make_node("Constant", [], [name])
        ref = onnx.AttributeProto()
        ref.name = "value_float" if kind == onnx.AttributeProto.FLOAT else "value_int"
        ref.ref_attr_name = attr
        ref.type = kind
        node.attribute.append(ref)
        return node

    def attend(prefix: str, qq: str, kk: str, vv: str, out: str) -> list:
        return [
            helper.make_node("Transpose", [kk], [f"{prefix}_kT"], perm=[0, 1, 3, 2]),
            helper.make_node("Mul", [qq, "scale_q"], [f"{prefix}_qs"]),
            helper.make_node("MatMul", [f"{prefix}_qs", f"{prefix}_kT"], [f"{prefix}_s"]),
            helper.make_node("Softmax", [f"{prefix}_s"], [f"{prefix}_p"], axis=-1),
            helper.make_node("MatMul", [f"{prefix}_p", vv], [out]),
        ]

    nodes = [
        # pairs = B / 2; split every input into its text and ID halves
        const("i0", [0]), const("i1", [1]), const("i2", [2]), const("ax2", [2]),
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Gather", ["q_shape", "i0"], ["batch"], axis=0),
        helper.make_node("Div", ["batch", "i2"], ["pairs"]),
        helper.make_node("Concat", ["pairs", "pairs"], ["halves"], axis=0),
        helper.make_node("Split", ["q", "halves"], ["q_t", "q_id"], axis=0),
        helper.make_node("Split", ["k", "halves"], ["k_t", "k_id"], axis=0),
        helper.make_node("Split", ["v", "halves"], ["v_t", "v_id"], axis=0),
        # AdaIN-mean shift of the ID keys/values: + adain * delta
        attr_const("scale_c", "scale", onnx.AttributeProto.FLOAT),
        helper.make_node("CastLike", ["scale_c", "q"], ["scale_q"]),
        attr_const("adain_c", "adain", onnx.AttributeProto.INT),
        helper.make_node("CastLike", ["adain_c", "q"], ["adain_q"]),
        helper.make_node("CastLike", ["delta", "q"], ["delta_q"]),
        helper.make_node("Mul", ["delta_q", "adain_q"], ["delta_on"]),
        helper.make_node("Slice", ["delta_on", "i0", "i1", "ax2"], ["dk"]),
        helper.make_node("Slice", ["delta_on", "i1", "i2", "ax2"], ["dv"]),
        helper.make_node("Add", ["k_id", "dk"], ["k_id_shift"]),
        helper.make_node("Add", ["v_id", "dv"], ["v_id_shift"]),
        helper.make_node("Concat", ["k_id_shift", "k_t"], ["k_mix"], axis=2),
        helper.make_node("Concat", ["v_id_shift", "v_t"], ["v_mix"], axis=2),
    ]
    nodes += attend("text", "q_t", "k_t", "v_t", "out_t")
    nodes += attend("ident", "q_id", "k_mix", "v_mix", "out_id")
    nodes.append(helper.make_node("Concat", ["out_t", "out_id"], ["out"], axis=0))

    fn = helper.make_function(
        DOMAIN, OP_TYPE, ["q", "k", "v", "delta"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["adain", "scale", "plugin_namespace", "plugin_version", "aot"],
    )
    return fn


def has_plugin_nodes(model) -> bool:
    """Whether the graph holds ``infiniteid::MixedAttention`` nodes (top level)."""
    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.node)


def add_function_bodies(model):
    """Add the ``MixedAttention`` function body to ``model`` (in place; returns it).

    Idempotent; also makes sure the model imports the ``infiniteid`` domain. A model
    without plugin nodes is left unchanged.
    """
    from onnx import helper

    if not has_plugin_nodes(model):
        return model
    opset = _default_opset(model)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept + [function_proto(opset)])
    if not any(imp.domain == DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def strip_function_bodies(model):
    """Remove the ``MixedAttention`` function body (in place; returns it).

    TensorRT's ONNX parser prefers a local function over a plugin in some
    versions; a model without the body always maps the node to the plugin.
    """
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    return model
