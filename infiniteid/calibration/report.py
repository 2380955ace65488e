"""The accuracy report: a quantized (or any) bundle's U-Net against the unquantized reference.

On held-out prompts and faces, for each sample the reference pipeline generates twice
from the same seed, both times through its own code:

1. *reference trajectory*: a forward hook on the U-Net also runs the bundle's U-Net
   (onnxruntime) on the very same inputs, giving per-step noise-prediction cosine and
   relative L2 error (error of one step, not accumulated);
2. *quantized trajectory*: the hook replaces the U-Net's output by the bundle's, so the
   whole denoising runs on the quantized U-Net; its final image is compared with the
   reference image (PSNR, SSIM) and, through the face front end, for identity: ArcFace
   cosine between the reference face and each generated face, and its drop.

Whether the mixed attention's text and ID keys/values would want separate quantizers:
``attn1``'s ``to_k``/``to_v`` see both streams in one batch, so one input quantizer
serves both; the report records, per such layer, the largest input magnitude of the
text rows and of the ID rows on the reference trajectory (:class:`StreamRange`). A
ratio near 1 means one scale fits both streams; a large one means the smaller stream
is quantized on a coarser grid than it needs.

The worst layers come from the QDQ graph itself (:func:`layer_errors`): for every
quantizer, the relative L2 error between the tensor it quantizes and its dequantized
value on a real U-Net input (local error; weights and activations).

:class:`AccuracyReport` prints as a table and saves as JSON.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import generation as gen
from ..bundle import read_manifest
from .capture import unet_call_inputs
from .config import spread

_QUANTIZER = re.compile(r"^/?(?:unet/)?(?P<layer>.+?)/(?P<kind>input|weight)_quantizer/")


@dataclass
class StepStats:
    step: int
    timestep: float
    cosine: float  # mean over samples
    rel_l2: float  # mean over samples
    worst_cosine: float


@dataclass
class SampleStats:
    prompt: str
    face: str
    seed: int
    psnr: float
    ssim: float
    arcface_reference: Optional[float]  # cosine(reference face, image of the unquantized model)
    arcface_quantized: Optional[float]  # cosine(reference face, image of the bundle's U-Net)


@dataclass
class LayerStats:
    layer: str
    kind: str  # "input" (activation) or "weight"
    rel_l2: float


@dataclass
class StreamRange:
    layer: str  # an attn1 to_k / to_v projection: its input holds both streams
    text_amax: float
    id_amax: float

    @property
    def ratio(self) -> float:
        lo, hi = sorted((self.text_amax, self.id_amax))
        return hi / lo if lo > 0 else math.inf


@dataclass
class AccuracyReport:
    precision: str
    bundle: str
    settings: Dict[str, Any]
    steps: List[StepStats] = field(default_factory=list)
    samples: List[SampleStats] = field(default_factory=list)
    worst_layers: List[LayerStats] = field(default_factory=list)
    stream_ranges: List[StreamRange] = field(default_factory=list)

    # -- summary numbers ----------------------------------------------------------
    def summary(self) -> Dict[str, Optional[float]]:
        def mean(xs):
            xs = [x for x in xs if x is not None and math.isfinite(x)]
            return float(np.mean(xs)) if xs else None

        ref = mean([s.arcface_reference for s in self.samples])
        q = mean([s.arcface_quantized for s in self.samples])
        return {
            "noise_cosine_mean": mean([s.cosine for s in self.steps]),
            "noise_cosine_min": min((s.worst_cosine for s in self.steps), default=None),
            "noise_rel_l2_mean": mean([s.rel_l2 for s in self.steps]),
            "noise_rel_l2_max": max((s.rel_l2 for s in self.steps), default=None),
            "psnr_db_mean": mean([s.psnr for s in self.samples]),
            "psnr_db_min": min((s.psnr for s in self.samples), default=None),
            "ssim_mean": mean([s.ssim for s in self.samples]),
            "arcface_reference": ref,
            "arcface_quantized": q,
            "arcface_drop": None if ref is None or q is None else ref - q,
            "stream_range_ratio_max": max((r.ratio for r in self.stream_ranges), default=None),
        }

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_number) + "\n")
        return path

    def table(self) -> str:
        s = self.summary()
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        lines = [
            f"accuracy of {self.precision} U-Net ({self.bundle}) against the unquantized reference",
            f"  {len(self.samples)} held-out samples, {self.settings.get('steps')} steps, "
            f"{self.settings.get('height')}x{self.settings.get('width')}",
            "",
            "  step  timestep  noise cosine  (worst)   rel L2",
        ]
        for st in self.steps:
            lines.append(f"  {st.step:4d}  {st.timestep:8.0f}  {st.cosine:12.6f}  {st.worst_cosine:8.6f}  {st.rel_l2:7.4f}")
        lines += [
            "",
            f"  final image   PSNR {f(s['psnr_db_mean'], '.2f')} dB (min {f(s['psnr_db_min'], '.2f')}), "
            f"SSIM {f(s['ssim_mean'], '.4f')}",
            f"  identity      ArcFace cosine to the reference face: unquantized {f(s['arcface_reference'], '.4f')}, "
            f"quantized {f(s['arcface_quantized'], '.4f')}, drop {f(s['arcface_drop'], '+.4f')}",
        ]
        if self.stream_ranges:
            lines += ["", "  mixed attention K/V inputs, largest |x| per stream (one quantizer serves both)"]
            lines += [f"    text {r.text_amax:9.4f}  id {r.id_amax:9.4f}  ratio {r.ratio:5.2f}  {r.layer}"
                      for r in sorted(self.stream_ranges, key=lambda r: -r.ratio)[:5]]
        if self.worst_layers:
            lines += ["", "  worst quantizers (local rel L2 of dequantized vs original tensor)"]
            lines += [f"    {w.rel_l2:8.4f}  {w.kind:6s}  {w.layer}" for w in self.worst_layers]
        return "\n".join(lines)


def _json_number(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).astype(np.float64)) / (np.linalg.norm(ref.astype(np.float64)) + 1e-30))


class _StreamRanges:
    """Forward pre-hooks on every ``attn1.to_k``/``to_v``: the largest input magnitude of the
    text rows (first half of the batch) and of the ID rows (second half)."""

    def __init__(self, unet: Any):
        self.amax: Dict[str, List[float]] = {}
        self.active = False  # on for the reference trajectories only
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in unet.named_modules()
                        if name.endswith(("attn1.to_k", "attn1.to_v"))]

    def _hook(self, name: str):
        def hook(module, args):
            if not self.active:
                return
            x = args[0].detach().abs().float()
            half = x.shape[0] // 2
            text, ident = float(x[:half].max()), float(x[half:].max())
            old = self.amax.get(name, [0.0, 0.0])
            self.amax[name] = [max(old[0], text), max(old[1], ident)]
        return hook

    def remove(self) -> List[StreamRange]:
        for h in self.handles:
            h.remove()
        return [StreamRange(n, t, i) for n, (t, i) in self.amax.items()]


class _UNetTap:
    """Forward hook on the reference U-Net: runs ``other`` (contract feeds -> noise_pred) on the
    same inputs; records per-call statistics, or replaces the output by ``other``'s."""

    def __init__(self, other, replace: bool):
        self.other = other
        self.replace = replace
        self.stats: List[Dict[str, float]] = []
        self.first_call: Optional[Dict[str, np.ndarray]] = None

    def __call__(self, module, args, kwargs, output):
        feeds = unet_call_inputs(args, kwargs)
        if self.first_call is None:
            self.first_call = feeds
        theirs = self.other(feeds)
        if self.replace:
            sample = torch.from_numpy(theirs).to(output.sample.device, output.sample.dtype)
            return type(output)(sample=sample)
        ours = output.sample.detach().float().cpu().numpy()
        self.stats.append({"timestep": float(feeds["timestep"][0]), "cosine": _cosine(theirs, ours),
                           "rel_l2": _rel_l2(theirs, ours)})
        return None


def _image_scores(a: np.ndarray, ref: np.ndarray):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = float(peak_signal_noise_ratio(ref, a, data_range=255))
    ssim = float(structural_similarity(ref, a, channel_axis=2, data_range=255))
    return (psnr if math.isfinite(psnr) else 99.0), ssim  # identical images: capped at 99 dB


def _face_cosine(face: Any, reference_embedding: np.ndarray, image: np.ndarray) -> Optional[float]:
    """ArcFace cosine between the reference face and the face in ``image`` (None: no face found)."""
    from ..face.errors import FaceError

    try:
        emb = face.embed(image).embedding
    except FaceError:
        return None
    return _cosine(emb, reference_embedding)


def accuracy_report(
    pipeline: Any,
    bundle: Union[str, Path],
    prompts: Sequence[str],
    faces: Sequence[Union[str, Path]],
    *,
    samples: int = 4,
    steps: int = 20,
    seed: int = 1000,
    guidance: float = 5.0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    scheduler: str = "ddim",
    worst: int = 10,
    progress: bool = True,
    unet: Any = None,
) -> AccuracyReport:
    """Measure the bundle's U-Net against ``pipeline``'s on ``samples`` generations of
    ``prompts`` x ``faces`` (held out from calibration). ``unet``: a callable (contract feeds
    -> noise_pred) to use instead of the bundle's U-Net on onnxruntime."""
    from ..runtime.loader import Bundle
    from ..runtime.ort_backend import OrtBackend

    manifest = read_manifest(bundle)
    if unet is None:
        backend = OrtBackend(Bundle.load(bundle))
        unet = lambda feeds: backend.run("unet", feeds)["noise_pred"]  # noqa: E731
    native = int(pipeline.c.unet.config.sample_size) * gen.VAE_SCALE_FACTOR
    settings = gen.BatchSettings(height=height or native, width=width or native, steps=steps, scheduler=scheduler)
    report = AccuracyReport(
        precision=manifest.components["unet"].precision,
        bundle=str(bundle),
        settings={**settings.to_dict(), "samples": samples, "seed": seed, "guidance": guidance},
    )
    face_inputs = [pipeline.face_input(str(f)) for f in faces]
    ranges = _StreamRanges(pipeline.c.unet)
    per_step: List[List[Dict[str, float]]] = []
    first_call = None
    for i in tqdm(range(samples), desc="accuracy report", unit="sample", disable=not progress):
        prompt, k = prompts[spread(i, samples, len(prompts))], i % len(faces)
        request = gen.GenerationRequest(prompt=prompt, faces=[face_inputs[k]], seed=seed + i, guidance=guidance)
        images = {}
        for replace in (False, True):
            tap = _UNetTap(unet, replace)
            handle = pipeline.c.unet.register_forward_hook(tap, with_kwargs=True)
            ranges.active = not replace
            try:
                images[replace] = pipeline.generate([request], settings, progress=False).arrays[0]
            finally:
                handle.remove()
                ranges.active = False
            if not replace:
                per_step.append(tap.stats)
                first_call = first_call or tap.first_call
        psnr, ssim = _image_scores(images[True], images[False])
        ref_emb = face_inputs[k].embedding
        face = pipeline.c.face
        report.samples.append(SampleStats(
            prompt=prompt, face=Path(str(faces[k])).name, seed=seed + i, psnr=psnr, ssim=ssim,
            arcface_reference=_face_cosine(face, ref_emb, images[False]) if face is not None else None,
            arcface_quantized=_face_cosine(face, ref_emb, images[True]) if face is not None else None,
        ))
    report.stream_ranges = ranges.remove()
    for s in range(len(per_step[0])):
        col = [run[s] for run in per_step]
        report.steps.append(StepStats(
            step=s, timestep=col[0]["timestep"],
            cosine=float(np.mean([c["cosine"] for c in col])),
            rel_l2=float(np.mean([c["rel_l2"] for c in col])),
            worst_cosine=float(min(c["cosine"] for c in col)),
        ))
    if worst and first_call is not None and manifest.components["unet"].precision in ("int8", "fp8"):
        report.worst_layers = layer_errors(Path(bundle) / manifest.components["unet"].file, first_call)[:worst]
    return report


def layer_errors(onnx_path: Union[str, Path], feeds: Dict[str, np.ndarray]) -> List[LayerStats]:
    """Every quantizer of a QDQ graph, worst first: relative L2 between the tensor it quantizes
    and its dequantized value, on ``feeds`` (the graph runs unoptimised on the CPU, with each
    quantizer's input and output exposed as extra outputs)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    g = model.graph
    consumers: Dict[str, List[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    probes = []
    for n in list(g.node):
        if n.op_type != "QuantizeLinear":
            continue
        dq = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        m = _QUANTIZER.match(n.name)
        if not dq or m is None:
            continue
        pair = []
        for src in (n.input[0], dq[0].output[0]):
            name = f"{src}__probe{len(probes)}"
            g.node.append(onnx.helper.make_node("Identity", [src], [name]))
            g.output.append(onnx.helper.make_empty_tensor_value_info(name))
            pair.append(name)
        probes.append((m["layer"].replace("/", "."), m["kind"], pair))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="layer-errors-") as tmp:  # a file with external data: any size
        path = str(Path(tmp) / "probed.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="probed.onnx.data", size_threshold=1024)
        del model
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in sess.get_inputs()}
    values = dict(zip(names, sess.run(None, {k: np.asarray(v, types[k]) for k, v in feeds.items()})))
    f32 = lambda name: values[name].astype(np.float32)  # noqa: E731
    out = [LayerStats(layer, kind, _rel_l2(f32(b), f32(a))) for layer, kind, (a, b) in probes]
    return sorted(out, key=lambda s: -s.rel_l2)
