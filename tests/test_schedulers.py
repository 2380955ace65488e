"""The numpy schedulers against diffusers (the PyTorch reference's schedulers) on the same inputs.

Error measure: per step, max |ours - diffusers| / max(|x_i|, |x_{i+1}|), the
scale of the sample going in and coming out; diffusers computes in float32, so
its own rounding is ~1e-7 of that. Bound: 1e-6 (3e-6 for zero terminal SNR,
whose rescaled schedule differs from torch's by up to 4e-6 relative in
alpha-bar because torch's float32 sqrt is not correctly rounded).

Each step feeds both schedulers diffusers' latents (so each step is measured on
its own); a separate test lets the numpy scheduler run its own trajectory.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from infiniteid.bundle import BundleError
from infiniteid.generation import SCHEDULERS, InvalidRequest
from infiniteid.runtime.schedulers import (DDIM, DPMSolverMultistep, SchedulerConfig, SchedulerConfigError,
                                           StepCoefficients, make_scheduler)
from infiniteid.runtime.schedulers.noise_schedule import training_alphas_cumprod

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402

from infiniteid.model.schedulers import make_torch_scheduler  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
TOL = 1e-6
VARIANTS = {
    "sdxl": {},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample_prediction": {"prediction_type": "sample"},
    "karras": {"use_karras_sigmas": True},
    "sigma_min_final": {"final_sigmas_type": "sigma_min"},
    "heun": {"solver_type": "heun"},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "set_alpha_to_one": True},
    "zero_snr": {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
}
SHAPE = (2, 4, 16, 16)
# Options a scheduler ignores (as its diffusers twin does) are not worth a run.
IGNORED = {"ddim": {"karras", "sigma_min_final", "heun"}, "euler": {"heun"}, "dpmpp_2m": set()}
CASES = [(name, variant) for name in SCHEDULERS for variant in VARIANTS if variant not in IGNORED[name]]


def _pair(name: str, config: dict, steps: int):
    ref = make_torch_scheduler(name, config)
    ref.set_timesteps(steps)
    ours = make_scheduler(name, config)
    ours.set_timesteps(steps)
    return ref, ours


def _ref_step(ref, eps: np.ndarray, t, x: np.ndarray):
    """One diffusers step (with scale_model_input first, as a pipeline calls it); returns (x_next, x0)."""
    xt = torch.from_numpy(x)
    scaled = ref.scale_model_input(xt, t).numpy()
    out = ref.step(torch.from_numpy(eps), t, xt)
    x0 = out.pred_original_sample if hasattr(out, "pred_original_sample") else ref.model_outputs[-1]
    return scaled, out.prev_sample.numpy(), x0.numpy()


def _rel(a: np.ndarray, b: np.ndarray, *scales: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(s).max() for s in scales))


@pytest.mark.parametrize("steps", [30, 4])
@pytest.mark.parametrize("name, variant", CASES)
def test_trajectory_matches_diffusers(name, variant, steps):
    config = {**SDXL, **VARIANTS[variant]}
    tol = 3 * TOL if variant == "zero_snr" else TOL
    ref, ours = _pair(name, config, steps)

    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype
    if name == "euler" and variant == "karras":
        # Fractional timesteps from log-sigma interpolation; torch's sigmas differ by an ulp.
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-6)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_t)
    if name != "ddim":
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6 if variant != "zero_snr" else 3e-6)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(steps)
    x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        model_in = ours.scale_model_input(x, i)
        ours_next = ours.step(eps, i, x)
        ref_in, ref_next, _ = _ref_step(ref, eps, t, x)
        assert model_in.dtype == ours_next.dtype == np.float32
        assert _rel(model_in, ref_in, ref_in) < tol, f"scale_model_input, step {i}"
        assert _rel(ours_next, ref_next, x, ref_next) < tol, f"step {i} (t={t})"
        x = ref_next


@pytest.mark.parametrize("name", SCHEDULERS)
def test_free_running_trajectory_stays_close(name):
    """The numpy scheduler on its own latents: per-step errors stay at float32 rounding, no drift."""
    ref, ours = _pair(name, SDXL, 30)
    rng = np.random.default_rng(1)
    x_ref = x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        x = ours.step(eps, i, x)
        _, x_ref_next, _ = _ref_step(ref, eps, t, x_ref)
        assert _rel(x, x_ref_next, x_ref, x_ref_next) < 5 * TOL, f"step {i}"
        x_ref = x_ref_next


@pytest.mark.parametrize("variant", ["sdxl", "v_prediction", "sigma_min_final"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_coefficients_reproduce_diffusers(name, variant):
    """Applying the six numbers by hand gives diffusers' x0 and next latents, and exactly ``step``."""
    config = {**SDXL, **VARIANTS[variant]}
    ref, ours = _pair(name, config, 30)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    prev = np.zeros(SHAPE, np.float32)
    second_order_steps = 0
    for i, t in enumerate(ref.timesteps):
        c = ours.step_coefficients(i)
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        x64, eps64 = x.astype(np.float64), eps.astype(np.float64)
        denoised = c.denoised_sample * x64 + c.denoised_model_output * eps64
        x_next = c.sample * x64 + c.model_output * eps64
        x_next += c.prev_denoised * prev
        ref_in, ref_next, ref_x0 = _ref_step(ref, eps, t, x)

        assert _rel(x * np.float32(c.input_scale), ref_in, ref_in) < TOL
        assert _rel(denoised, ref_x0, ref_x0) < TOL, f"denoised, step {i}"
        assert _rel(x_next, ref_next, x, ref_next) < TOL, f"step {i}"
        np.testing.assert_array_equal(ours.step(eps, i, x), x_next.astype(np.float32))
        if i == 0 or name != "dpmpp_2m":
            assert c.prev_denoised == 0.0
        second_order_steps += c.prev_denoised != 0.0
        prev, x = denoised.astype(np.float32), ref_next
    if name == "dpmpp_2m":  # the first step and, with a zero final sigma, the last are first order
        assert second_order_steps == (28 if variant != "sigma_min_final" else 29)


def test_coefficients_as_array():
    ours = make_scheduler("dpmpp_2m", SDXL)
    ours.set_timesteps(4)
    c = ours.step_coefficients(1)
    a = c.as_array()
    assert a.dtype == np.float32 and a.shape == (6,)
    assert StepCoefficients.NAMES == ("input_scale", "sample", "model_output", "prev_denoised",
                                      "denoised_sample", "denoised_model_output")
    assert a[StepCoefficients.NAMES.index("prev_denoised")] == np.float32(c.prev_denoised) != 0


@pytest.mark.parametrize("overrides", [{}, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                                       {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 777}])
def test_training_schedule_matches_torch(overrides):
    config = {**SDXL, **overrides}
    ref = DDIMScheduler.from_config(config).alphas_cumprod.numpy()
    ours = training_alphas_cumprod(SchedulerConfig.from_dict(config))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=2e-7)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_names_and_reuse(name):
    ours = make_scheduler(name, SchedulerConfig())  # the defaults are SDXL's schedule
    assert ours.name == name
    ours.set_timesteps(5)
    rng = np.random.default_rng(3)
    eps = rng.standard_normal((5, *SHAPE)).astype(np.float32)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)

    def run():
        x = x0
        for i in range(5):
            x = ours.step(eps[i], i, x)
        return x

    np.testing.assert_array_equal(run(), run())  # step 0 starts a new trajectory


def test_dpmpp_2m_forces_the_solver_like_the_reference():
    ours = make_scheduler("dpmpp_2m", {**SDXL, "algorithm_type": "sde-dpmsolver++", "solver_order": 3})
    assert (ours.config.algorithm_type, ours.config.solver_order) == ("dpmsolver++", 2)
    with pytest.raises(SchedulerConfigError, match="algorithm_type 'dpmsolver\\+\\+' and solver_order 2"):
        DPMSolverMultistep(SchedulerConfig(algorithm_type="sde-dpmsolver++"))


def test_config_round_trip_and_unknown_keys():
    config = SchedulerConfig.from_dict(SDXL)
    assert config == SchedulerConfig()
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    assert SchedulerConfig.from_dict({"trained_betas": [0.1] * 4, "num_train_timesteps": 4}).trained_betas == (0.1,) * 4


@pytest.mark.parametrize("name, overrides, message", [
    (None, {"prediction_type": "flow_prediction"}, "unsupported prediction_type 'flow_prediction'"),
    (None, {"timestep_spacing": "even"}, "unsupported timestep_spacing 'even'"),
    (None, {"beta_schedule": "cubic"}, "unsupported beta_schedule 'cubic'"),
    (None, {"num_train_timesteps": "1000"}, "num_train_timesteps must be int"),
    (None, {"steps_offset": -1}, "steps_offset must be >= 0"),
    (None, {"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values"),
    ("ddim", {"clip_sample": True}, "ddim: clip_sample=True is not supported"),
    ("euler", {"thresholding": True}, "euler: thresholding=True is not supported"),
    ("dpmpp_2m", {"thresholding": True}, "dpmpp_2m: thresholding=True is not supported"),
    ("euler", {"use_exponential_sigmas": True}, "euler: use_exponential_sigmas=True is not supported"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type 'log_linear' is not supported"),
    ("euler", {"timestep_type": "continuous"}, "timestep_type 'continuous' is not supported"),
    ("dpmpp_2m", {"solver_type": "bh2"}, "unsupported solver_type 'bh2'"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas=True is not supported"),
    ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type 'learned_range' is not supported"),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}, "lambda_min_clipped is not supported"),
])
def test_unsupported_config_is_a_clear_error(name, overrides, message):
    config = {**SDXL, **overrides}
    with pytest.raises(SchedulerConfigError, match=message) as err:
        make_scheduler(name or "ddim", config)
    assert isinstance(err.value, BundleError)  # printed as one line by the command line


def test_unusable_schedules_and_calls_are_clear_errors():
    with pytest.raises(InvalidRequest, match="unknown scheduler 'heun'; choose one of ddim, euler, dpmpp_2m"):
        make_scheduler("heun", SDXL)
    with pytest.raises(SchedulerConfigError, match="must be a mapping"):
        make_scheduler("ddim", [("beta_end", 0.012)])
    # Zero terminal SNR makes x0 = (x - sigma eps) / alpha divide by alpha = 0 at t = 999.
    zero_snr_eps = make_scheduler("ddim", {**SDXL, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True})
    with pytest.raises(SchedulerConfigError, match="degenerate.*zero terminal SNR needs 'v_prediction'"):
        zero_snr_eps.set_timesteps(10)

    ours = make_scheduler("dpmpp_2m", SDXL)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        ours.init_noise_sigma
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match=r"number of steps must be an integer in \[1, 1000\]"):
            ours.set_timesteps(bad)
    ours.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="step 2 requested but the next step is 0; steps run in order from 0"):
        ours.step(x, 2, x)
    with pytest.raises(IndexError, match="step index 4 out of range for 4 steps"):
        ours.step_coefficients(4)
    with pytest.raises(ValueError, match="shape"):
        ours.step(x[:1], 0, x)


def test_import_is_torch_free():
    code = ("import sys, infiniteid.runtime.schedulers as s; "
            "s.make_scheduler('euler', {}).set_timesteps(4); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scheduler_classes_cover_the_request_names():
    assert {make_scheduler(n, {}).name for n in SCHEDULERS} == set(SCHEDULERS)
    assert isinstance(make_scheduler("ddim", {}), DDIM)
