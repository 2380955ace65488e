"""``infiniteid build`` on quantized bundles: the precision check here, a real INT8/FP8 engine where TensorRT runs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from trt_testutil import sdxl_manifest

from infiniteid.trt.plan import BuildError, check_precision

ALL = ["text_encoder", "text_encoder_2", "id_encoder", "unet", "vae_decoder"]


def quantized_manifest(precision: str, base: str = "fp32"):
    m = sdxl_manifest(precision=base)
    m.components["unet"] = dataclasses.replace(m.components["unet"], precision=precision)
    return m


def test_int8_and_fp8_are_checked_against_the_unet(tmp_path):
    for q in ("int8", "fp8"):
        check_precision(quantized_manifest(q), q, ALL, tmp_path)  # the encoders stay as exported
        check_precision(quantized_manifest(q, base="fp16"), q, ALL, tmp_path)
        check_precision(sdxl_manifest(), q, ["vae_decoder"], tmp_path)  # no U-Net in this build
    with pytest.raises(BuildError) as e:
        check_precision(sdxl_manifest(), "int8", ALL, tmp_path)
    assert "--precision int8 asked, but the bundle's U-Net is fp16" in str(e.value)
    assert "infiniteid calibrate ... --precision int8" in str(e.value)
    with pytest.raises(BuildError, match="U-Net is int8"):
        check_precision(quantized_manifest("int8"), "fp8", ALL, tmp_path)
    with pytest.raises(BuildError, match="--precision fp32 asked, but the bundle's unet ONNX is int8"):
        check_precision(quantized_manifest("int8"), "fp32", ALL, tmp_path)


def test_build_command_takes_int8_and_fp8(capsys):
    from infiniteid.cli import build_parser

    args = build_parser().parse_args(["build", "b", "--precision", "fp8"])
    assert args.precision == "fp8"


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_builds_and_runs_a_quantized_unet(precision, tmp_path):
    """A strongly typed engine from the tiny model's QDQ U-Net, against onnxruntime on the same bundle."""
    from infiniteid.calibration import CaptureConfig, QuantConfig, capture, quantize_unet, write_quantized_bundle
    from infiniteid.cli import main
    from infiniteid.commands.demo import demo_face
    from infiniteid.face import FaceEmbedder, write_synthetic_face_models
    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.runtime.loader import Bundle
    from infiniteid.runtime.ort_backend import OrtBackend
    from infiniteid.runtime.trt_backend import TrtBackend

    models = write_synthetic_face_models(tmp_path / "models")
    demo_face().save(tmp_path / "face.png")
    pipe = InfiniteIDPipeline.tiny(0, face=FaceEmbedder.from_folder(models))
    data = capture(pipe, [tmp_path / "face.png"], tmp_path / "cap",
                   CaptureConfig(prompts=["a portrait of a person"], steps=3, samples=1), progress=False)
    qc = QuantConfig(precision=precision)
    write_quantized_bundle(pipe, quantize_unet(pipe.c.unet, data, qc, progress=False), tmp_path / "b", qc,
                           progress=False)
    assert main(["build", str(tmp_path / "b"), "--precision", precision, "--components", "unet",
                 "--no-step-graph", "--no-progress"]) == 0
    bundle = Bundle.load(tmp_path / "b")
    call = next(data.calls())
    trt = TrtBackend(bundle, components=["unet"]).run("unet", call)["noise_pred"]
    ort = OrtBackend(bundle).run("unet", call)["noise_pred"]
    # same Q/DQ graph, different kernels: the quantization-noise bound of test_calibration
    assert np.linalg.norm(trt - ort) / np.linalg.norm(ort) < 0.1
