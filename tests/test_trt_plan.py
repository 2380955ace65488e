"""What ``infiniteid build`` does around TensorRT: jobs, precision checks, up-to-date checks, sidecars.

TensorRT cannot run here, so the one TensorRT call (``build_fn``) is replaced by
a function that returns recognisable bytes; everything else (profiles, folder,
sidecars, atomic writes, the generated step graph) is the real code.
"""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper
from trt_testutil import fake_digest, sdxl_manifest

from infiniteid.bundle import ComponentSpec
from infiniteid.trt.builder import PhaseBars
from infiniteid.trt.engine_check import Target
from infiniteid.trt.names import DeviceInfo, plan_path, read_sidecar, sidecar_path
from infiniteid.trt.plan import (
    BuildError,
    EngineJob,
    BuildOptions,
    BuiltPlan,
    check_precision,
    needs_plugin,
    plan_jobs,
    run_build,
)
from infiniteid.trt.step_graph import StepGraphSpec, step_graph_key

TARGET = Target(DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)), "11.4.0.106")
ALL = ["text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder"]


class FakeTensorRT:
    """Stands in for the TensorRT build (which needs a GPU): records the jobs, returns bytes naming them."""

    def __init__(self, fail_on=None):
        self.jobs = []
        self.fail_on = fail_on

    def __call__(self, job, folder):
        if job.name == self.fail_on:
            raise BuildError(f"TensorRT failed to build the {job.name} engine: out of memory")
        self.jobs.append(job)
        return BuiltPlan(data=f"plan of {job.name}".encode(),
                         io=[{"name": n, "mode": "input", "dtype": "HALF"} for n in job.profiles[0]])


def build(tmp_path, manifest, fake=None, **opts):
    fake = fake or FakeTensorRT()
    report = run_build(tmp_path, manifest, BuildOptions(**opts), TARGET, fake, progress=False)
    return report, fake


def test_default_build_writes_plans_and_sidecars(tmp_path):
    manifest = sdxl_manifest()
    report, fake = build(tmp_path, manifest, precision="fp16")
    assert report.folder == tmp_path / "engines" / "nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106"
    assert report.built == ALL + ["step_cfg"] and report.skipped == []
    for name in report.built:
        assert plan_path(report.folder, name).read_bytes() == f"plan of {name}".encode()
    sc = read_sidecar(sidecar_path(report.folder, "unet"))
    assert sc.tensorrt_version == "11.4.0.106" and sc.device == "NVIDIA H100 80GB HBM3"
    assert sc.compute_capability == "9.0" and sc.precision == "fp16"
    assert sc.onnx_sha256 == manifest.components["unet"].sha256 and sc.onnx_file == "onnx/unet.onnx"
    assert sc.plan_bytes == len(b"plan of unet") and sc.build_seconds >= 0
    assert sc.profiles[0]["sample"] == {"min": [4, 4, 128, 128], "opt": [4, 4, 128, 128], "max": [4, 4, 128, 128]}
    assert sc.build == {"precision": "fp16", "shapes": "static", "height": 1024, "width": 1024, "images": 1,
                        "cfg": True, "opt_level": 3, "workspace_gb": None, "version_compatible": False}
    assert sc.io[0]["mode"] == "input"
    vae = read_sidecar(sidecar_path(report.folder, "vae_decoder"))
    assert vae.precision == "fp32"  # the VAE stays fp32 in an fp16 build


def test_step_graph_is_generated_next_to_its_engine(tmp_path):
    manifest = sdxl_manifest()
    report, fake = build(tmp_path, manifest)
    step_job = [j for j in fake.jobs if j.name == "step_cfg"][0]
    assert step_job.onnx_path == report.folder / "step_cfg.onnx"
    model = onnx.load(str(step_job.onnx_path))
    assert [i.name for i in model.graph.input] == ["noise_pred", "latents", "prev_denoised", "guidance",
                                                   "coefficients", "next_input_scale"]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16  # the fp16 U-Net's output
    sc = read_sidecar(sidecar_path(report.folder, "step_cfg"))
    assert sc.onnx_sha256 == step_graph_key(StepGraphSpec(cfg=True, noise_dtype="float16", sample_dtype="float16"))
    assert sc.static()


def test_dynamic_build_takes_the_manifest_ranges_and_both_step_graphs(tmp_path):
    report, fake = build(tmp_path, sdxl_manifest(), shapes="dynamic")
    assert report.built == ALL + ["step_cfg", "step_nocfg"]
    sc = read_sidecar(sidecar_path(report.folder, "unet"))
    assert sc.profiles[0]["sample"] == {"min": [2, 4, 64, 64], "opt": [4, 4, 128, 128], "max": [16, 4, 192, 192]}
    assert sc.build["shapes"] == "dynamic" and "height" not in sc.build and not sc.static()


def test_up_to_date_engines_are_kept(tmp_path):
    manifest = sdxl_manifest()
    build(tmp_path, manifest)
    report, fake = build(tmp_path, manifest)
    assert report.built == [] and len(report.skipped) == 6 and fake.jobs == []
    report, _ = build(tmp_path, manifest, force=True)
    assert len(report.built) == 6
    report, _ = build(tmp_path, manifest, timing_cache="/elsewhere/t.cache")  # where the cache lives: no rebuild
    assert report.built == []
    report, _ = build(tmp_path, manifest, opt_level=5)  # other flags: rebuild
    assert len(report.built) == 6
    manifest.components["unet"].sha256 = fake_digest("unet", "re-exported")
    report, _ = build(tmp_path, manifest, opt_level=5)
    assert report.built == ["unet"]  # only what changed


def test_a_failed_engine_leaves_no_partial_plan(tmp_path):
    manifest = sdxl_manifest()
    with pytest.raises(BuildError, match="out of memory"):
        build(tmp_path, manifest, fake=FakeTensorRT(fail_on="unet"))
    folder = tmp_path / "engines" / "nvidia-h100-80gb-hbm3-sm90-trt11.4.0.106"
    assert plan_path(folder, "id_encoder").is_file() and not plan_path(folder, "unet").exists()
    assert not sidecar_path(folder, "unet").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    report, _ = build(tmp_path, manifest)  # the rerun builds what is missing only
    assert report.built == ["unet", "vae_decoder", "step_cfg"]


def test_fp16_on_an_fp32_bundle_says_to_export_fp16(tmp_path):
    manifest = sdxl_manifest(precision="fp32")
    with pytest.raises(BuildError) as e:
        build(tmp_path, manifest, precision="fp16")
    msg = str(e.value)
    assert "--precision fp16 asked, but the bundle's text_encoder, text_encoder_2, id_encoder, unet ONNX is fp32" in msg
    assert "export the bundle with --precision fp16" in msg
    with pytest.raises(BuildError, match="--precision fp32 asked, but the bundle's .*unet ONNX is fp16"):
        check_precision(sdxl_manifest(), "fp32", ALL, tmp_path)
    check_precision(sdxl_manifest(), "fp16", ALL, tmp_path)  # fp16 with the VAE in fp32 is what fp16 means
    check_precision(manifest, "fp32", ALL, tmp_path)
    check_precision(manifest, None, ALL, tmp_path)


def test_option_checks():
    for kw, msg in [
        ({"opt_level": 7}, "--opt-level must be an integer from 0 to 5"),
        ({"workspace_gb": 0}, "--workspace must be a positive number"),
        ({"precision": "int4"}, "--precision must be one of fp32, fp16, int8, fp8"),
        ({"shapes": "dynamic", "height": 768}, "--height/--width/--images choose the static shape"),
        ({"components": ["unet", "vea"]}, "unknown component 'vea'"),
        ({"images": 0}, "--images must be a positive integer"),
    ]:
        with pytest.raises(BuildError, match=msg.replace("(", r"\(")):
            BuildOptions(**kw).validate()


def test_component_subset_and_no_step_graph(tmp_path):
    manifest = sdxl_manifest()
    opts = BuildOptions(components=["vae_decoder"])
    jobs = plan_jobs(tmp_path, manifest, opts, opts.shape_plan(manifest))
    assert [j.name for j in jobs] == ["vae_decoder"]
    opts = BuildOptions(components=["unet"])
    assert [j.name for j in plan_jobs(tmp_path, manifest, opts, opts.shape_plan(manifest))] == ["unet", "step_cfg"]
    opts = BuildOptions(step_graphs=False)
    assert [j.name for j in plan_jobs(tmp_path, manifest, opts, opts.shape_plan(manifest))] == ALL


def test_plugin_need_is_read_from_the_graph(tmp_path):
    """A graph importing the project's custom domain needs the plugin registered before parsing."""
    node = helper.make_node("MixedAttention", ["q", "k", "v", "d"], ["o"], domain="infiniteid")
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])  # noqa: E731
    graph = helper.make_graph([node], "g", [vi("q"), vi("k"), vi("v"), vi("d")], [vi("o")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("infiniteid", 1)])
    path = tmp_path / "unet.onnx"
    onnx.save(model, str(path))
    spec = ComponentSpec("unet", "onnx/unet.onnx", "fp16", "0" * 64, [], [])
    assert needs_plugin(spec, path)
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["q"], ["o"])], "g", [vi("q")], [vi("o")]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert not needs_plugin(spec, tmp_path / "plain.onnx")
    spec.options["attention_plugin"] = True
    assert needs_plugin(spec, tmp_path / "plain.onnx")


def test_plugin_layers_must_match_the_graphs_plugin_nodes(tmp_path):
    """A parser that imported the function body (no plugin layer) is refused; the right count passes."""
    from infiniteid.trt.builder import check_plugin_layers
    from infiniteid.trt.plan import plugin_node_count

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])  # noqa: E731
    nodes = [helper.make_node("MixedAttention", ["q", "k", "v", "d"], [f"o{i}"], domain="infiniteid") for i in range(2)]
    nodes.append(helper.make_node("Relu", ["q"], ["r"]))
    graph = helper.make_graph(nodes, "g", [vi("q"), vi("k"), vi("v"), vi("d")], [vi("o0"), vi("o1"), vi("r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("infiniteid", 1)])
    path = tmp_path / "unet.onnx"
    onnx.save(model, str(path))
    assert plugin_node_count(path) == 2
    assert plugin_node_count(tmp_path / "missing.onnx") is None

    spec = ComponentSpec("unet", "onnx/unet.onnx", "fp16", "0" * 64, [], [])
    job = EngineJob("unet", spec, path, "0" * 64, "fp16", [], needs_plugin=True, plugin_nodes=2)
    ours = "infiniteid::MixedAttention"
    check_plugin_layers(job, [ours, ours])
    check_plugin_layers(job, [ours, None, "other::Plugin"])  # an unnamed layer counts as ours; others do not
    with pytest.raises(BuildError, match=r"has 2 infiniteid::MixedAttention node\(s\) but TensorRT's parser made 0 "
                                         r"plugin layer\(s\) of it: it imported the node's function body"):
        check_plugin_layers(job, [])
    with pytest.raises(BuildError, match="made 1 plugin layer"):
        check_plugin_layers(job, [ours, "other::Plugin"])
    unknown = EngineJob("unet", spec, path, "0" * 64, "fp16", [], needs_plugin=True, plugin_nodes=None)
    check_plugin_layers(unknown, [ours])  # a graph too big to count: at least one
    with pytest.raises(BuildError, match="has at least one"):
        check_plugin_layers(unknown, [])
    check_plugin_layers(EngineJob("vae", spec, path, "0" * 64, "fp16", []), [])  # no plugin asked: nothing to check


def test_phase_bars_follow_nested_phases_and_cancel():
    bars = PhaseBars("unet", max_depth=1, enabled=True)
    bars.start("Building engine", None, 3)
    bars.start("Timing", "Building engine", 10)
    bars.start("Tactic", "Timing", 100)  # too deep to draw, still followed
    assert bars._depth == {"Building engine": 0, "Timing": 1, "Tactic": 2}
    assert set(bars._bars) == {"Building engine", "Timing"}
    assert bars.step("Timing", 4) is True and bars._bars["Timing"].n == 5
    bars.finish("Tactic")
    bars.cancelled = True
    assert bars.step("Timing", 5) is False  # TensorRT stops the build when step_complete returns False
    bars.close()
    assert bars._bars == {}


def test_dry_run_description_is_json(tmp_path):
    from infiniteid.trt.plan import describe_jobs

    manifest = sdxl_manifest()
    opts = BuildOptions()
    doc = json.loads(json.dumps(describe_jobs(plan_jobs(tmp_path, manifest, opts, opts.shape_plan(manifest)))))
    assert [d["engine"] for d in doc] == ALL + ["step_cfg"]
    assert doc[-1]["step_graph"] == {"cfg": True, "noise_dtype": "float16", "sample_dtype": "float16"}
