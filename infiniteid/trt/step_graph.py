"""Guidance + scheduler step as one small ONNX graph, so the denoising loop never leaves the GPU.

Between two U-Net calls the host loop (:func:`infiniteid.runtime.loop.host_loop`)
does three things: classifier-free guidance per stream
(:func:`infiniteid.layout.guide`), one scheduler step, and the next U-Net input
(:func:`infiniteid.layout.unet_batch` times the scheduler's input scale). All
three are affine, and the schedulers give their step as six numbers per step
(:class:`~infiniteid.runtime.schedulers.StepCoefficients`), so one graph with
the numbers as *inputs* serves DDIM, Euler and DPM-Solver++(2M) at every step.
TensorRT builds it into a tiny engine; the runtime binds its ``noise_pred``
input to the U-Net's output buffer and its ``sample_out`` output to the
U-Net's ``sample`` input buffer, so only the final latents come back to the host.

Graph (``n`` images, ``K = 4 * H/8 * W/8``; rows as in :mod:`infiniteid.layout`)::

    inputs   noise_pred         (batch, 4, h, w)   U-Net output dtype; rows [t_u, t_c, i_u, i_c] (CFG)
             latents            (2n, 4, h, w)      float32, rows [text; id]
             prev_denoised      (2n, 4, h, w)      float32, the last step's denoised estimate (zeros at first)
             guidance           (n, 1, 1, 1)       float32 (CFG graph only)
             coefficients       (6,)               float32, StepCoefficients of this step, field order
             next_input_scale   (1,)               float32, the next step's input_scale
    outputs  latents_out        (2n, 4, h, w)      float32
             denoised           (2n, 4, h, w)      float32 (feed back as prev_denoised)
             sample_out         (batch, 4, h, w)   U-Net input dtype: the next U-Net ``sample``

Everything is computed in float32 (the U-Net output is cast up first). The
graph is generated with ``onnx.helper`` and tested on onnxruntime against the
numpy schedulers. :func:`step_graph_key` names a graph without ``onnx`` so the
runtime can check an engine was built from the current graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..bundle import ComponentSpec, TensorSpec
from ..layout import BatchLayout

STEP_GRAPH_VERSION = 1
OPSET = 17
STEP_CFG = "step_cfg"
STEP_NOCFG = "step_nocfg"
COEFFICIENT_NAMES = (
    "input_scale", "sample", "model_output", "prev_denoised", "denoised_sample", "denoised_model_output",
)
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def step_component_name(cfg: bool) -> str:
    return STEP_CFG if cfg else STEP_NOCFG


@dataclass(frozen=True)
class StepGraphSpec:
    """What a step graph is generated for: guidance on or off, and the U-Net's I/O dtypes."""

    cfg: bool = True
    noise_dtype: str = "float32"  # the U-Net's noise_pred dtype
    sample_dtype: str = "float32"  # the U-Net's sample dtype

    def __post_init__(self) -> None:
        for k in ("noise_dtype", "sample_dtype"):
            if getattr(self, k) not in _NP_DTYPES:
                raise ValueError(f"{k} must be float32 or float16, got {getattr(self, k)!r}")

    @classmethod
    def for_unet(cls, unet: ComponentSpec, cfg: bool) -> "StepGraphSpec":
        """The step graph that fits a bundle's U-Net component (its ``noise_pred``/``sample`` dtypes)."""
        return cls(cfg=cfg, noise_dtype=unet.tensor("noise_pred").dtype, sample_dtype=unet.tensor("sample").dtype)

    @property
    def name(self) -> str:
        return step_component_name(self.cfg)


def step_graph_key(spec: StepGraphSpec) -> str:
    """A stable identity of the generated graph (its version and parameters), used as its "ONNX hash"."""
    text = f"infiniteid-step-graph v{STEP_GRAPH_VERSION} opset={OPSET} cfg={int(spec.cfg)} " \
           f"noise={spec.noise_dtype} sample={spec.sample_dtype}"
    return hashlib.sha256(text.encode()).hexdigest()


def make_step_model(spec: StepGraphSpec):
    """The ONNX ``ModelProto`` of guidance + step for ``spec`` (needs the ``onnx`` package)."""
    from onnx import TensorProto, helper

    T = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    f32 = TensorProto.FLOAT
    nodes: List = []
    inits: List = []

    def const(name: str, values, dtype=TensorProto.INT64) -> str:
        arr = np.asarray(values)
        inits.append(helper.make_tensor(name, dtype, list(arr.shape), arr.ravel().tolist()))
        return name

    def node(op: str, inputs: List[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    streams = 2  # text, ID
    halves = 2 if spec.cfg else 1
    const("c_2", [2])
    const("c_minus1", [-1])
    if spec.cfg:
        const("c_1", [1])
    # n = images = latents rows / 2
    node("Shape", ["latents"], "latents_shape")
    node("Shape", ["noise_pred"], "noise_shape")
    node("Gather", ["latents_shape", const("c_idx0", [0])], "latent_rows")
    node("Div", ["latent_rows", "c_2"], "n")
    # (streams, halves, n, K) view of the U-Net output, in float32
    node("Cast", ["noise_pred"], "eps_all", to=f32)
    node("Concat", ["c_2", const("c_halves", [halves]), "n", "c_minus1"], "eps_view_shape", axis=0)
    node("Reshape", ["eps_all", "eps_view_shape"], "eps_view")
    if spec.cfg:
        node("Gather", ["eps_view", const("c_uncond", np.array(0))], "eps_uncond", axis=1)  # (2, n, K)
        node("Gather", ["eps_view", const("c_cond", np.array(1))], "eps_cond", axis=1)
        node("Concat", ["c_1", "n", "c_1"], "g_shape", axis=0)
        node("Reshape", ["guidance", "g_shape"], "g")  # (1, n, 1)
        node("Sub", ["eps_cond", "eps_uncond"], "eps_delta")
        node("Mul", ["g", "eps_delta"], "eps_scaled")
        node("Add", ["eps_uncond", "eps_scaled"], "eps")
    else:
        node("Squeeze", ["eps_view", const("c_axis1", [1])], "eps")
    # (streams, n, K) views of the latents and the previous denoised estimate
    node("Concat", ["c_2", "n", "c_minus1"], "x_view_shape", axis=0)
    node("Reshape", ["latents", "x_view_shape"], "x")
    node("Reshape", ["prev_denoised", "x_view_shape"], "prev")

    def coef(i: int, label: str) -> str:  # shape (1,): broadcasts without 0-d tensors
        return node("Gather", ["coefficients", const(f"c_coef_{label}", [i])], f"k_{label}")

    k = {name: coef(i, name) for i, name in enumerate(COEFFICIENT_NAMES)}
    node("Mul", [k["sample"], "x"], "t_x")
    node("Mul", [k["model_output"], "eps"], "t_eps")
    node("Mul", [k["prev_denoised"], "prev"], "t_prev")
    node("Add", ["t_x", "t_eps"], "t_sum")
    node("Add", ["t_sum", "t_prev"], "x_next")
    node("Mul", [k["denoised_sample"], "x"], "d_x")
    node("Mul", [k["denoised_model_output"], "eps"], "d_eps")
    node("Add", ["d_x", "d_eps"], "d_next")
    node("Reshape", ["x_next", "latents_shape"], "latents_out")
    node("Reshape", ["d_next", "latents_shape"], "denoised")
    # next U-Net input: [text.., (text..), id.., (id..)] * next input scale
    if spec.cfg:
        node("Unsqueeze", ["x_next", "c_1"], "x_next_1")  # (2, 1, n, K)
        node("Concat", ["x_next_1", "x_next_1"], "x_rows", axis=1)  # (2, 2, n, K)
    else:
        node("Identity", ["x_next"], "x_rows")
    node("Reshape", ["x_rows", "noise_shape"], "sample_rows")
    node("Mul", ["sample_rows", "next_input_scale"], "sample_scaled")
    node("Cast", ["sample_scaled"], "sample_out", to=T[spec.sample_dtype])

    sym_b, sym_r, sym_h, sym_w = "batch", "rows", "latent_height", "latent_width"
    inputs = [
        helper.make_tensor_value_info("noise_pred", T[spec.noise_dtype], [sym_b, 4, sym_h, sym_w]),
        helper.make_tensor_value_info("latents", f32, [sym_r, 4, sym_h, sym_w]),
        helper.make_tensor_value_info("prev_denoised", f32, [sym_r, 4, sym_h, sym_w]),
    ]
    if spec.cfg:
        inputs.append(helper.make_tensor_value_info("guidance", f32, ["images", 1, 1, 1]))
    inputs += [
        helper.make_tensor_value_info("coefficients", f32, [len(COEFFICIENT_NAMES)]),
        helper.make_tensor_value_info("next_input_scale", f32, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("latents_out", f32, [sym_r, 4, sym_h, sym_w]),
        helper.make_tensor_value_info("denoised", f32, [sym_r, 4, sym_h, sym_w]),
        helper.make_tensor_value_info("sample_out", T[spec.sample_dtype], [sym_b, 4, sym_h, sym_w]),
    ]
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="infiniteid",
        producer_version=f"step-graph-{STEP_GRAPH_VERSION}",
        doc_string=f"InfiniteID-RT guidance + scheduler step ({step_graph_key(spec)})",
    )
    model.ir_version = 8  # readable by every onnxruntime and TensorRT 10+ parser
    return model


def step_tensor_specs(spec: StepGraphSpec, unet: ComponentSpec) -> ComponentSpec:
    """The step graph's inputs and outputs with shape ranges derived from the U-Net's.

    The U-Net's ``sample`` range gives the batch and latent sizes; latent rows
    (``2n``) and images (``n``) follow from the batch layout. Used to build the
    step engine's optimisation profile exactly like a bundle component's.
    """
    sample = unet.tensor("sample")
    per = 4 if spec.cfg else 2  # U-Net rows per image

    def images(b: int) -> int:
        return max(1, b // per)

    b_min, b_opt, b_max = sample.min[0], sample.opt[0], sample.max[0]
    n = [images(b_min), images(b_opt), images(b_max)]
    rows_sym = "pairs" if spec.cfg else "batch"  # 2n latent rows: pairs with CFG, the whole batch without
    lat = lambda name, dtype, first: TensorSpec(  # noqa: E731
        name, dtype, [first, 4, "latent_height", "latent_width"],
        [2 * n[0], 4, sample.min[2], sample.min[3]], [2 * n[1], 4, sample.opt[2], sample.opt[3]],
        [2 * n[2], 4, sample.max[2], sample.max[3]],
    )
    batch_range = lambda name, dtype: TensorSpec(  # noqa: E731
        name, dtype, ["batch", 4, "latent_height", "latent_width"],
        [per * n[0], 4, sample.min[2], sample.min[3]], [per * n[1], 4, sample.opt[2], sample.opt[3]],
        [per * n[2], 4, sample.max[2], sample.max[3]],
    )
    inputs = [batch_range("noise_pred", spec.noise_dtype), lat("latents", "float32", rows_sym),
              lat("prev_denoised", "float32", rows_sym)]
    if spec.cfg:
        inputs.append(TensorSpec("guidance", "float32", ["images", 1, 1, 1],
                                 [n[0], 1, 1, 1], [n[1], 1, 1, 1], [n[2], 1, 1, 1]))
    k = len(COEFFICIENT_NAMES)
    inputs += [TensorSpec("coefficients", "float32", [k], [k], [k], [k]),
               TensorSpec("next_input_scale", "float32", [1], [1], [1], [1])]
    outputs = [lat("latents_out", "float32", rows_sym), lat("denoised", "float32", rows_sym),
               batch_range("sample_out", spec.sample_dtype)]
    precision = "fp16" if spec.noise_dtype == "float16" else "fp32"
    return ComponentSpec(
        name=spec.name, file=f"{spec.name}.onnx", precision=precision, sha256=step_graph_key(spec),
        inputs=inputs, outputs=outputs,
    )


# -- host-side helpers shared by the device loop and the tests ----------------------------------
def coefficient_table(scheduler, steps: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(steps, 6)`` coefficients and ``(steps,)`` next-input scales (1 after the last step), float32."""
    coefs = np.stack([scheduler.step_coefficients(i).as_array(np.float64) for i in range(steps)])
    nxt = np.ones(steps, dtype=np.float64)
    nxt[:-1] = coefs[1:, 0]
    return coefs.astype(np.float32), nxt.astype(np.float32)


def step_feeds(
    noise_pred: np.ndarray,
    latents: np.ndarray,
    prev: np.ndarray,
    guidance: Optional[np.ndarray],
    coefficients: np.ndarray,
    next_scale: float,
    spec: StepGraphSpec,
) -> Dict[str, np.ndarray]:
    """One step's feeds for the graph (host arrays), e.g. to run it on onnxruntime."""
    feeds = {
        "noise_pred": np.ascontiguousarray(noise_pred, dtype=_NP_DTYPES[spec.noise_dtype]),
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "prev_denoised": np.ascontiguousarray(prev, dtype=np.float32),
        "coefficients": np.ascontiguousarray(coefficients, dtype=np.float32),
        "next_input_scale": np.array([next_scale], dtype=np.float32),
    }
    if spec.cfg:
        if guidance is None:
            raise ValueError("the CFG step graph needs per-image guidance scales")
        feeds["guidance"] = np.ascontiguousarray(guidance, dtype=np.float32).reshape(-1, 1, 1, 1)
    return feeds


def first_sample(latents: np.ndarray, layout: BatchLayout, input_scale: float, dtype: str) -> np.ndarray:
    """The first U-Net ``sample`` (later ones come out of the step graph), computed on the host."""
    from ..layout import unet_batch

    x = unet_batch(np.asarray(latents, dtype=np.float32), layout)
    if input_scale != 1.0:
        x = (x.astype(np.float64) * input_scale).astype(np.float32)
    return np.ascontiguousarray(x, dtype=_NP_DTYPES[dtype])
