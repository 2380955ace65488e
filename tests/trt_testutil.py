"""Shared helpers of the TensorRT tests: an SDXL-sized manifest without weights, a tiny exported bundle.

The SDXL manifest comes from the export's own shape-range code
(:func:`infiniteid.export.model_info.tensor_specs`) with SDXL's widths, so the
profile tests see exactly the ranges a real SDXL export declares.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from infiniteid.bundle import ComponentSpec, Manifest
from infiniteid.contract import COMPONENTS

SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
    "set_alpha_to_one": False,
}


def sdxl_info():
    from infiniteid.export.model_info import ModelInfo

    return ModelInfo(
        kind="sdxl", text_hidden=768, text_hidden_2=1280, pooled_dim=1280, cross_attention_dim=2048,
        clip_image_size=224, face_embed_dim=512, max_length=77, latent_channels=4, id_tokens=261,
        resolution_multiple=32, default_size=1024, vae_scale_factor=8, vae_scaling_factor=0.13025,
    )


def fake_digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def sdxl_manifest(precision: str = "fp16", vae_precision: str = "fp32") -> Manifest:
    """A validated SDXL manifest (no files behind it): the ranges of a default SDXL export."""
    from infiniteid.export.model_info import tensor_specs
    from infiniteid.export.options import ExportOptions

    info = sdxl_info()
    opts = ExportOptions(precision=precision, vae_precision=vae_precision).resolve(32, 1024)
    comps = {}
    for c in COMPONENTS:
        inputs, outputs = tensor_specs(c, info, opts)
        comps[c] = ComponentSpec(name=c, file=f"onnx/{c}.onnx", precision=opts.precision_of(c),
                                 sha256=fake_digest(c, opts.precision_of(c)), inputs=inputs, outputs=outputs)
    m = Manifest(
        components=comps, model=info.to_dict(), scheduler_config=dict(SDXL_SCHEDULER),
        resolution={"multiple": 32, "min": opts.min_resolution, "max": opts.max_resolution,
                    "default_height": 1024, "default_width": 1024},
        max_images=opts.max_batch, sources={}, tools={},
    )
    m.validate()
    return m


def tiny_bundle(tmp_path_factory, precision: str = "fp32") -> Path:
    """The tiny seeded model exported once per test session (shared by the test modules that need it)."""
    from infiniteid.export import ExportOptions, export_tiny_bundle

    out = tmp_path_factory.getbasetemp() / f"tiny-bundle-{precision}"
    if not (out / "manifest.json").is_file():
        # no onnxslim pass and no checker: the same graphs, exported three times faster
        export_tiny_bundle(out, options=ExportOptions(precision=precision, slim=False, check=False), overwrite=True)
    return out
