"""Exporting one component to one ONNX graph: trace, clean up, fix the I/O, save.

The steps of :func:`export_component`:

1. wrap the component (:mod:`infiniteid.export.graphs`); for fp16, a half-precision
   *copy* of its module (the pipeline's own weights are never cast);
2. ``torch.onnx.export(..., dynamo=False)``: the TorchScript exporter traces
   diffusers' U-Net reliably at opset 17..20 and runs our processors as plain
   Python, so what it records is exactly the reference's arithmetic. Every
   symbolic dimension of the contract becomes a named dynamic axis;
3. onnxslim: constant folding, dead-node removal, operator fusion, shape inference
   (shape inference only below 2 GiB, see :func:`_slim`);
4. input and output names, order, dtypes and symbolic dims are checked against
   :mod:`infiniteid.contract` (the manifest is built from the same contract, so
   graph and manifest cannot disagree);
5. save; weights past ``external_data_threshold`` (2 GiB: protobuf's limit) go to
   ``<component>.onnx.data`` beside the graph; ``onnx.checker`` reads it back.

Intermediate files live in a scratch folder next to the output and are removed.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import onnx
import torch
import torch.nn as nn

from .. import contract as C
from ..bundle import ComponentSpec, file_digest
from ..generation import InvalidRequest
from .graphs import component_modules, wrap
from .model_info import ModelInfo, sample_inputs, tensor_specs, trace_symbols
from .options import TWO_GIB, ExportOptions

_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64}

# Dims that are symbolic in the contract but fixed by the model in one graph: the ID
# encoder always gives one identity's T_id tokens (mixing happens after it).
_FIXED_BY_MODEL = {(C.ID_ENCODER, "id_tokens")}


def export_component(
    pipeline: Any,
    name: str,
    path: Union[str, Path],
    options: Optional[ExportOptions] = None,
    *,
    root: Optional[Union[str, Path]] = None,
    info: Optional[ModelInfo] = None,
) -> ComponentSpec:
    """Export component ``name`` of ``pipeline`` to the ONNX file ``path``.

    Returns its manifest entry; file names in it are relative to ``root`` (default:
    the folder of ``path``). ``options`` are resolved against the model first, so an
    illegal resolution is refused before any work.
    """
    if name not in C.COMPONENTS:
        raise InvalidRequest(f"unknown component {name!r}; components are {', '.join(C.COMPONENTS)}")
    info = info or ModelInfo.from_pipeline(pipeline)
    opts = (options or ExportOptions()).resolve(info.resolution_multiple, info.default_size)
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    precision = opts.precision_of(name)
    inputs, outputs = tensor_specs(name, info, opts)

    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-export-", dir=path.parent))
    try:
        raw = scratch / f"{name}.onnx"
        with _export_module(name, component_modules(pipeline)[name], precision) as module:
            graph = wrap(name, module, mixed_attention=opts.mixed_attention, adain=opts.adain).eval()
            samples = sample_inputs(name, info, opts, trace_symbols(name, info, opts))
            _torch_export(graph, samples, raw, name, [t.name for t in outputs], opts)
        model = onnx.load(str(raw))  # pulls in external data the exporter may have written
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plugin = _attention_plugin(opts, name)
    if plugin is not None:
        plugin.add_function_bodies(model)

    if opts.slim:
        model = _slim(model)
    _conform_io(model, name, inputs, outputs, str(path))
    external = _save(model, path, opts.external_data_threshold)
    del model
    if opts.check:
        onnx.checker.check_model(str(path))
    data = path.with_name(path.name + ".data") if external else None
    return ComponentSpec(
        name=name,
        file=path.relative_to(root).as_posix(),
        precision=precision,
        sha256=file_digest(path),
        inputs=inputs,
        outputs=outputs,
        external_data=data.relative_to(root).as_posix() if data else None,
        options=opts.graph_options(name),
        size=path.stat().st_size,
        external_sha256=file_digest(data) if data else None,
        external_size=data.stat().st_size if data else 0,
    )


@contextlib.contextmanager
def _export_module(name: str, module: nn.Module, precision: str) -> Iterator[nn.Module]:
    """The module to trace: itself for fp32, a half-precision copy for fp16.

    Exporting a model cast to half (PyTorch runs fp16 on the CPU) gives a graph whose
    weights and arithmetic are fp16 as the exporter knows them, with the fp32 islands
    the model itself asks for (e.g. the timestep embedding's ``.float()``), which a
    blanket ONNX float16 rewrite would not know about.

    The fp16 text encoders trace with transformers' eager attention: the TorchScript
    exporter writes causal SDPA with an fp32 mask, and its type promotion then
    casts the whole residual stream to fp32, leaving LayerNorms with mixed fp16/fp32
    inputs that onnxruntime refuses. Eager attention builds the causal mask in the
    model's dtype; the arithmetic is the same.
    """
    if precision == "fp32":
        p = next(module.parameters())
        if p.dtype != torch.float32:
            raise InvalidRequest(f"an fp32 export needs fp32 weights; the pipeline holds {p.dtype}")
        yield module
        return
    half = _quietly(lambda: copy.deepcopy(module).to(torch.float16).eval())
    if name in (C.TEXT_ENCODER, C.TEXT_ENCODER_2):
        _eager_attention(half)
    try:
        yield half
    finally:
        del half


def _quietly(fn):
    """Run ``fn`` with diffusers' logger silenced (it warns on every dtype cast of a model)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return fn()
    finally:
        dlog.set_verbosity(level)


def _eager_attention(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers choose the attention class from the config at build time
        model.config._attn_implementation = "eager"


def _dynamic_axes(name: str, inputs, outputs) -> Dict[str, Dict[int, str]]:
    axes: Dict[str, Dict[int, str]] = {}
    for t in list(inputs) + list(outputs):
        dims = {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and (name, d) not in _FIXED_BY_MODEL}
        if dims:
            axes[t.name] = dims
    return axes


def _attention_plugin(opts: ExportOptions, name: str):
    """The optional mixed-attention custom node (``opts.attention_plugin``), or ``None``.

    :mod:`infiniteid.kernels.onnx_op` provides ``attention_plugin()`` (a context in
    which mixed attention traces as one ``infiniteid::MixedAttention`` node, which the
    TensorRT build maps to the Triton kernel's plugin), ``CUSTOM_OPSETS`` for the
    exporter, and ``add_function_bodies`` (the node's definition in plain ONNX ops, so
    onnxruntime runs the same file). Without that module the option is refused,
    never silently ignored.
    """
    if not (opts.attention_plugin and name == C.UNET):
        return None
    try:
        from ..kernels import onnx_op
    except ImportError:
        raise InvalidRequest(
            "attention_plugin needs infiniteid.kernels.onnx_op (the mixed-attention custom node), "
            "which this installation does not have; export without it"
        ) from None
    return onnx_op


def _torch_export(graph: nn.Module, samples: Dict[str, torch.Tensor], out: Path, name: str, output_names: List[str], opts: ExportOptions) -> None:
    contract = _contract_tensors(name)
    device = next(graph.parameters()).device  # trace where the model lives (a GPU is much faster for SDXL)
    samples = {k: v.to(device) for k, v in samples.items()}
    plugin = _attention_plugin(opts, name)
    context = plugin.attention_plugin() if plugin else contextlib.nullcontext()
    with torch.no_grad(), context, warnings.catch_warnings():
        # The tracer warns about every Python-level shape check in diffusers and
        # transformers; they are asserts and contiguity hints, not branches we rely on
        # (the parity tests at unseen shapes are what prove the graph general).
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            graph,
            tuple(samples.values()),
            str(out),
            input_names=list(samples),
            output_names=output_names,
            dynamic_axes=_dynamic_axes(name, contract.inputs, contract.outputs),
            opset_version=opts.opset,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets=plugin.CUSTOM_OPSETS if plugin else None,
        )


def _contract_tensors(name: str) -> C.ComponentContract:
    """Names and symbolic shapes only (widths do not matter here)."""
    return C.contracts(text_hidden=1, text_hidden_2=1, pooled_dim=1, cross_attention_dim=1, clip_image_size=1)[name]


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's clean-up. Past 2 GiB its shape inference serialises the model, which
    protobuf cannot do, so big graphs are slimmed without it (folding and fusion still
    run; TensorRT and onnxruntime infer shapes themselves)."""
    import onnxslim

    big = _initializer_bytes(model) >= TWO_GIB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnxslim.slim(model, no_shape_infer=big)


def _conform_io(model: onnx.ModelProto, name: str, inputs, outputs, where: str) -> None:
    """Check the graph's inputs and outputs against the specs; write the contract's
    symbolic dim names into them (tools may have renamed or dropped them)."""
    g = model.graph
    initializers = {t.name for t in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in initializers]
    for kind, have, want in (("inputs", graph_inputs, inputs), ("outputs", list(g.output), outputs)):
        if [v.name for v in have] != [t.name for t in want]:
            raise RuntimeError(
                f"{where}: {name} graph {kind} are {[v.name for v in have]}, the contract says {[t.name for t in want]}"
            )
        for v, t in zip(have, want):
            tt = v.type.tensor_type
            if tt.elem_type != _ONNX_TYPES[t.dtype]:
                raise RuntimeError(
                    f"{where}: {name} tensor {t.name!r} has ONNX type {onnx.TensorProto.DataType.Name(tt.elem_type)}, "
                    f"expected {t.dtype}"
                )
            dims = tt.shape.dim
            if len(dims) != len(t.shape):
                raise RuntimeError(f"{where}: {name} tensor {t.name!r} has rank {len(dims)}, expected {len(t.shape)}")
            for d, want_d in zip(dims, t.shape):
                if isinstance(want_d, int) or (name, want_d) in _FIXED_BY_MODEL:
                    size = want_d if isinstance(want_d, int) else t.min[list(t.shape).index(want_d)]
                    if d.HasField("dim_value") and d.dim_value != size:
                        raise RuntimeError(f"{where}: {name} tensor {t.name!r} has a dim {d.dim_value}, expected {size}")
                    d.dim_value = size
                else:
                    d.dim_param = want_d


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path, threshold: int) -> bool:
    """Save; ``True`` when the weights went to ``<file>.data`` (past ``threshold`` bytes)."""
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    external = _initializer_bytes(model) > threshold
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return external
