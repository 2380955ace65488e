"""The guidance + scheduler-step ONNX graph on onnxruntime against the numpy schedulers and layout.guide.

The graph is what the TensorRT step engine is built from, so this is the test of
the on-GPU loop's arithmetic: a whole trajectory (random U-Net outputs, two
images with their own guidance scales) through the graph must follow the host
loop (:func:`infiniteid.runtime.loop.host_loop`'s scheduler + guide + unet_batch).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from infiniteid.layout import BatchLayout, guide, unet_batch
from infiniteid.runtime.schedulers import make_scheduler
from infiniteid.trt.step_graph import (
    COEFFICIENT_NAMES,
    StepGraphSpec,
    coefficient_table,
    first_sample,
    make_step_model,
    step_feeds,
    step_graph_key,
)
from trt_testutil import SDXL_SCHEDULER

STEPS = 30


def session(spec: StepGraphSpec) -> ort.InferenceSession:
    model = make_step_model(spec)
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_both(name: str, cfg: bool, dtype: str = "float32", images: int = 2, hw=(16, 24)):
    """(device-graph latents, host latents, worst relative error of the U-Net inputs) over a whole trajectory."""
    spec = StepGraphSpec(cfg=cfg, noise_dtype=dtype, sample_dtype=dtype)
    sess = session(spec)
    layout = BatchLayout(images=images, cfg=cfg)
    sched = make_scheduler(name, SDXL_SCHEDULER)
    sched.set_timesteps(STEPS)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((images, 4, *hw)).astype(np.float32)
    latents = np.concatenate([noise, noise]) * np.float32(sched.init_noise_sigma)
    guidance = np.array([5.0, 7.5, 3.0][:images], dtype=np.float32).reshape(-1, 1, 1, 1)
    coefs, nxt = coefficient_table(sched, STEPS)

    x_host = latents.copy()
    x_dev, prev = latents.copy(), np.zeros_like(latents)
    sample = first_sample(latents, layout, float(coefs[0, 0]), dtype)
    worst_input = 0.0
    for i in range(STEPS):
        x_in = sched.scale_model_input(unet_batch(x_host, layout), i)
        worst_input = max(worst_input, float(np.abs(sample.astype(np.float32) - x_in).max() / np.abs(x_in).max()))
        # a U-Net stand-in whose output depends on its input, as the real one does
        eps = (0.3 * x_in / np.abs(x_in).std() + rng.standard_normal(x_in.shape)).astype(dtype)
        x_host = sched.step(guide(eps.astype(np.float32), layout, guidance), i, x_host)
        x_dev, prev, sample = sess.run(None, step_feeds(eps, x_dev, prev, guidance if cfg else None,
                                                        coefs[i], float(nxt[i]), spec))
        assert sample.dtype == np.dtype(dtype) and sample.shape == (layout.batch, 4, *hw)
    return x_dev, x_host, worst_input


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_step_graph_follows_the_numpy_scheduler(name, cfg):
    x_dev, x_host, worst_input = run_both(name, cfg)
    rel = np.abs(x_dev - x_host).max() / np.abs(x_host).max()
    # float32 graph vs the float64-internal numpy step: rounding only, over 30 steps
    assert rel < 5e-6, rel
    assert worst_input < 5e-6, worst_input
    assert np.isfinite(x_dev).all()


def test_fp16_unet_io_rounds_only_the_unet_input():
    """With an fp16 U-Net the graph reads fp16 predictions, keeps latents in fp32 and writes fp16 inputs."""
    x_dev, x_host, worst_input = run_both("euler", True, dtype="float16")
    assert np.abs(x_dev - x_host).max() / np.abs(x_host).max() < 5e-6  # same fp16 eps on both sides
    assert 1e-5 < worst_input < 2 ** -10  # fp16 rounding of the U-Net input, nothing more


def test_one_step_by_hand():
    """Step i of DDIM with CFG, written out from the six coefficients."""
    spec = StepGraphSpec(cfg=True)
    sess = session(spec)
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((4, 4, 2, 2)).astype(np.float32)  # [t_u, t_c, i_u, i_c], one image
    x = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)
    prev = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)
    k = np.array([0.5, 0.9, -0.2, 0.1, 1.3, -0.7], dtype=np.float32)
    g = np.array([4.0], dtype=np.float32)
    out_x, out_d, out_s = sess.run(None, step_feeds(eps, x, prev, g, k, 0.25, spec))
    e = np.stack([eps[0] + 4.0 * (eps[1] - eps[0]), eps[2] + 4.0 * (eps[3] - eps[2])])
    np.testing.assert_allclose(out_x, 0.9 * x - 0.2 * e + 0.1 * prev, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_d, 1.3 * x - 0.7 * e, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_s, 0.25 * np.stack([out_x[0], out_x[0], out_x[1], out_x[1]]), rtol=1e-6)
    assert dict(zip(COEFFICIENT_NAMES, k))["input_scale"] == 0.5  # field order of StepCoefficients
    from infiniteid.runtime.schedulers import StepCoefficients

    assert StepCoefficients.NAMES == COEFFICIENT_NAMES


def test_graph_identity_is_stable_and_parameter_specific():
    a = step_graph_key(StepGraphSpec(cfg=True))
    assert a == step_graph_key(StepGraphSpec(cfg=True))
    assert len({a, step_graph_key(StepGraphSpec(cfg=False)),
                step_graph_key(StepGraphSpec(cfg=True, noise_dtype="float16", sample_dtype="float16"))}) == 3
    assert make_step_model(StepGraphSpec()).SerializeToString() == make_step_model(StepGraphSpec()).SerializeToString()
    with pytest.raises(ValueError, match="noise_dtype must be float32 or float16"):
        StepGraphSpec(noise_dtype="bfloat16")


def test_coefficient_table_matches_the_scheduler():
    sched = make_scheduler("dpmpp_2m", SDXL_SCHEDULER)
    sched.set_timesteps(10)
    coefs, nxt = coefficient_table(sched, 10)
    assert coefs.shape == (10, 6) and coefs.dtype == np.float32
    np.testing.assert_allclose(coefs[3], sched.step_coefficients(3).as_array(), rtol=1e-7)
    np.testing.assert_allclose(nxt[:-1], coefs[1:, 0])
    assert nxt[-1] == 1.0


def _graph_dtypes(model) -> dict:
    from onnx import helper

    return {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            for v in list(model.graph.input) + list(model.graph.output)}


@pytest.mark.parametrize("unet_precision", ["fp16", "fp32"])
def test_the_step_graph_shares_buffers_only_with_a_unet_of_its_dtypes(unet_precision):
    """The device loop binds the step engine's noise_pred/sample_out to the U-Net's buffers: dtypes must agree."""
    from infiniteid.runtime.trt_backend import shared_buffer_mismatches
    from trt_testutil import sdxl_manifest

    unet = sdxl_manifest(precision=unet_precision).components["unet"]
    unet_dtypes = {t.name: np.dtype(t.dtype) for t in list(unet.inputs) + list(unet.outputs)}
    matching = _graph_dtypes(make_step_model(StepGraphSpec.for_unet(unet, cfg=True)))
    assert shared_buffer_mismatches(unet_dtypes, matching) == []
    other = "float32" if unet_precision == "fp16" else "float16"
    stale = _graph_dtypes(make_step_model(StepGraphSpec(cfg=True, noise_dtype=other, sample_dtype=other)))
    want = unet_dtypes["sample"].name
    assert shared_buffer_mismatches(unet_dtypes, stale) == [
        f"step noise_pred is {other}, U-Net noise_pred is {want}",
        f"step sample_out is {other}, U-Net sample is {want}",
    ]
