"""Optimisation profiles from the manifest: static 1024x1024 batch 1 by default, the manifest's ranges on request."""
from __future__ import annotations

import pytest
from trt_testutil import sdxl_manifest

from infiniteid.generation import InvalidRequest
from infiniteid.trt.profiles import (
    ProfileError,
    ShapePlan,
    component_profiles,
    in_profile,
    is_static,
    manifest_profile,
    resolve_shape,
)
from infiniteid.trt.step_graph import StepGraphSpec, step_tensor_specs


@pytest.fixture(scope="module")
def manifest():
    return sdxl_manifest()


def test_default_plan_is_sdxl_1024_batch_1(manifest):
    plan = ShapePlan.for_manifest(manifest)
    assert (plan.mode, plan.height, plan.width, plan.images, plan.cfg) == ("static", 1024, 1024, 1, True)
    assert plan.symbols() == {"images": 1, "batch": 4, "pairs": 2, "latent_height": 128, "latent_width": 128,
                              "height": 1024, "width": 1024}


def test_static_unet_profile(manifest):
    [p] = component_profiles(manifest.components["unet"], ShapePlan.for_manifest(manifest))
    fixed = {name: r[0] for name, r in p.items()}
    assert all(r[0] == r[1] == r[2] for r in p.values())
    assert fixed == {
        "sample": (4, 4, 128, 128),  # [text_uncond, text_cond, id_uncond, id_cond]
        "timestep": (1,),
        "encoder_hidden_states": (4, 77, 2048),
        "text_embeds": (4, 1280),
        "time_ids": (4, 6),
        "id_embeds": (2, 261, 2048),  # one identity: the manifest's opt token count
        "id_scale": (2,),
    }


def test_static_vae_and_other_resolutions(manifest):
    plan = ShapePlan.for_manifest(manifest, height=768, width=1344, images=2)
    [p] = component_profiles(manifest.components["vae_decoder"], plan)
    assert p == {"latent": ((2, 4, 96, 168),) * 3}
    [u] = component_profiles(manifest.components["unet"], plan)
    assert u["sample"][0] == (8, 4, 96, 168) and u["id_scale"][0] == (4,)


def test_encoders_keep_the_manifest_ranges_in_static_mode(manifest):
    """Prompt and face counts vary per batch (negative prompts, mixed identities): encoders stay dynamic."""
    plan = ShapePlan.for_manifest(manifest)
    for c in ("text_encoder", "text_encoder_2", "id_encoder"):
        [p] = component_profiles(manifest.components[c], plan)
        assert p == manifest_profile(manifest.components[c])
        assert not is_static([p])
    assert component_profiles(manifest.components["text_encoder"], plan)[0]["input_ids"] == ((1, 77), (2, 77), (8, 77))


def test_dynamic_profiles_are_the_manifest_ranges(manifest):
    plan = ShapePlan.for_manifest(manifest, mode="dynamic")
    [p] = component_profiles(manifest.components["unet"], plan)
    assert p["sample"] == ((2, 4, 64, 64), (4, 4, 128, 128), (16, 4, 192, 192))
    assert p["id_embeds"] == ((1, 261, 2048), (2, 261, 2048), (8, 522, 2048))
    assert p["timestep"] == ((1,), (1,), (1,))


def test_static_shape_outside_the_export_range_is_refused(manifest):
    plan = ShapePlan.for_manifest(manifest, height=1536, width=1536, images=5)  # 5 images: batch 20 > 16
    with pytest.raises(ProfileError, match=r"unet input 'sample': shape \[20, 4, 192, 192\] is outside the range"):
        component_profiles(manifest.components["unet"], plan)
    with pytest.raises(InvalidRequest, match="height=1000 is not a multiple of 32"):
        ShapePlan.for_manifest(manifest, height=1000)
    with pytest.raises(ProfileError, match="shapes must be one of static, dynamic"):
        ShapePlan(mode="fixed").validate()


def test_resolve_shape_and_in_profile(manifest):
    t = manifest.components["unet"].tensor("id_embeds")
    assert resolve_shape(t, {"pairs": 6}) == (6, 261, 2048)
    assert resolve_shape(t, {"pairs": 6}, fallback="max") == (6, 522, 2048)
    [p] = component_profiles(manifest.components["vae_decoder"], ShapePlan.for_manifest(manifest))
    assert in_profile(p, {"latent": (1, 4, 128, 128)}) == []
    assert in_profile(p, {"latent": (1, 4, 96, 128)}) == ["latent: [1, 4, 96, 128] not in [1, 4, 128, 128] .. [1, 4, 128, 128]"]
    assert in_profile(p, {}) == ["latent: no shape given"]


def test_step_graph_specs_follow_the_unet(manifest):
    unet = manifest.components["unet"]
    spec = step_tensor_specs(StepGraphSpec(cfg=True, noise_dtype="float16", sample_dtype="float16"), unet)
    assert spec.name == "step_cfg" and spec.precision == "fp16"
    [static] = component_profiles(spec, ShapePlan.for_manifest(manifest))
    assert {n: r[0] for n, r in static.items()} == {
        "noise_pred": (4, 4, 128, 128), "latents": (2, 4, 128, 128), "prev_denoised": (2, 4, 128, 128),
        "guidance": (1, 1, 1, 1), "coefficients": (6,), "next_input_scale": (1,),
    }
    [dyn] = component_profiles(spec, ShapePlan.for_manifest(manifest, mode="dynamic"))
    assert dyn["noise_pred"] == ((4, 4, 64, 64), (4, 4, 128, 128), (16, 4, 192, 192))
    assert dyn["latents"] == ((2, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192))
    assert dyn["guidance"] == ((1, 1, 1, 1), (1, 1, 1, 1), (4, 1, 1, 1))
    nocfg = step_tensor_specs(StepGraphSpec(cfg=False), unet)
    [p] = component_profiles(nocfg, ShapePlan.for_manifest(manifest, mode="dynamic"))
    assert "guidance" not in p and p["noise_pred"][2] == (16, 4, 192, 192) and p["latents"][0][0] == 2
