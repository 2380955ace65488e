"""Identities x prompts on any backend, scored, and written as JSON, Markdown and a contact sheet.

A backend is anything with ``generate(requests, settings, progress=...)`` returning
an object with the images (``arrays`` or ``images``, and the text stream's when
``settings.return_text_stream``): the
PyTorch reference pipeline and the torch-free :class:`~infiniteid.runtime.Runtime`
(onnxruntime or TensorRT) both are. :func:`evaluate` generates every
(identity, prompt, seed), scores it with the metrics that were given (CLIP-T and
CLIP-I with a CLIP folder, face similarity with face models, and on the generated
world the attribute metric), and :func:`write_report` writes

* ``results.json``: settings, every row and the means;
* ``report.md``: our means beside the paper's table;
* ``contact_sheet.png``: references down, prompts across;
* ``images/``: every generated image.

**Attribute metric** (generated world only, :mod:`.world`): *identity accuracy* is
the fraction of identity attributes read from the generated image that equal
those read from the reference photo; *prompt accuracy* the fraction of scene
attributes equal to the prompt's; the same prompt accuracy of the text stream
(plain SDXL on the prompt) is the baseline the ID stream must not fall below.
The report adds each identity attribute's accuracy beside its chance level
(:func:`~.world.identity_chance`, about 1/3 on average).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import generation as gen
from . import world as W
from .metrics import PAPER_TABLE

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # as training's data folders
METRICS = ("clip_t", "clip_i", "face_sim", "identity_acc", "prompt_acc", "text_prompt_acc")


@dataclass
class EvalRow:
    identity: str
    reference: str
    prompt: str
    seed: int
    image: str = ""
    clip_t: Optional[float] = None
    clip_i: Optional[float] = None
    face_sim: Optional[float] = None
    face_sim_2: Optional[float] = None
    identity_acc: Optional[float] = None
    prompt_acc: Optional[float] = None
    text_prompt_acc: Optional[float] = None
    attributes: Optional[Dict[str, Any]] = None
    identity_hits: Optional[Dict[str, bool]] = None


@dataclass
class EvalReport:
    rows: List[EvalRow]
    settings: Dict[str, Any]
    source: Dict[str, Any]
    images: List[np.ndarray] = field(default_factory=list, repr=False)
    references: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def means(self) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {}
        for k in (*METRICS, "face_sim_2"):
            vals = [getattr(r, k) for r in self.rows if getattr(r, k) is not None]
            out[k] = float(np.mean(vals)) if vals else None
        has_face = bool(self.settings.get("face_models"))
        out["no_face"] = sum(1 for r in self.rows if r.face_sim is None) if has_face else None
        return out

    def identity_by_attribute(self) -> Dict[str, float]:
        """Generated world: each identity attribute's accuracy over the rows ({} otherwise)."""
        hits = [r.identity_hits for r in self.rows if r.identity_hits]
        return {k: float(np.mean([h[k] for h in hits])) for k in W.IDENTITY_ATTRIBUTES} if hits else {}


def identity_references(folder: Path) -> List[Tuple[str, Path]]:
    """One reference per identity: the first photo (sorted) of each sub-folder, or each image of a flat folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder not found: {folder}")
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    refs: List[Tuple[str, Path]] = []
    for d in subs:
        photos = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if photos:
            refs.append((d.name, photos[0]))
    if not subs:
        refs = [(p.stem, p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if not refs:
        raise FileNotFoundError(f"no reference photos in {folder} (one sub-folder per identity, or images)")
    return refs


def world_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct prompts of the generated world's scenes."""
    rng = np.random.default_rng(seed)
    out: List[str] = []
    while len(out) < n:
        p = W.caption(W.Scene.random(rng))
        if p not in out:
            out.append(p)
    return out


def evaluate(
    backend: Any,
    references: Sequence[Tuple[str, Path]],
    prompts: Sequence[str],
    settings: gen.BatchSettings,
    seeds: Sequence[int] = (0,),
    clip: Any = None,
    face: Any = None,
    face_2: Any = None,
    world: bool = False,
    guidance: float = gen.DEFAULT_GUIDANCE,
    source: Optional[Dict[str, Any]] = None,
    progress: bool = True,
) -> EvalReport:
    """Generate and score every (reference, prompt, seed); see the module docstring."""
    from tqdm.auto import tqdm

    from ..face.images import load_image

    if not prompts:
        raise gen.InvalidRequest("no prompts to evaluate")
    settings.return_text_stream = world
    refs = {name: load_image(path) for name, path in references}
    rows: List[EvalRow] = []
    images: List[np.ndarray] = []
    text_images: List[Optional[np.ndarray]] = []
    jobs = [(n, p, prompt, s) for n, p in references for prompt in prompts for s in seeds]
    for name, path, prompt, seed in tqdm(jobs, desc="evaluating", disable=not progress):
        req = gen.GenerationRequest(prompt=prompt, faces=[str(path)], seed=seed, guidance=guidance)
        out = backend.generate([req], settings, progress=False)
        # The runtime and the reference both give PIL ``images`` and uint8 ``arrays``.
        images.append(np.asarray(out.arrays[0]))
        text_images.append(np.asarray(out.text_arrays[0]) if out.text_arrays else None)
        rows.append(EvalRow(identity=name, reference=str(path), prompt=prompt, seed=seed))

    ref_list = [refs[r.identity] for r in rows]
    if clip is not None:
        for r, t, i in zip(rows, clip.clip_t(images, [r.prompt for r in rows]), clip.clip_i(images, ref_list)):
            r.clip_t, r.clip_i = float(t), float(i)
    if face is not None:
        for r, s in zip(rows, face.similarity(images, ref_list)):
            r.face_sim = s
    if face_2 is not None:
        for r, s in zip(rows, face_2.similarity(images, ref_list)):
            r.face_sim_2 = s
    if world:
        ref_attrs = {n: W.measure(img) for n, img in refs.items()}
        for r, img, timg in zip(rows, images, text_images):
            got, want_id = W.measure(img), ref_attrs[r.identity]
            r.attributes = got
            r.identity_hits = {k: bool(got[k] == want_id[k]) for k in W.IDENTITY_ATTRIBUTES}
            r.identity_acc = float(np.mean(list(r.identity_hits.values())))
            scene = W.parse_caption(r.prompt)
            if scene is not None:
                want = asdict(scene)
                r.prompt_acc = W.attribute_accuracy([got], [want], W.SCENE_ATTRIBUTES)
                if timg is not None:
                    r.text_prompt_acc = W.attribute_accuracy([W.measure(timg)], [want], W.SCENE_ATTRIBUTES)
    run_settings = {**settings.to_dict(), "seeds": list(seeds), "guidance": guidance,
                    "clip": str(getattr(clip, "folder", "")) or None,
                    "face_models": str(getattr(face, "folder", "")) or None, "world": world}
    return EvalReport(rows=rows, settings=run_settings, source=dict(source or {}), images=images, references=refs)


def write_report(report: EvalReport, out: Path) -> Dict[str, Path]:
    """``results.json``, ``report.md``, ``contact_sheet.png`` and ``images/`` under ``out``."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, (row, img) in enumerate(zip(report.rows, report.images)):
        row.image = f"images/{k:04d}-{row.identity}-s{row.seed}.png"
        Image.fromarray(img).save(out / row.image)
    means = report.means()
    (out / "results.json").write_text(json.dumps({
        "source": report.source, "settings": report.settings, "means": means,
        "identity_by_attribute": report.identity_by_attribute(),
        "identity_chance": W.identity_chance() if report.settings.get("world") else None,
        "paper": PAPER_TABLE, "rows": [asdict(r) for r in report.rows]}, indent=1, default=str))
    (out / "report.md").write_text(markdown(report, means))
    contact_sheet(report).save(out / "contact_sheet.png")
    return {"json": out / "results.json", "markdown": out / "report.md", "sheet": out / "contact_sheet.png"}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(report: EvalReport, means: Dict[str, Optional[float]]) -> str:
    name = report.source.get("model", "this model")
    lines = [f"# Evaluation: {name}", "",
             f"{len(report.rows)} images: {len({r.identity for r in report.rows})} identities x "
             f"{len({r.prompt for r in report.rows})} prompts x {len(report.settings['seeds'])} seeds; "
             f"{report.settings['width']}x{report.settings['height']}, {report.settings['steps']} steps "
             f"{report.settings['scheduler']}, guidance {report.settings['guidance']}.", "",
             "| model | CLIP-T | CLIP-I | face sim |", "|---|---|---|---|",
             f"| **{name} (ours)** | {_fmt(means['clip_t'])} | {_fmt(means['clip_i'])} | {_fmt(means['face_sim'])} |"]
    for k, v in PAPER_TABLE.items():
        lines.append(f"| {k} | {v['clip_t']:.3f} | {v['clip_i']:.3f} | {v['face_sim']:.3f} |")
    lines += ["", "Paper numbers use SDXL, OpenAI CLIP and FaceNet on real photos; ours use the CLIP folder "
              f"{report.settings.get('clip') or '(none given)'} and the face models "
              f"{report.settings.get('face_models') or '(none given)'}: compare like with like."]
    if means.get("no_face"):
        lines.append(f"\n{means['no_face']} generated images had no detectable face (excluded from face sim).")
    if report.settings.get("world"):
        lines += ["", "## Generated-world attributes", "",
                  "| identity accuracy | prompt accuracy (ID stream) | prompt accuracy (text stream) |",
                  "|---|---|---|",
                  f"| {_fmt(means['identity_acc'])} | {_fmt(means['prompt_acc'])} | {_fmt(means['text_prompt_acc'])} |"]
        by_attr, chance = report.identity_by_attribute(), W.identity_chance()
        if by_attr:
            lines += ["", "| identity attribute | accuracy | chance |", "|---|---|---|"]
            lines += [f"| {k} | {by_attr[k]:.3f} | {chance[k]:.3f} |" for k in W.IDENTITY_ATTRIBUTES]
            lines += [f"| **mean** | {_fmt(means['identity_acc'])} | {chance['mean']:.3f} |", "",
                      "Chance: the accuracy of images that ignore the reference (two independent world "
                      "people agreeing); an untrained ID module scores about this."]
    return "\n".join(lines) + "\n"


def contact_sheet(report: EvalReport, cell: int = 128) -> Any:
    """References down the first column, one column per prompt (first seed)."""
    from PIL import Image, ImageDraw

    names = list(dict.fromkeys(r.identity for r in report.rows))
    prompts = list(dict.fromkeys(r.prompt for r in report.rows))
    first_seed = report.rows[0].seed
    sheet = Image.new("RGB", ((len(prompts) + 1) * cell, len(names) * cell + 24), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "reference", fill=(0, 0, 0))
    for j, p in enumerate(prompts):
        draw.text(((j + 1) * cell + 4, 4), p[-20:], fill=(0, 0, 0))
    for i, n in enumerate(names):
        sheet.paste(Image.fromarray(report.references[n]).resize((cell, cell)), (0, 24 + i * cell))
    for r, img in zip(report.rows, report.images):
        if r.seed == first_seed:
            i, j = names.index(r.identity), prompts.index(r.prompt)
            sheet.paste(Image.fromarray(img).resize((cell, cell)), ((j + 1) * cell, 24 + i * cell))
    return sheet
