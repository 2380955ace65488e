"""``infiniteid evaluate``: identities x prompts on a backend, scored against the paper's table.

Backends: a bundle on the runtime (``--bundle DIR --backend ort|trt``), the
PyTorch reference with real weights (``--base --image-encoder --adapter``), or
the tiny model (``--tiny [--adapter FILE]``). References: ``--references DIR``
(one sub-folder per identity, its first photo is the reference; or a folder of
images). Metrics: CLIP-T and CLIP-I with ``--clip DIR`` (a local transformers
CLIP folder), face similarity with ``--face-models DIR`` (ArcFace cosine; a
second recogniser with ``--face-models-2``), and ``--world`` for the generated
world's attribute metric. Writes ``results.json``, ``report.md``,
``contact_sheet.png`` and ``images/`` to ``--out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List

EPILOG = """\
examples:
  infiniteid evaluate --bundle out/sdxl-fp16 --backend trt --references faces/ --prompts prompts.txt \\
      --clip ~/models/clip-vit-l-14 --face-models ~/.insightface/models/antelopev2 --out eval/sdxl
  infiniteid evaluate --tiny --adapter runs/tiny/adapter.safetensors --references world/people \\
      --face-models world/face-models --world --out eval/tiny --height 64 --width 64 --steps 20
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="score a model: CLIP-T, CLIP-I, face similarity, world attributes",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--bundle", type=Path, help="a bundle folder (runtime backend)")
    src.add_argument("--backend", default="ort", choices=("ort", "trt"), help="runtime backend (default ort)")
    src.add_argument("--base", type=Path, help="diffusers SDXL folder (PyTorch reference)")
    src.add_argument("--image-encoder", type=Path, help="CLIP image encoder folder (PyTorch reference)")
    src.add_argument("--adapter", type=Path, help="Infinite-ID adapter file (reference, or with --tiny)")
    src.add_argument("--tiny", action="store_true", help="the tiny model (random weights unless --adapter)")
    src.add_argument("--tiny-seed", type=int, default=0, help="seed of the tiny model (default 0)")
    p.add_argument("--references", type=Path, required=True, help="one sub-folder of photos per identity")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--num-prompts", type=int, default=4, help="with --world and no prompts: world prompts (default 4)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per (identity, prompt) (default 1)")
    p.add_argument("--max-identities", type=int, default=0, help="use at most N identities (default all)")
    m = p.add_argument_group("metrics")
    m.add_argument("--clip", type=Path, help="transformers CLIP folder for CLIP-T / CLIP-I")
    m.add_argument("--face-models", type=Path, help="insightface folder: the face front end and face similarity")
    m.add_argument("--face-models-2", type=Path, help="a second, independent recogniser for a second face column")
    m.add_argument("--world", action="store_true", help="the generated world's attribute metric")
    g = p.add_argument_group("generation")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--scheduler", default="ddim")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _prompts(args) -> List[str]:
    from ..cli import UserError
    from ..evaluation.harness import world_prompts

    prompts = list(args.prompt)
    if args.prompts:
        if not args.prompts.is_file():
            raise UserError(f"prompts file not found: {args.prompts}")
        prompts += [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
    if not prompts and args.world:
        prompts = world_prompts(args.num_prompts)
    if not prompts:
        raise UserError("give prompts (--prompt, --prompts FILE), or --world for the generated world's prompts")
    return prompts


def backend(args) -> Any:
    """The generator: runtime bundle, reference with real weights, or the tiny model."""
    from ..cli import UserError

    chosen = [n for n, v in (("--bundle", args.bundle), ("--base", args.base), ("--tiny", args.tiny)) if v]
    if len(chosen) != 1:
        raise UserError("choose one model: --bundle DIR, --base/--image-encoder/--adapter, or --tiny")
    if args.face_models is None:
        raise UserError("--face-models is required: the face front end turns each reference photo into c_id")
    if args.bundle:
        from ..runtime import Runtime

        return Runtime(args.bundle, backend=args.backend, face_models=args.face_models), {"model": str(args.bundle),
                                                                                         "backend": args.backend}
    from ..face import FaceEmbedder
    from ..model.pipeline import InfiniteIDPipeline

    face = FaceEmbedder.from_folder(args.face_models)
    if args.tiny:
        pipe = InfiniteIDPipeline.tiny(args.tiny_seed, face=face)
        if args.adapter:
            from ..model.adapter import load_adapter

            pipe.c.id_encoder.mapper = load_adapter(args.adapter, pipe.c.unet).eval().requires_grad_(False)
        name = f"tiny(seed={args.tiny_seed})" + (f" + {args.adapter.name}" if args.adapter else " untrained")
        return pipe, {"model": name, "backend": "reference", "adapter": str(args.adapter or "")}
    if not (args.image_encoder and args.adapter):
        raise UserError("--base needs --image-encoder and --adapter")
    pipe = InfiniteIDPipeline.from_pretrained(args.base, args.image_encoder, args.adapter, args.face_models)
    return pipe, {"model": f"{args.base.name} + {args.adapter.name}", "backend": "reference"}


def run(args: argparse.Namespace) -> int:
    from .. import generation as gen
    from ..evaluation.harness import evaluate, identity_references, write_report
    from ..evaluation.metrics import ClipScorer, FaceScorer, MetricsError
    from ..cli import UserError

    prompts = _prompts(args)
    refs = identity_references(args.references)
    if args.max_identities:
        refs = refs[: args.max_identities]
    try:
        clip = ClipScorer(args.clip) if args.clip else None
    except MetricsError as e:
        raise UserError(str(e)) from None
    face = FaceScorer(args.face_models)
    face_2 = FaceScorer(args.face_models_2) if args.face_models_2 else None
    gen_backend, source = backend(args)
    settings = gen.BatchSettings(height=args.height, width=args.width, steps=args.steps, scheduler=args.scheduler)
    report = evaluate(gen_backend, refs, prompts, settings, seeds=range(args.seeds), clip=clip, face=face,
                      face_2=face_2, world=args.world, guidance=args.guidance, source=source,
                      progress=not args.no_progress)
    paths = write_report(report, args.out)
    means = report.means()
    shown = ", ".join(f"{k} {v:.3f}" for k, v in means.items() if isinstance(v, float))
    print(f"{len(report.rows)} images scored: {shown}")
    print(f"wrote {paths['markdown']}, {paths['json']} and {paths['sheet']}")
    return 0
