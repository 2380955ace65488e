"""Calibration data from real runs of the PyTorch reference pipeline.

:func:`capture` runs :class:`~infiniteid.model.pipeline.InfiniteIDPipeline` on
prompts x faces and records, through a forward pre-hook on the U-Net, the inputs of
every U-Net call exactly as the pipeline makes them: both streams, both CFG halves,
``c_id`` included, in :mod:`infiniteid.layout`'s batch layout and named as in
:mod:`infiniteid.contract`. One generation is one shard::

    DIR/capture.json          what was captured (config, faces, model, shards)
    DIR/shard-00000.npz       sample (steps, batch, 4, h, w), timestep (steps, 1),
                              and the inputs fixed over the steps, once:
                              encoder_hidden_states, text_embeds, time_ids, id_embeds, id_scale

Seeded (shard ``i`` uses seed ``config.seed + i``), so a capture is reproducible.
Resumable: each shard is written to a temporary name and renamed, then listed in
``capture.json`` (also replaced atomically); a rerun with the same config, faces and
model skips the shards listed, and a rerun with different ones is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import contract as C
from .. import generation as gen
from ..bundle import file_digest
from ..model.processors import KWARG
from .config import CalibrationError, CaptureConfig, spread

FORMAT = "infiniteid-calibration"
FORMAT_VERSION = 1
MANIFEST = "capture.json"
PER_STEP = ("sample", "timestep")
FIXED = ("encoder_hidden_states", "text_embeds", "time_ids", "id_embeds", "id_scale")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def face_files(folder: Union[str, Path]) -> List[Path]:
    """The face images in ``folder`` (sorted); a missing or empty folder is a CalibrationError."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CalibrationError(f"faces folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"{folder}: no face images in it (expected {', '.join(IMAGE_SUFFIXES)} files, one person per image)"
        )
    return files


@dataclass
class Shard:
    """One captured generation."""

    index: int
    file: str
    prompt: str
    face: str
    seed: int
    steps: int
    sha256: str


class CaptureSet:
    """A capture folder read back: its manifest and the U-Net calls in it."""

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise CalibrationError(f"{path}: missing; {self.folder} holds no calibration capture")
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: not a calibration capture this version reads")
        self.manifest = d
        self.shards = [Shard(**s) for s in d["shards"]]

    def __len__(self) -> int:
        return sum(s.steps for s in self.shards)

    def calls(self, limit: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Every captured U-Net call as the contract's named inputs (``limit``: at most that many,
        taken evenly over shards and steps so early and late steps are both represented)."""
        total = len(self)
        keep = None if limit is None or limit >= total else set(np.linspace(0, total - 1, limit).round().astype(int))
        k = 0
        for shard in self.shards:
            with np.load(self.folder / shard.file) as z:
                data = {n: z[n] for n in PER_STEP + FIXED}
            for s in range(shard.steps):
                if keep is None or k in keep:
                    yield {**{n: data[n][s] for n in PER_STEP}, **{n: data[n] for n in FIXED}}
                k += 1


def _model_record(pipeline: Any) -> Dict[str, str]:
    return {str(k): str(v) for k, v in pipeline.c.sources.items()}


def capture(
    pipeline: Any,
    faces: Sequence[Union[str, Path]],
    out: Union[str, Path],
    config: CaptureConfig,
    *,
    progress: bool = True,
    on_shard: Optional[Callable[[int], None]] = None,
) -> CaptureSet:
    """Capture ``config.samples`` generations into ``out`` (created; resumed if it holds the
    same capture). ``faces``: image files run through the pipeline's face front end.
    ``on_shard(i)`` is called after shard ``i`` is committed (a progress hook, and where a
    test interrupts a capture)."""
    config.validate()
    prompts = [p.strip() for p in config.prompts if p.strip()]
    if not faces:
        raise CalibrationError("no faces given; calibration needs at least one face image")
    faces = [Path(f) for f in faces]
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"{out}: exists and is not a folder; the capture needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.key(),
        "faces": [{"file": f.name, "sha256": file_digest(f)} for f in faces],
        "model": _model_record(pipeline),
    }
    done = _resume(out, header)
    face_inputs = [pipeline.face_input(str(f)) for f in faces]  # a face that is not found fails here, before any run
    settings = gen.BatchSettings(
        height=config.height or _native(pipeline),
        width=config.width or _native(pipeline),
        steps=config.steps,
        scheduler=config.scheduler,
    )
    todo = [i for i in range(config.samples) if i not in done]
    bar = tqdm(total=config.samples, initial=config.samples - len(todo), desc="capturing", unit="run", disable=not progress)
    recorder = _Recorder()
    handle = pipeline.c.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        for i in todo:
            prompt, face = prompts[spread(i, config.samples, len(prompts))], i % len(faces)
            request = gen.GenerationRequest(
                prompt=prompt, faces=[face_inputs[face]], seed=config.seed + i, guidance=config.guidance
            )
            recorder.calls.clear()
            pipeline.generate([request], settings, progress=False)
            name = f"shard-{i:05d}.npz"
            _save_atomic(out / name, recorder.stacked())
            done[i] = Shard(i, name, prompt, faces[face].name, config.seed + i, len(recorder.calls), file_digest(out / name))
            _write_manifest(out, header, done)
            bar.update(1)
            if on_shard is not None:
                on_shard(i)
    finally:
        handle.remove()
        bar.close()
    return CaptureSet(out)


def _native(pipeline: Any) -> int:
    return int(pipeline.c.unet.config.sample_size) * gen.VAE_SCALE_FACTOR


class _Recorder:
    """Forward pre-hook: the U-Net's inputs of each call, as numpy arrays named by the contract."""

    def __init__(self):
        self.calls: List[Dict[str, np.ndarray]] = []

    def __call__(self, module, args, kwargs):
        self.calls.append(unet_call_inputs(args, kwargs))
        return None

    def stacked(self) -> Dict[str, np.ndarray]:
        if not self.calls:
            raise CalibrationError("the pipeline made no U-Net call to capture")
        out = {n: np.stack([c[n] for c in self.calls]) for n in PER_STEP}
        first = self.calls[0]
        for n in FIXED:  # fixed over the steps by construction (generation.unet_conditioning)
            out[n] = first[n]
        return out


def unet_call_inputs(args: tuple, kwargs: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One call of the pipeline's U-Net (as a forward hook sees it) as the graph contract's
    named float32 arrays."""
    sample = args[0] if args else kwargs["sample"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    added = kwargs["added_cond_kwargs"]
    cond = kwargs["cross_attention_kwargs"][KWARG]
    f32 = lambda x: x.detach().float().cpu().numpy()  # noqa: E731
    return {
        "sample": f32(sample),
        "timestep": np.asarray(torch.as_tensor(t).float().cpu()).reshape(1),
        "encoder_hidden_states": f32(kwargs["encoder_hidden_states"]),
        "text_embeds": f32(added["text_embeds"]),
        "time_ids": f32(added["time_ids"]),
        "id_embeds": f32(cond.id_embeds),
        "id_scale": f32(cond.id_scale),
    }


def _save_atomic(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_manifest(out: Path, header: Dict[str, Any], done: Dict[int, Shard]) -> None:
    d = {**header, "shards": [vars(done[i]) for i in sorted(done)]}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(d, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def _resume(out: Path, header: Dict[str, Any]) -> Dict[int, Shard]:
    """Shards already captured in ``out`` for the same capture; refuses a different capture."""
    path = out / MANIFEST
    if not path.is_file():
        if any(out.glob("shard-*.npz")):
            raise CalibrationError(f"{out}: holds shards but no {MANIFEST}; choose an empty folder")
        return {}
    old = json.loads(path.read_text())
    for key in ("format", "format_version", "config", "faces", "model"):
        if old.get(key) != header[key]:
            raise CalibrationError(
                f"{out}: holds a different capture ({key} differs); choose another folder or remove it to start over"
            )
    done = {}
    for s in old.get("shards", []):
        shard = Shard(**s)
        p = out / shard.file
        if p.is_file() and p.stat().st_size > 0 and file_digest(p) == shard.sha256:
            done[shard.index] = shard
    return done


def unet_contract_names() -> List[str]:
    """The U-Net's input names in graph order (what each captured call holds)."""
    return [t.name for t in C.contracts(text_hidden=1, text_hidden_2=1, pooled_dim=1, cross_attention_dim=1,
                                        clip_image_size=1)[C.UNET].inputs]
