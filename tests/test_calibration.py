"""Calibration: capture from real reference runs, INT8/FP8 QDQ U-Nets on onnxruntime, the accuracy report.

One tiny seeded model, the synthetic face models and a drawn face serve every test;
the quantized bundles are built once per module (modelopt on the CPU).
"""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from infiniteid import generation as gen
from infiniteid.bundle import read_manifest, write_manifest, file_digest
from infiniteid.calibration import (
    CalibrationError,
    CaptureConfig,
    QuantConfig,
    accuracy_report,
    capture,
    fake_quant_graph,
    quantize_unet,
    read_prompts,
    split_held_out,
    write_quantized_bundle,
)
from infiniteid.calibration.capture import FIXED, PER_STEP, unet_contract_names
from infiniteid.calibration.config import spread
from infiniteid.calibration.quantize import qdq_summary
from infiniteid.commands.demo import demo_face
from infiniteid.export.graphs import UNetGraph

STEPS, SAMPLES = 3, 2
PROMPTS = ["a portrait of a person, studio lighting", "a person in comic book style", "an oil painting of a person"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from infiniteid.face import FaceEmbedder, write_synthetic_face_models
    from infiniteid.model.pipeline import InfiniteIDPipeline

    root = tmp_path_factory.mktemp("calibration")
    models = write_synthetic_face_models(root / "face-models", seed=0)
    (root / "faces").mkdir()
    demo_face().save(root / "faces" / "a.png")
    pipe = InfiniteIDPipeline.tiny(0, face=FaceEmbedder.from_folder(models))
    return {"root": root, "models": models, "faces": [root / "faces" / "a.png"], "pipe": pipe}


@pytest.fixture(scope="module")
def captured(world):
    config = CaptureConfig(prompts=PROMPTS, steps=STEPS, samples=SAMPLES, seed=7)
    return capture(world["pipe"], world["faces"], world["root"] / "capture", config, progress=False)


@pytest.fixture(scope="module")
def quantized(world, captured):
    """precision -> (fake-quant U-Net, bundle folder)."""
    out = {}
    for precision in ("int8", "fp8"):
        qc = QuantConfig(precision=precision)
        qunet = quantize_unet(world["pipe"].c.unet, captured, qc, progress=False)
        folder = world["root"] / f"bundle-{precision}"
        write_quantized_bundle(world["pipe"], qunet, folder, qc, progress=False)
        out[precision] = (qunet, folder)
    return out


def timesteps():
    """The reference scheduler's timesteps for STEPS (diffusers' DDIM on the tiny model's config)."""
    from infiniteid.model.schedulers import make_torch_scheduler
    from infiniteid.model.tiny import TINY_SCHEDULER_CONFIG

    s = make_torch_scheduler("ddim", TINY_SCHEDULER_CONFIG)
    s.set_timesteps(STEPS)
    return [float(t) for t in s.timesteps]


def rel_l2(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


# -- prompts ---------------------------------------------------------------------------
def test_default_prompt_set_and_held_out_split(tmp_path):
    prompts = read_prompts().prompts
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    calib, held = split_held_out(prompts)
    assert held and not set(calib) & set(held) and len(calib) + len(held) == len(prompts)
    # a short calibration spreads over the whole list (styles are at its end)
    assert [spread(i, 4, len(calib)) for i in range(4)] == [0, len(calib) // 4, len(calib) // 2, 3 * len(calib) // 4]
    assert [spread(i, 5, 2) for i in range(5)] == [0, 1, 0, 1, 0]

    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(CalibrationError, match="no prompts in it"):
        read_prompts(empty)
    with pytest.raises(CalibrationError, match="prompt file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_configs_refuse_bad_values():
    with pytest.raises(CalibrationError, match="unknown precision 'int4'"):
        QuantConfig(precision="int4").validate()
    with pytest.raises(CalibrationError, match="alpha"):
        QuantConfig(alpha=1.5).validate()
    with pytest.raises(CalibrationError, match="prompt set is empty"):
        CaptureConfig(prompts=["  "]).validate()
    with pytest.raises(CalibrationError, match="steps must be a positive integer"):
        CaptureConfig(prompts=["a"], steps=0).validate()


# -- capture ---------------------------------------------------------------------------
def test_capture_shapes_dtypes_and_contents(world, captured):
    pipe = world["pipe"]
    assert len(captured.shards) == SAMPLES and len(captured) == SAMPLES * STEPS
    assert [s.prompt for s in captured.shards] == PROMPTS[:SAMPLES] and [s.seed for s in captured.shards] == [7, 8]
    latent = 16  # the tiny model: 128 px / 8
    with np.load(captured.folder / captured.shards[0].file) as z:
        assert sorted(z.files) == sorted(PER_STEP + FIXED)
        assert z["sample"].shape == (STEPS, 4, 4, latent, latent)  # steps x [text u, text c, id u, id c]
        assert z["timestep"].shape == (STEPS, 1)
        assert z["encoder_hidden_states"].shape == (4, 77, 64)
        assert z["id_embeds"].shape == (2, 21, 64) and z["id_scale"].shape == (2,)
        assert all(z[n].dtype == np.float32 for n in z.files)
        # the scheduler's timesteps, in order; both streams start from the same noise
        assert list(z["timestep"][:, 0]) == timesteps()
        np.testing.assert_array_equal(z["sample"][0, 1], z["sample"][0, 3])
    # the captured inputs are the pipeline's own: the reference generation's conditioning
    req = gen.GenerationRequest(prompt=PROMPTS[0], faces=[str(world["faces"][0])], seed=7)
    cond = pipe.conditioning([req], gen.BatchSettings(height=128, width=128, steps=STEPS))
    call = next(captured.calls())
    np.testing.assert_array_equal(call["encoder_hidden_states"], cond["encoder_hidden_states"].numpy())
    assert set(call) == set(unet_contract_names())


def test_capture_is_deterministic_and_resumes_after_an_interruption(world, captured, tmp_path):
    config = CaptureConfig(prompts=PROMPTS, steps=STEPS, samples=SAMPLES, seed=7)

    def stop_after_first(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(world["pipe"], world["faces"], tmp_path / "cap", config, progress=False, on_shard=stop_after_first)
    half = json.loads((tmp_path / "cap" / "capture.json").read_text())
    assert [s["index"] for s in half["shards"]] == [0]
    first = tmp_path / "cap" / "shard-00000.npz"
    stamp = first.stat().st_mtime_ns

    resumed = []
    again = capture(world["pipe"], world["faces"], tmp_path / "cap", config, progress=False, on_shard=resumed.append)
    assert resumed == [1]  # shard 0 was kept, not recomputed
    assert first.stat().st_mtime_ns == stamp
    for a, b in zip(again.calls(), captured.calls()):  # same seeds -> bit-identical data
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])

    with pytest.raises(CalibrationError, match="holds a different capture"):
        capture(world["pipe"], world["faces"], tmp_path / "cap", CaptureConfig(prompts=PROMPTS, steps=2, samples=1),
                progress=False)


def test_capture_refuses_no_faces(world, tmp_path):
    from infiniteid.calibration import face_files

    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no face images in it"):
        face_files(tmp_path / "empty")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CalibrationError, match="is not a folder"):
        capture(world["pipe"], world["faces"], tmp_path / "a-file", CaptureConfig(prompts=PROMPTS), progress=False)
    with pytest.raises(CalibrationError, match="no faces given"):
        capture(world["pipe"], [], tmp_path / "c", CaptureConfig(prompts=PROMPTS, steps=1, samples=1), progress=False)


# -- quantized graphs ------------------------------------------------------------------
def test_qdq_graphs_hold_standard_int8_and_fp8_quantizers(quantized, capsys):
    for precision, want, opset in (("int8", "INT8", 17), ("fp8", "FLOAT8E4M3FN", 19)):
        folder = quantized[precision][1]
        manifest = read_manifest(folder)
        unet = manifest.components["unet"]
        assert unet.precision == precision
        q = unet.options["quantization"]
        assert q["precision"] == precision and q["tool"] == "nvidia-modelopt" and "*conv_in*" in q["keep"]
        assert q["base_precision"] == "fp32"
        assert ("alpha" in q) == (precision == "int8")
        assert all(manifest.components[c].precision == "fp32" for c in manifest.components if c != "unet")
        model = onnx.load(str(folder / unet.file))
        summary = qdq_summary(model)
        assert list(summary) == [want] and summary[want] > 100
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no TensorRT-only custom ops
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
        # layers NVIDIA keeps in high precision are not quantized
        names = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert not [n for n in names if "conv_in" in n or "conv_out" in n or "time_embedding" in n]

        from infiniteid.cli import main

        assert main(["inspect", str(folder)]) == 0
        shown = capsys.readouterr().out
        assert 'unet quantization: ' in shown and f'precision="{precision}"' in shown


def _ort_unet(folder):
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.ort_backend import OrtBackend

    backend = OrtBackend(Bundle.load(folder), intra_op_threads=2)
    return lambda feeds: backend.run("unet", feeds)["noise_pred"]


def test_onnxruntime_matches_modelopt_fake_quant_within_the_quantization_noise(world, captured, quantized):
    """Bound: ``rel_l2(onnxruntime, fake-quant) <= 1.5 * rel_l2(fake-quant, fp32)`` (and < 0.1).

    Why not an fp16-style 1e-3: a quantized network is piecewise constant. The two
    implementations compute each layer's input in a different float order
    (``x / scale`` vs ``x * (1 / scale)``, fused kernels, onnxruntime's integer GEMMs), so
    values near a rounding boundary land on neighbouring grid points; each such flip moves
    a value by a whole quantization step, and every later quantizer re-rounds the
    difference. Measured: the first quantized convolutions agree to 3e-7, the first
    SmoothQuant linear to 7e-4, and the disagreement grows layer by layer to the size of
    the quantization noise itself (int8 0.9x, fp8 0.5-0.7x of fake-quant vs fp32 at the
    output) -- but not beyond it, since both sides round nearly the same values to the
    same grid. A graph with a wrong scale or a missing quantizer is far outside the bound
    (checked below with deliberately rescaled scales).
    """
    names = unet_contract_names()
    ref = UNetGraph(world["pipe"].c.unet).eval()
    calls = list(captured.calls())
    for precision in ("int8", "fp8"):
        qunet, folder = quantized[precision]
        fq = fake_quant_graph(qunet)
        ort_unet = _ort_unet(folder)
        for call in (calls[0], calls[-1]):  # the noisiest step and the last one
            with torch.no_grad():
                args = [torch.from_numpy(call[n]) for n in names]
                a, r = fq(*args).numpy(), ref(*args).numpy()
            o = ort_unet(call)
            noise = rel_l2(a, r)
            assert 1e-3 < noise < 0.15, (precision, noise)  # quantization happened, and it is mild
            assert rel_l2(o, a) <= 1.5 * noise and rel_l2(o, a) < 0.1, (precision, call["timestep"], rel_l2(o, a), noise)

        broken = _broken_bundle(folder, world["root"] / f"broken-{precision}-clip", factor=1 / 16)
        o = _ort_unet(broken)(calls[0])
        with torch.no_grad():
            args = [torch.from_numpy(calls[0][n]) for n in names]
            a, r = fq(*args).numpy(), ref(*args).numpy()
        assert rel_l2(o, a) > 1.5 * rel_l2(a, r)  # the bound catches a wrong scale


def _broken_bundle(src, dst, factor):
    """A copy of a quantized bundle with every quantization scale multiplied by ``factor``
    (1/16: every tensor clips at a sixteenth of its calibrated range, in INT8 and FP8 alike; FP8 is
    nearly blind to a coarser scale, being floating point): the deliberately broken case."""
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    spec = manifest.components["unet"]
    path = dst / spec.file
    model = onnx.load(str(path))
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(factor), init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in scales:
            t = node.attribute[0].t
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(model, str(path))
    spec.sha256, spec.size = file_digest(path), path.stat().st_size
    write_manifest(dst, manifest)
    return dst


def test_a_quantized_bundle_generates_through_the_torch_free_runtime(world, quantized):
    from infiniteid.runtime import Runtime

    request = gen.GenerationRequest(prompt=PROMPTS[1], faces=[str(world["faces"][0])], seed=3)
    settings = gen.BatchSettings(height=128, width=128, steps=STEPS)
    reference = world["pipe"].generate([request], settings, progress=False).arrays[0].astype(np.float64)
    for precision in ("int8", "fp8"):
        rt = Runtime(quantized[precision][1], backend="ort", face_models=world["models"])
        try:
            image = rt.generate([request], settings).arrays[0].astype(np.float64)
        finally:
            rt.close()
        assert image.shape == reference.shape and image.std() > 1
        psnr = 10 * np.log10(255.0**2 / np.mean((image - reference) ** 2))
        assert 25.0 < psnr < 80.0, (precision, psnr)  # close to the fp32 reference, yet not identical


# -- accuracy report ---------------------------------------------------------------------
def test_report_orders_fp32_above_quantized_above_a_broken_scale(world, quantized, tmp_path_factory, tmp_path):
    from infiniteid.commands.demo import tiny_bundle

    fp32 = tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)  # the session's tiny fp32 bundle
    pipe, faces = world["pipe"], world["faces"]
    held = [PROMPTS[2]]
    kw = dict(samples=1, steps=STEPS, progress=False)
    reports = {name: accuracy_report(pipe, folder, held, faces, worst=10 if name in ("int8", "fp32") else 0, **kw)
               for name, folder in (
        ("fp32", fp32), ("int8", quantized["int8"][1]), ("fp8", quantized["fp8"][1]),
        ("broken", _broken_bundle(quantized["int8"][1], world["root"] / "broken-int8-clip", factor=1 / 16)),
    )}
    s = {k: r.summary() for k, r in reports.items()}
    for k, v in s.items():
        assert all(np.isfinite(x) for x in v.values() if x is not None), (k, v)
        assert v["arcface_quantized"] is not None and v["arcface_reference"] is not None
    assert s["fp32"]["noise_cosine_min"] > 0.99999 and s["fp32"]["psnr_db_mean"] > 60
    assert abs(s["fp32"]["arcface_drop"]) < 1e-3
    for q in ("int8", "fp8"):
        assert s[q]["noise_cosine_min"] < s["fp32"]["noise_cosine_min"] and s[q]["psnr_db_mean"] < s["fp32"]["psnr_db_mean"]
        assert s[q]["noise_cosine_min"] > 0.99 and s[q]["psnr_db_mean"] > 25
        assert s["broken"]["noise_rel_l2_mean"] > 3 * s[q]["noise_rel_l2_mean"]
        assert s["broken"]["psnr_db_mean"] < s[q]["psnr_db_mean"] - 6
    assert len(reports["int8"].steps) == STEPS and [st.timestep for st in reports["int8"].steps] == timesteps()
    worst = reports["int8"].worst_layers
    assert worst and worst[0].rel_l2 >= worst[-1].rel_l2 > 0 and {w.kind for w in worst} <= {"input", "weight"}
    assert reports["fp32"].worst_layers == []  # nothing quantized
    ranges = reports["int8"].stream_ranges  # every mixed-attention K/V projection, both streams seen
    attn1 = [n for n, _ in pipe.c.unet.named_modules() if n.endswith(("attn1.to_k", "attn1.to_v"))]
    assert attn1 and sorted(r.layer for r in ranges) == sorted(attn1)
    assert all(r.text_amax > 0 and r.id_amax > 0 and r.ratio >= 1 for r in ranges)
    assert [(r.text_amax, r.id_amax) for r in ranges] == [(r.text_amax, r.id_amax) for r in reports["fp8"].stream_ranges]

    path = reports["int8"].save(tmp_path / "r.json")
    d = json.loads(path.read_text())
    assert d["precision"] == "int8" and d["summary"]["psnr_db_mean"] == pytest.approx(s["int8"]["psnr_db_mean"])
    table = reports["int8"].table()
    assert "PSNR" in table and "ArcFace" in table and "worst quantizers" in table and "per stream" in table


# -- the command -------------------------------------------------------------------------
def _cli(capsys, *argv):
    from infiniteid.cli import main

    code = main(["calibrate", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_calibrate_refuses_bad_input_with_one_line_errors(world, quantized, tmp_path, capsys):
    faces, models = world["faces"][0].parent, world["models"]
    base = ["--faces", faces, "--face-models", models, "--bundle-out", tmp_path / "out"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "no-faces").mkdir()
    cases = [
        (["--tiny", "--precision", "int4", *base], "unknown precision 'int4'; choose one of int8, fp8"),
        (["--tiny", "--precision", "int8", "--prompts", tmp_path / "empty.txt", *base], "no prompts in it"),
        (["--tiny", "--precision", "int8", "--faces", tmp_path / "no-faces", "--face-models", models,
          "--bundle-out", tmp_path / "out"], "no face images in it"),
        (["--tiny", "--precision", "int8", "--faces", faces, "--face-models", tmp_path / "nope",
          "--bundle-out", tmp_path / "out"], "nope"),
        (["--precision", "fp8", "--base", tmp_path / "sdxl", *base], "missing --image-encoder, --adapter"),
        (["--precision", "fp8", "--base", tmp_path / "sdxl", "--image-encoder", tmp_path, "--adapter", tmp_path / "a",
          *base], "--base: folder not found"),
        (["--tiny", "--precision", "int8", "--calibrator", "entropy", *base], "unknown calibrator 'entropy'"),
        # the report compares against the model the bundle was made from: without it, or with others, refused
        (["--precision", "int8", "--report-only", "--faces", faces, "--face-models", models,
          "--bundle-out", quantized["int8"][1]], "runs the unquantized source model"),
        (["--tiny", "--seed", "1", "--precision", "int8", "--report-only", "--faces", faces, "--face-models", models,
          "--bundle-out", quantized["int8"][1]], "was not made from these source weights"),
        (["--tiny", "--precision", "int8", "--report-only", "--faces", faces, "--face-models", models,
          "--bundle-out", tmp_path / "missing"], "bundle folder not found"),
    ]
    for argv, message in cases:
        code, err = _cli(capsys, *argv)
        assert code == 1 and message in err, (argv, err)
        assert err.startswith("infiniteid calibrate: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_calibrate_help_has_examples(capsys):
    from infiniteid.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert "infiniteid calibrate --tiny --precision int8" in out and "--report-only" in out and "--max-batch" in out


@pytest.mark.heavy
def test_calibrate_tiny_end_to_end_then_report_only(world, tmp_path):
    """The command as CI's demo of this feature runs it: a fresh process, the tiny model, a CPU."""
    import subprocess
    import sys

    out = tmp_path / "tiny-fp8"
    argv = [sys.executable, "-m", "infiniteid.cli", "calibrate", "--tiny", "--precision", "fp8",
            "--faces", str(world["faces"][0].parent), "--face-models", str(world["models"]),
            "--bundle-out", str(out), "--steps", "3", "--samples", "3", "--report-samples", "1", "--no-progress"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "captured 9 U-Net calls from 3 runs" in run.stdout and "PSNR" in run.stdout
    manifest = read_manifest(out)
    assert manifest.components["unet"].precision == "fp8"  # over fp16, the default base precision
    assert manifest.components["unet"].options["quantization"]["base_precision"] == "fp16"
    assert manifest.components["unet"].inputs[0].dtype == "float16"
    report = json.loads((out / "accuracy.json").read_text())
    assert report["summary"]["psnr_db_mean"] > 25 and len(report["steps"]) == 3
    assert (tmp_path / "tiny-fp8-calibration" / "capture.json").is_file()

    again = subprocess.run(argv + ["--report-only", "--report-json", str(tmp_path / "again.json")],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["summary"] == report["summary"]


def test_percentile_calibration_clips_activation_ranges_below_their_maxima(world, captured):
    from modelopt.torch.quantization.nn import TensorQuantizer

    def input_amax(qc):
        q = quantize_unet(world["pipe"].c.unet, captured, qc, progress=False)
        return {n: float(m.amax.max()) for n, m in q.named_modules()
                if isinstance(m, TensorQuantizer) and n.endswith("input_quantizer") and m.is_enabled}, q

    by_max, _ = input_amax(QuantConfig(precision="fp8"))
    by_pct, q = input_amax(QuantConfig(precision="fp8", calibrator="percentile", percentile=99.0, keep_id_projections=True))
    assert set(by_pct) < set(by_max)  # to_k_ip / to_v_ip kept in high precision
    assert not [n for n in by_pct if "to_k_ip" in n or "to_v_ip" in n] and [n for n in by_max if "to_k_ip" in n]
    ratios = np.array([by_pct[n] / by_max[n] for n in by_pct])
    assert (ratios <= 1.0 + 1e-6).all() and np.median(ratios) < 0.9  # the 99th percentile sits below the maximum
    call = next(captured.calls())
    with torch.no_grad():
        out = fake_quant_graph(q)(*[torch.from_numpy(call[n]) for n in unet_contract_names()])
    assert torch.isfinite(out).all()
