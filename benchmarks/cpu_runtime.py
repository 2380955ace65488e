"""CPU benchmark: the torch-free runtime (onnxruntime) against the PyTorch reference, same run.

Two random-weight models:

* ``tiny``: the test model (:mod:`infiniteid.model.tiny`), 64x64 images;
* ``medium``: SDXL's U-Net widths (320/640/1280, attention heads of 64 channels,
  cross-attention 2048, ``text_time`` conditioning) with one ResNet layer and one
  transformer layer per block (SDXL has 2 and 1/2/10), SDXL's VAE widths with one
  layer per block, CLIP text encoders of SDXL's widths (768, 1280) and a CLIP
  ViT-H-width image encoder (224 px, 257 tokens) with two layers each (their
  penultimate states feed the model, as in SDXL), and the Infinite-ID mapper (261
  identity tokens); 256x256 images. ``infiniteid.model.tiny`` fixes its
  widths, so the configs are built here.

For each model the bundle is exported once (into ``--work``, reused by later runs);
then each backend runs in its own fresh interpreter, so that its peak memory
(``ru_maxrss``) is its own and the runtime's process never imports torch:

* one U-Net call, batch 4 (one image: two streams x CFG), same inputs for both;
* a 4-step DDIM generation (1 image, CFG 5, a precomputed face, the same initial
  noise), end to end: text encoders, ID encoder, loop, VAE decode.

Both use the same number of threads (``--threads``, default: the CPUs this process
may use). Times are medians after one warm-up, over a fixed number of runs per
model (tiny: 20 U-Net calls, 5 generations; medium: 4 and 2; the table says how
many). The outputs are compared too (U-Net relative error, max pixel difference
of the images).

Run::

    python benchmarks/cpu_runtime.py                          # both models, table on stdout
    python benchmarks/cpu_runtime.py --models tiny --out benchmarks/results/cpu_runtime-DATE.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing


@dataclass(frozen=True)
class Case:
    """One model's benchmark settings."""

    name: str
    height: int
    width: int
    steps: int
    step_repeats: int
    gen_repeats: int


CASES = {
    "tiny": Case("tiny", 64, 64, 4, step_repeats=20, gen_repeats=5),
    "medium": Case("medium", 256, 256, 4, step_repeats=4, gen_repeats=2),
}
PROMPT = "a photo of a person in comic book style"
SEED = 0


# -- models (torch; parent and reference child only) ------------------------------------
def medium_components(seed: int = 0):
    """SDXL-width components, one layer per block (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from infiniteid.imageproc import ClipImageConfig
    from infiniteid.model.id_encoder import IDEncoder, IDEncoderConfig, build_mapper
    from infiniteid.model.pipeline import Components
    from infiniteid.model.processors import install_processors
    from infiniteid.model.tiny import BOS, EOS, TINY_SCHEDULER_CONFIG, tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_tokenizer(EOS), tiny_tokenizer("!")

        def text_config(hidden: int, heads: int) -> CLIPTextConfig:
            return CLIPTextConfig(
                bos_token_id=tok1.tokenizer.token_to_id(BOS), eos_token_id=tok1.tokenizer.token_to_id(EOS),
                pad_token_id=tok1.pad_id, hidden_size=hidden, intermediate_size=4 * hidden,
                num_attention_heads=heads, num_hidden_layers=2, vocab_size=300, projection_dim=1280, hidden_act="gelu",
            )

        te1 = CLIPTextModel(text_config(768, 12)).eval()
        te2 = CLIPTextModelWithProjection(text_config(1280, 20)).eval()
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=1, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048, norm_num_groups=32,
        ).eval()
        install_processors(unet)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=32,
            sample_size=256, scaling_factor=0.13025,
        ).eval()
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=2,
            num_attention_heads=16, image_size=224, patch_size=14,
        )).eval()
        mapper = build_mapper(IDEncoderConfig(cross_attention_dim=2048, clip_dim=1280))
        id_encoder = IDEncoder(vision, mapper).eval()
    return Components(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        id_encoder=id_encoder, scheduler_config=dict(TINY_SCHEDULER_CONFIG), clip_image=ClipImageConfig(size=224),
        sources={"model": f"medium(seed={seed})"},
    )


def build_pipeline(model: str):
    """The reference pipeline of ``model`` (deterministic for :data:`SEED`)."""
    from infiniteid.model.pipeline import InfiniteIDPipeline

    return InfiniteIDPipeline.tiny(SEED) if model == "tiny" else InfiniteIDPipeline(medium_components(SEED))


def stale(bundle: Path, pipe: Any) -> str:
    """Why a cached bundle does not hold ``pipe`` (weights or tokenizers changed), or ``""``."""
    from infiniteid.bundle import BundleError
    from infiniteid.export.bundle_writer import source_digests
    from infiniteid.runtime.loader import Bundle
    from infiniteid.tokenize import PromptTokenizer

    try:
        b = Bundle.load(bundle)
    except BundleError as e:
        return str(e)
    if b.manifest.sources != source_digests(pipe):
        return "the model's weights changed since the export"
    probe = ["a photo of a person in comic book style", ""]
    for path, tok in zip(b.tokenizer_paths(), (pipe.c.tokenizer, pipe.c.tokenizer_2)):
        if not np.array_equal(PromptTokenizer.from_file(path)(probe), tok(probe)):
            return f"{path} tokenises differently from the model's tokenizer"
    return ""


def ensure_bundle(model: str, work: Path) -> Path:
    """Export ``model`` into ``work/<model>-bundle``; later runs reuse it while it still matches the model."""
    out = work / f"{model}-bundle"
    pipe = build_pipeline(model)
    why = stale(out, pipe)
    if not why:
        return out
    print(f"exporting {model}: {why}", file=sys.stderr)
    from infiniteid.export import ExportOptions, export_bundle

    case = CASES[model]
    work.mkdir(parents=True, exist_ok=True)
    opts = ExportOptions(height=case.height, width=case.width, min_resolution=min(case.height, case.width),
                         max_resolution=max(case.height, case.width), max_batch=1, opt_batch=1, max_identities=1)
    t0 = time.perf_counter()
    export_bundle(pipe, out, opts, overwrite=True, progress=True)
    print(f"exported {model} bundle to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


# -- shared inputs (numpy, identical in both children) ------------------------------------
def face_input():
    rng = np.random.default_rng(1)
    e = rng.standard_normal(512).astype(np.float32)
    return e / np.linalg.norm(e), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)


def unet_feeds(bundle: Path, case: Case) -> Dict[str, np.ndarray]:
    """Random U-Net inputs of the bundle's widths: batch 4 (one image, two streams, CFG)."""
    from infiniteid.bundle import read_manifest
    from infiniteid.generation import sdxl_time_ids

    m = read_manifest(bundle).model
    rng = np.random.default_rng(2)
    c, p, t = m["cross_attention_dim"], m["pooled_dim"], m["id_tokens"]
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "sample": f(4, 4, case.height // 8, case.width // 8),
        "timestep": np.array([501.0], dtype=np.float32),
        "encoder_hidden_states": f(4, 77, c),
        "text_embeds": f(4, p),
        "time_ids": np.tile(sdxl_time_ids(case.height, case.width), (4, 1)),
        "id_embeds": f(2, t, c),
        "id_scale": np.ones(2, dtype=np.float32),
    }


def timed(fn: Callable[[], Any], repeats: int) -> Dict[str, Any]:
    fn()  # warm-up (first-call allocations, lazy initialisation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats, "last": out}


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """Resident memory now."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory of this process image. ``VmHWM`` starts afresh at ``exec``;
    ``getrusage().ru_maxrss`` does not (Linux carries the parent's high-water mark
    over fork and exec), so a child started by a big parent would report the parent's."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- children ----------------------------------------------------------------------
def child_ort(model: str, bundle: Path, threads: int, out: Path) -> Dict[str, Any]:
    from infiniteid import generation as gen
    from infiniteid.contract import COMPONENTS
    from infiniteid.runtime import Runtime
    from infiniteid.runtime.generator import FaceInput

    case = CASES[model]
    t0 = time.perf_counter()
    rt = Runtime(bundle, backend="ort", intra_op_threads=threads, inter_op_threads=1)
    for c in COMPONENTS:
        rt.backend.session(c)
    load = time.perf_counter() - t0
    rss_loaded = rss_mib()
    feeds = unet_feeds(bundle, case)
    step = timed(lambda: rt.backend.run("unet", feeds)["noise_pred"], case.step_repeats)
    emb, crop = face_input()
    req = [gen.GenerationRequest(PROMPT, faces=[FaceInput(emb, crop)], seed=SEED)]
    s = gen.BatchSettings(height=case.height, width=case.width, steps=case.steps)
    generation = timed(lambda: rt.generate(req, s, progress=False), case.gen_repeats)
    np.savez(out.with_suffix(".npz"), noise_pred=step.pop("last"), image=generation.pop("last").arrays[0])
    return {
        "load_s": load, "rss_loaded_mib": rss_loaded, "unet_step": step, "generation": generation,
        "providers": rt.backend.active_providers("unet"),
        "torch_imported": "torch" in sys.modules,
    }


def child_torch(model: str, bundle: Path, threads: int, out: Path) -> Dict[str, Any]:
    import torch

    from infiniteid import generation as gen
    from infiniteid.model.pipeline import FaceInput
    from infiniteid.model.processors import KWARG, IDConditioning

    torch.set_num_threads(threads)
    case = CASES[model]
    t0 = time.perf_counter()
    pipe = build_pipeline(model)
    load = time.perf_counter() - t0
    rss_loaded = rss_mib()
    feeds = {k: torch.from_numpy(v) for k, v in unet_feeds(bundle, case).items()}

    @torch.no_grad()
    def unet_step():
        return pipe.c.unet(
            feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]},
            cross_attention_kwargs={KWARG: IDConditioning(feeds["id_embeds"], feeds["id_scale"])},
        ).sample.numpy()

    step = timed(unet_step, case.step_repeats)
    emb, crop = face_input()
    req = [gen.GenerationRequest(PROMPT, faces=[FaceInput(emb, crop)], seed=SEED)]
    s = gen.BatchSettings(height=case.height, width=case.width, steps=case.steps)
    generation = timed(lambda: pipe.generate(req, s, progress=False), case.gen_repeats)
    np.savez(out.with_suffix(".npz"), noise_pred=step.pop("last"), image=generation.pop("last").arrays[0])
    return {"load_s": load, "rss_loaded_mib": rss_loaded, "unet_step": step, "generation": generation,
            "torch_threads": torch.get_num_threads()}


def run_child(backend: str, model: str, bundle: Path, threads: int, tmp: Path) -> Dict[str, Any]:
    out = tmp / f"{model}-{backend}.json"
    cmd = [sys.executable, str(HERE), "--child", backend, "--models", model, "--bundle", str(bundle),
           "--threads", str(threads), "--child-out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    result["arrays"] = dict(np.load(out.with_suffix(".npz")))
    return result


# -- machine and report ------------------------------------------------------------------
def machine() -> Dict[str, str]:
    info = {"os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
        info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {f}" in flags)
    except OSError:
        info["cpu"] = platform.processor()
    info["logical_cpus"] = str(os.cpu_count())
    try:
        info["usable_cpus"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory"] = f"{kb / 1024**2:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return info


def versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("numpy", "onnxruntime-gpu", "onnxruntime", "torch", "diffusers", "transformers", "tokenizers", "onnx", "onnxslim"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def report(results: Dict[str, Dict[str, Any]], threads: int, argv: List[str], load: List[float]) -> str:
    lines = [f"# CPU runtime benchmark ({date.today().isoformat()})", ""]
    lines.append("The torch-free runtime on onnxruntime (CPU provider) against the PyTorch reference, "
                 "same process layout, same inputs, same thread count. Random weights (see "
                 "`benchmarks/cpu_runtime.py` for the models).")
    lines += ["", f"Command: `python benchmarks/cpu_runtime.py {' '.join(argv)}`", "", "## Machine", ""]
    for k, v in machine().items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- threads per backend: {threads} (onnxruntime intra-op; torch.set_num_threads)")
    lines.append(f"- load average (1 min) at start / end: {load[0]:.2f} / {os.getloadavg()[0]:.2f} "
                 "(other work on the machine slows both backends; the runs alternate, not overlap)")
    lines += ["", "## Versions", "", "- " + ", ".join(f"{k} {v}" for k, v in versions().items()), "", "## Results", ""]
    lines.append("| model | resolution | backend | load s | U-Net step s (batch 4), median (min) | 4-step generation s, median (min) | RSS after load MiB | peak RSS MiB |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for model, r in results.items():
        case = CASES[model]
        for backend, label in (("torch", "PyTorch reference"), ("ort", "runtime, onnxruntime")):
            x = r[backend]
            lines.append(
                f"| {model} | {case.width}x{case.height} | {label} | {x['load_s']:.2f} | "
                f"{x['unet_step']['median_s']:.4f} ({x['unet_step']['min_s']:.4f}) | "
                f"{x['generation']['median_s']:.3f} ({x['generation']['min_s']:.3f}) | "
                f"{x['rss_loaded_mib']:.0f} | {x['peak_rss_mib']:.0f} |"
            )
    lines += ["", "| model | U-Net step: torch / ort (of medians; of mins) | generation: torch / ort (of medians; of mins) | peak RSS: ort / torch | U-Net rel. error | max pixel diff |",
              "|---|---|---|---|---|---|"]
    for model, r in results.items():
        t, o = r["torch"], r["ort"]
        ratio = lambda key: (f"{t[key]['median_s'] / o[key]['median_s']:.2f}x; "  # noqa: E731
                             f"{t[key]['min_s'] / o[key]['min_s']:.2f}x")
        lines.append(
            f"| {model} | {ratio('unet_step')} | {ratio('generation')} | "
            f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f} | {r['unet_rel_err']:.1e} | {r['max_pixel_diff']}/255 |"
        )
    lines += ["", "Notes:", "",
              "- Times are medians after one warm-up (U-Net step: "
              + ", ".join(f"{m} {CASES[m].step_repeats} runs" for m in results)
              + "; generation: " + ", ".join(f"{m} {CASES[m].gen_repeats} runs" for m in results) + ").",
              "- Each backend runs in its own fresh interpreter; peak RSS is that process's `VmHWM`. "
              "The reference's load is building the random-weight modules; the runtime's is opening the five "
              "onnxruntime sessions from the bundle.",
              "- Ratios above 1 in the first two columns mean the runtime is faster. On a shared machine the "
              "minimum is the better estimate of uncontended speed; the median shows the spread.",
              f"- The runtime process imported torch: {any(r['ort']['torch_imported'] for r in results.values())}."]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,medium", help="comma-separated: tiny, medium")
    p.add_argument("--threads", type=int, default=None, help="threads per backend (default: usable CPUs)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infiniteid-cpu-bench",
                   help="folder for the exported bundles (reused across runs)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    p.add_argument("--child", choices=("ort", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in CASES:
            p.error(f"unknown model {m!r}; choose from {', '.join(CASES)}")

    if args.child:
        fn = child_ort if args.child == "ort" else child_torch
        result = fn(models[0], args.bundle, threads, args.child_out)
        result["peak_rss_mib"] = peak_rss_mib()
        args.child_out.write_text(json.dumps(result, default=float))
        return 0

    load = [os.getloadavg()[0]]
    results: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            bundle = ensure_bundle(model, args.work)
            r = {b: run_child(b, model, bundle, threads, Path(tmp)) for b in ("torch", "ort")}
            a, b = r["ort"].pop("arrays"), r["torch"].pop("arrays")
            r["unet_rel_err"] = float(np.abs(a["noise_pred"] - b["noise_pred"]).max() / np.abs(b["noise_pred"]).max())
            r["max_pixel_diff"] = int(np.abs(a["image"].astype(int) - b["image"].astype(int)).max())
            results[model] = r
            print(f"{model}: done", file=sys.stderr)
    text = report(results, threads, argv, load)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
