"""Training data: one folder per identity, run through the face front end once, cached.

``prepare_data`` scans ``root/<identity>/<photo>``, runs every photo through the
face front end (detect, align, ArcFace embedding, CLIP crop) and the frozen VAE
(the denoising target's latents at the training resolution), and caches the
results in one ``.npz`` keyed by a fingerprint of the photos (path, size, mtime),
the face models, the model and the settings, so later epochs and runs never
re-run detection. Photos that cannot be used (unreadable, too small, no face)
are skipped and *reported* (:attr:`PreparedData.skipped`), never silently;
an identity left without photos is reported too. Nothing usable at all is a
:class:`DataError`.

Pairs follow the paper: a photo of the person is the reference (its face
embedding and CLIP crop make ``c_id``), another photo of the same person the
denoising target; a person with a single photo uses it as both.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from .config import DataConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1


class DataError(ValueError):
    """Training data that cannot be used at all (the message says why and what was skipped)."""


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class PreparedData:
    """Everything the objective needs per photo, as arrays (row ``i`` = photo ``i``)."""

    identities: List[str]  # identity folder names
    identity: np.ndarray  # (N,) int64 index into identities
    paths: List[str]
    captions: List[str]  # "" when a photo has no caption file
    embeddings: np.ndarray  # (N, 512) float32 ArcFace, L2-normalised
    clip_crops: np.ndarray  # (N, S, S, 3) uint8 aligned crops for CLIP
    latents: np.ndarray  # (N, 4, R/8, R/8) float32 VAE latents (scaled) of the target photo
    skipped: List[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def same_identity(self) -> List[np.ndarray]:
        """Per photo, the indices of the *other* photos of its identity (itself if none)."""
        groups = {k: np.flatnonzero(self.identity == k) for k in range(len(self.identities))}
        out = []
        for i, k in enumerate(self.identity):
            others = groups[int(k)][groups[int(k)] != i]
            out.append(others if len(others) else np.array([i]))
        return out

    def report(self) -> str:
        """One line per skipped photo or identity, for the console and the log."""
        return "\n".join(f"skipped {s.path}: {s.reason}" for s in self.skipped)


def scan(root: Path) -> Tuple[List[Tuple[str, Path, str]], List[Skipped]]:
    """``[(identity, photo, caption)]`` under ``root`` in sorted order, and what was skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (expected one sub-folder of photos per identity)")
    items, skipped = [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no identity folders; put each person's photos in a sub-folder "
                        f"({root}/<person>/<photo>.png)")
    for folder in folders:
        photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not photos:
            skipped.append(Skipped(str(folder), f"identity folder has no photos ({', '.join(IMAGE_EXTS)})"))
            continue
        for p in photos:
            cap = p.with_suffix(".txt")
            items.append((folder.name, p, cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""))
    return items, skipped


def _fingerprint(items, face_models: Path, settings: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    stat = lambda p: [str(p), p.stat().st_size, p.stat().st_mtime_ns]  # noqa: E731
    h.update(json.dumps({
        "version": CACHE_VERSION,
        "settings": settings,
        "photos": [[ident, *stat(p), cap] for ident, p, cap in items],
        "face_models": [stat(p) for p in sorted(Path(face_models).glob("*.onnx"))],
    }, sort_keys=True).encode())
    return h.hexdigest()[:20]


def target_pixels(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Centre square crop, resized to ``resolution``, as float32 ``(3, R, R)`` in [-1, 1]."""
    from PIL import Image

    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(rgb[top:top + s, left:left + s]).resize((resolution, resolution), Image.BICUBIC)
    return (np.asarray(im, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def prepare_data(
    cfg: DataConfig,
    cache_dir: Path,
    encode_latents: Callable[[np.ndarray], np.ndarray],
    clip_size: int,
    model_tag: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Scan, run the face front end and the VAE once, and cache (see the module docstring).

    ``encode_latents``: float32 ``(B, 3, R, R)`` pixels in [-1, 1] -> ``(B, 4, R/8, R/8)``
    scaled latents (the frozen VAE). ``model_tag`` names the VAE in the fingerprint.
    """
    from tqdm.auto import tqdm

    from ..face import FaceEmbedder
    from ..face.errors import FaceImageError, NoFaceError
    from ..face.images import MIN_DETECT_SIDE, load_image

    items, skipped = scan(Path(cfg.root))
    settings = {"resolution": cfg.resolution, "clip_size": clip_size, "det_thresh": cfg.det_thresh, "model": model_tag}
    key = _fingerprint(items, Path(cfg.face_models), settings)
    cache = Path(cache_dir) / f"data-{key}.npz"
    if cache.is_file():
        data = _load_cache(cache)
        log(f"training data: {len(data)} photos of {len(data.identities)} identities from the cache {cache}")
        return data

    face = FaceEmbedder.from_folder(cfg.face_models, det_thresh=cfg.det_thresh, clip_crop_size=clip_size)
    rows: List[Tuple[str, str, str, np.ndarray, np.ndarray]] = []
    latents: List[np.ndarray] = []
    batch: List[np.ndarray] = []

    def flush():
        if batch:
            latents.append(np.asarray(encode_latents(np.stack(batch)), dtype=np.float32))
            batch.clear()

    for ident, path, caption in tqdm(items, desc="face front end + VAE (cached once)", disable=not progress):
        try:
            rgb = load_image(path, min_side=MIN_DETECT_SIDE)
            r = face.embed(rgb)
        except (FaceImageError, NoFaceError) as e:
            skipped.append(Skipped(str(path), str(e)))
            continue
        rows.append((ident, str(path), caption, r.embedding, r.clip_crop))
        batch.append(target_pixels(rgb, cfg.resolution))
        if len(batch) == 16:
            flush()
    flush()
    kept = {ident for ident, *_ in rows}
    for ident in sorted({ident for ident, *_ in items} - kept):
        skipped.append(Skipped(str(Path(cfg.root) / ident), "no usable photo of this identity"))
    if not rows:
        lines = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:10])
        raise DataError(f"no usable training photos in {cfg.root} ({len(skipped)} skipped):\n{lines}")

    names = sorted(kept)
    data = PreparedData(
        identities=names,
        identity=np.array([names.index(r[0]) for r in rows], dtype=np.int64),
        paths=[r[1] for r in rows],
        captions=[r[2] for r in rows],
        embeddings=np.stack([r[3] for r in rows]).astype(np.float32),
        clip_crops=np.stack([r[4] for r in rows]).astype(np.uint8),
        latents=np.concatenate(latents).astype(np.float32),
        skipped=skipped,
    )
    _save_cache(cache, data)
    log(f"training data: {len(data)} photos of {len(names)} identities; {len(skipped)} skipped; cached in {cache}")
    return data


def _save_cache(path: Path, d: PreparedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    meta = {"identities": d.identities, "paths": d.paths, "captions": d.captions,
            "skipped": [[s.path, s.reason] for s in d.skipped]}
    np.savez(tmp, identity=d.identity, embeddings=d.embeddings, clip_crops=d.clip_crops, latents=d.latents,
             meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def _load_cache(path: Path) -> PreparedData:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return PreparedData(
            identities=meta["identities"], identity=z["identity"], paths=meta["paths"], captions=meta["captions"],
            embeddings=z["embeddings"], clip_crops=z["clip_crops"], latents=z["latents"],
            skipped=[Skipped(p, r) for p, r in meta["skipped"]],
        )


def sample_indices(rng: np.random.Generator, partners: Sequence[np.ndarray]) -> Tuple[int, int]:
    """One (target, reference) pair: a uniform photo, then a uniform other photo of the same person."""
    target = int(rng.integers(len(partners)))
    ref = int(partners[target][rng.integers(len(partners[target]))])
    return target, ref
