"""INT8 / FP8 quantization of the U-Net with nvidia-modelopt, and its QDQ ONNX export.

1. :func:`modelopt_config` turns a :class:`~.config.QuantConfig` into a modelopt
   config: ``INT8_SMOOTHQUANT_CFG`` (per-channel weights, per-tensor activations,
   SmoothQuant with our alpha) or ``FP8_DEFAULT_CFG`` (E4M3), with the layers NVIDIA's
   diffusers example keeps in high precision disabled by quantizer-name pattern;
2. :func:`quantize_unet` quantizes a *copy* of the pipeline's U-Net (the pipeline
   keeps its fp32 weights) with ``mtq.quantize``, calibrating on captured U-Net calls
   (:mod:`.capture`) fed through the export's own graph wrapper, so calibration sees
   exactly the inputs and processors the exported graph has. The result is modelopt's
   torch fake-quant model: the oracle the ONNX is checked against;
3. :func:`export_quantized_unet` exports it with the TorchScript exporter (the dynamo
   exporter fails on quantized models) through :func:`infiniteid.export.export_component`.
   INT8 comes out as standard ``QuantizeLinear``/``DequantizeLinear`` pairs. modelopt
   writes FP8 as TensorRT's ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear``;
   :func:`standard_fp8_qdq` rewrites them to the standard opset-19 float8 E4M3 Q/DQ
   (same scale convention), which TensorRT parses natively and onnxruntime runs.
   With ``ExportOptions(precision="fp16")`` the graph is fp16 around the Q/DQ pairs
   (scales in fp16, opset 19): the layers left unquantized run in fp16 on TensorRT,
   as in the fp16 engines the quantized ones are measured against.
   onnxslim is not run on QDQ graphs: constant folding would fold weight Q/DQ pairs away.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import onnx
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import contract as C
from ..bundle import ComponentSpec, file_digest
from ..export import ExportOptions, ModelInfo, export_component
from ..export.graphs import UNetGraph
from .capture import CaptureSet, unet_contract_names
from .config import CalibrationError, QuantConfig

FP8_OPSET = 19  # float8 (and float16-scaled) QuantizeLinear/DequantizeLinear are standard from opset 19


def _mtq():
    with warnings.catch_warnings():  # modelopt warns that it has not been tested with this transformers
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def modelopt_config(qc: QuantConfig) -> Dict[str, Any]:
    """The modelopt quantization config for ``qc``."""
    mtq = _mtq()
    qc.validate()
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG if qc.precision == "int8" else mtq.FP8_DEFAULT_CFG)
    if qc.precision == "int8":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": float(qc.alpha)}
    for pattern in qc.disabled_patterns():
        cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
    return cfg


def _tensors(call: Dict[str, np.ndarray], device: torch.device) -> list:
    return [torch.from_numpy(np.ascontiguousarray(call[n])).to(device) for n in unet_contract_names()]


def quantize_unet(
    unet: nn.Module,
    capture: CaptureSet,
    qc: QuantConfig,
    *,
    mixed_attention: bool = True,
    adain: bool = True,
    progress: bool = True,
) -> nn.Module:
    """A quantized copy of ``unet`` (modelopt fake-quant), calibrated on ``capture``."""
    qc.validate()
    if len(capture) == 0:
        raise CalibrationError(f"{capture.folder}: the capture holds no U-Net calls")
    mtq = _mtq()
    device = next(unet.parameters()).device
    graph = UNetGraph(copy.deepcopy(unet).float(), mixed_attention=mixed_attention, adain=adain).eval()
    n = min(len(capture), qc.calib_steps or len(capture))

    def forward_loop(model: nn.Module) -> None:
        for call in tqdm(capture.calls(n), total=n, desc=f"calibrating {qc.precision}", unit="call",
                         disable=not progress, leave=False):
            model(*_tensors(call, device))

    with torch.no_grad(), warnings.catch_warnings():
        # modelopt warns once per disabled layer ("not calibrated, skip smoothing"): the layers we keep
        warnings.filterwarnings("ignore", message=".*not calibrated.*")
        if qc.calibrator == "percentile":
            _percentile_calibration(mtq, graph, modelopt_config(qc), forward_loop, qc.percentile)
        else:
            mtq.quantize(graph, modelopt_config(qc), forward_loop)
    return graph.unet


def _percentile_calibration(mtq, graph: nn.Module, cfg: Dict[str, Any], forward_loop, percentile: float) -> None:
    """Weights by max, activations by the ``percentile`` of their histograms.

    ``mtq.quantize`` runs its algorithm first (SmoothQuant for INT8 needs the activation
    maxima, and finishes every calibrator without a method, which a histogram calibrator
    cannot take). Then each enabled activation quantizer gets modelopt's
    ``HistogramCalibrator``, the captured calls run once more through modelopt's stats
    collection, and each histogram is turned into an amax with the ``percentile`` method.
    """
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    mtq.quantize(graph, cfg, forward_loop)
    inputs = [m for n, m in graph.named_modules()
              if isinstance(m, TensorQuantizer) and n.endswith("input_quantizer") and not m._disabled]
    for q in inputs:
        q._calibrator = HistogramCalibrator(num_bits=q.num_bits, axis=None, unsigned=q.unsigned)
    enable_stats_collection(graph)
    forward_loop(graph)
    for module in graph.modules():
        if not isinstance(module, TensorQuantizer) or module._disabled:
            continue
        if module in inputs:
            module.load_calib_amax("percentile", percentile=percentile)
        elif getattr(module, "_calibrator", None) is not None and module._calibrator.compute_amax() is not None:
            module.load_calib_amax()
        module.enable_quant()
        module.disable_calib()


def fake_quant_graph(qunet: nn.Module, *, mixed_attention: bool = True, adain: bool = True) -> nn.Module:
    """The quantized U-Net behind the export's graph wrapper (contract tensors in, ``noise_pred`` out)."""
    return UNetGraph(qunet, mixed_attention=mixed_attention, adain=adain).eval()


def export_quantized_unet(
    pipeline: Any,
    qunet: nn.Module,
    path: Union[str, Path],
    options: ExportOptions,
    qc: QuantConfig,
    *,
    root: Optional[Union[str, Path]] = None,
    info: Optional[ModelInfo] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> ComponentSpec:
    """Export ``qunet`` as the bundle's QDQ U-Net graph; its manifest entry says ``precision``
    ``int8``/``fp8`` and records ``qc`` (and ``extra``) under ``options.quantization``."""
    path = Path(path)
    info = info or ModelInfo.from_pipeline(pipeline)
    opts = dataclasses.replace(
        options,
        opset=max(options.opset, FP8_OPSET) if qc.precision == "fp8" or options.precision == "fp16" else options.opset,
        slim=False,
        check=False,
        attention_plugin=False,
    )
    stand_in = types.SimpleNamespace(c=dataclasses.replace(pipeline.c, unet=qunet))
    with _qdq_dtype(qunet, "Half" if opts.precision == "fp16" else "Float"):
        spec = export_component(stand_in, C.UNET, path, opts, root=root, info=info)
    data = (Path(root) if root else path.parent) / spec.external_data if spec.external_data else None
    model = onnx.load(str(path))
    if qc.precision == "fp8":
        standard_fp8_qdq(model)
    _check_qdq(model, qc.precision, path)
    if data is not None:
        data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    options_record = dict(spec.options)
    options_record["quantization"] = {**qc.to_dict(), "base_precision": opts.precision, **(extra or {})}
    return dataclasses.replace(
        spec,
        precision=qc.precision,
        sha256=file_digest(path),
        size=path.stat().st_size,
        external_sha256=file_digest(data) if data else None,
        external_size=data.stat().st_size if data else 0,
        options=options_record,
    )


@contextlib.contextmanager
def _qdq_dtype(qunet: nn.Module, dtype: str):
    """The dtype modelopt writes Q/DQ scales in (``trt_high_precision_dtype``): ``Half`` for an
    fp16 graph, so the dequantized tensors stay fp16 (strongly typed TensorRT keeps what the
    graph says; an fp32 Q/DQ would turn every quantized layer's output to fp32)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = [m for m in qunet.modules() if isinstance(m, TensorQuantizer)]
    saved = [q.trt_high_precision_dtype for q in quantizers]
    for q in quantizers:
        q.trt_high_precision_dtype = dtype
    try:
        yield
    finally:
        for q, d in zip(quantizers, saved):
            q.trt_high_precision_dtype = d


def standard_fp8_qdq(model: onnx.ModelProto) -> int:
    """Rewrite modelopt's ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` in place to
    the standard ``QuantizeLinear``/``DequantizeLinear`` on float8 E4M3 (opset >= 19).

    Both take ``y = saturate(x / scale)`` and ``x = y * scale`` with the same scale input,
    so the rewrite only changes the op names, adds the float8 zero point that types the
    quantized tensor, and sets ``saturate`` (E4M3 has no infinity: out-of-range values
    clamp to +-448, as TensorRT's op does). Returns the number of rewritten nodes.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < FP8_OPSET:
        raise CalibrationError(f"float8 Q/DQ need ONNX opset >= {FP8_OPSET}; the graph has {opset}")
    count = 0
    zero = "fp8_e4m3_zero_point"
    quantized = set()
    for node in model.graph.node:
        if node.domain != "trt":
            continue
        if node.op_type == "TRT_FP8QuantizeLinear":
            node.op_type, node.domain = "QuantizeLinear", ""
            node.input.append(zero)
            node.attribute.append(onnx.helper.make_attribute("saturate", 1))
            quantized.add(node.output[0])
        elif node.op_type == "TRT_FP8DequantizeLinear":
            node.op_type, node.domain = "DequantizeLinear", ""
            node.input.append(zero)
        else:
            continue
        count += 1
    if count:
        model.graph.initializer.append(onnx.helper.make_tensor(zero, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    for vi in model.graph.value_info:  # the exporter typed the custom op's output as uint8
        if vi.name in quantized:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT8E4M3FN
    for o in [o for o in model.opset_import if o.domain == "trt"]:
        model.opset_import.remove(o)
    return count


def _check_qdq(model: onnx.ModelProto, precision: str, where: Path) -> None:
    """The graph must hold Q/DQ pairs of the expected type and no custom-domain node."""
    want = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise CalibrationError(f"{where}: the quantized graph still holds custom ops {custom}")
    types_ = _qdq_types(model)
    if not types_:
        raise CalibrationError(f"{where}: the exported graph has no QuantizeLinear nodes; nothing was quantized")
    if set(types_) != {want}:
        raise CalibrationError(
            f"{where}: quantized tensors are {sorted(onnx.TensorProto.DataType.Name(t) for t in types_)}, "
            f"expected {onnx.TensorProto.DataType.Name(want)}"
        )


def _qdq_types(model: onnx.ModelProto) -> Dict[int, int]:
    """Element type of the zero points of every QuantizeLinear -> how many nodes use it."""
    consts: Dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t.data_type
    casts = {n.output[0]: next(a.i for a in n.attribute if a.name == "to") for n in model.graph.node if n.op_type == "Cast"}
    out: Dict[int, int] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            t = casts.get(n.input[2], consts.get(n.input[2]))
            if t is not None:
                out[t] = out.get(t, 0) + 1
    return out


def qdq_summary(model: onnx.ModelProto) -> Dict[str, int]:
    """How many Q/DQ nodes of each quantized type a graph holds (for reports and tests)."""
    return {onnx.TensorProto.DataType.Name(t): c for t, c in _qdq_types(model).items()}
