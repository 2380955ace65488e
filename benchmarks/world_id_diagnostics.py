"""Where identity is lost on the world model: two diagnostics for an ID module trained on the generated world.

``probe``: do the frozen encoders carry the identity? A small classifier (one hidden layer)
learns every identity attribute from the ID module's inputs (face embedding, CLIP states) of
the first three quarters of a training cache's people and is scored on the last quarter.

``id-only``: has the ID module learned it? Samples in the training condition (every ``attn2``
sees only the identity tokens, guidance against the unconditional tokens, no text) for each
reference and reads the attributes back: identity accuracy without the text term.

Run as it was run (``benchmarks/results/world_model-2026-11-30.md``)::

    python benchmarks/world_id_diagnostics.py probe --model world-run/model --cache world-run/cache --world world-run/world
    python benchmarks/world_id_diagnostics.py id-only --model world-run/model --adapter ADAPTER --references heldout
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=parts[0], epilog="\n\n".join(parts[1:3]) + "\n\nExamples: see the help of each "
                                "subcommand.", formatter_class=raw)
    sub = p.add_subparsers(dest="what", required=True)
    examples = parts[-1].strip().splitlines()
    a = sub.add_parser("probe", help="classifiers on the ID module's inputs", epilog=examples[0], formatter_class=raw)
    a.add_argument("--model", type=Path, required=True, help="folder with base/ and image_encoder/")
    a.add_argument("--cache", type=Path, required=True, help="an infiniteid train cache folder (data-*.npz)")
    a.add_argument("--world", type=Path, required=True, help="the training world (people/world.json)")
    b = sub.add_parser("id-only", help="sample with the identity tokens alone", epilog=examples[1], formatter_class=raw)
    b.add_argument("--model", type=Path, required=True, help="folder with base/ and image_encoder/")
    b.add_argument("--adapter", type=Path, required=True)
    b.add_argument("--references", type=Path, required=True, help="a world folder (people/, face-models/)")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--guidance", type=float, default=5.0)
    b.add_argument("--size", type=int, default=128)
    b.add_argument("--sheet", type=Path, default=None, help="write reference | sample pairs to this PNG")
    return p.parse_args(argv)


def probe(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from infiniteid.evaluation import world as W
    from infiniteid.imageproc import clip_pixels
    from infiniteid.model.pipeline import InfiniteIDPipeline

    d = np.load(sorted(args.cache.glob("data-*.npz"))[-1])
    meta = json.loads(str(d["meta"]))
    by_path = {p["path"]: p for p in json.loads((args.world / "people" / "world.json").read_text())["photos"]}
    photos = [by_path["/".join(Path(p).parts[-2:])] for p in meta["paths"]]
    pipe = InfiniteIDPipeline.from_pretrained(args.model / "base", args.model / "image_encoder",
                                              args.model / "adapter.safetensors")
    with torch.no_grad():
        px = torch.from_numpy(np.stack([clip_pixels(c, pipe.c.clip_image) for c in d["clip_crops"]]))
        clip = pipe.c.id_encoder.clip_states(px).reshape(len(px), -1).numpy()
    people = np.asarray(d["identity"])
    train = people < np.quantile(people, 0.75)
    torch.manual_seed(0)
    print("| attribute | face embedding | CLIP states |\n|---|---|---|")
    for attr in W.IDENTITY_ATTRIBUTES:
        labels = [str(W.expected(W.identity_from_dict(p["identity"]), W.Scene(**p["scene"]))[attr]) for p in photos]
        classes = sorted(set(labels))
        y = torch.tensor([classes.index(v) for v in labels])
        scores = []
        for x in (d["embeddings"], clip):
            x = torch.from_numpy((x - x[train].mean(0)) / (x[train].std(0) + 1e-6)).float()
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, len(classes)))
            opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
            for _ in range(300):
                loss = torch.nn.functional.cross_entropy(net(x[train]), y[train])
                opt.zero_grad()
                loss.backward()
                opt.step()
            scores.append(float((net(x[~train]).argmax(1) == y[~train]).float().mean()))
        print(f"| {attr} | {scores[0]:.2f} | {scores[1]:.2f} |")
    return 0


def id_only(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    from infiniteid import generation as gen
    from infiniteid.evaluation import world as W
    from infiniteid.evaluation.harness import identity_references
    from infiniteid.face.images import load_image
    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.model.processors import KWARG, TRAINING, IDConditioning

    pipe = InfiniteIDPipeline.from_pretrained(args.model / "base", args.model / "image_encoder", args.adapter,
                                              args.references / "face-models")
    c = pipe.c
    sched = DDIMScheduler.from_config(c.scheduler_config)
    sched.set_timesteps(args.steps)
    embeds, pooled = pipe.encode_prompts([""])
    time_ids = torch.from_numpy(gen.sdxl_time_ids(args.size, args.size)).expand(2, -1)
    accs, rows = [], []
    for name, path in identity_references(args.references / "people"):
        cond, uncond = pipe.identity_tokens(gen.GenerationRequest(prompt="", faces=[str(path)]))
        ids = IDConditioning(id_embeds=torch.stack([uncond, cond]), mode=TRAINING)
        lat = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sched.timesteps:
                e = c.unet(torch.cat([lat, lat]), t, encoder_hidden_states=embeds.expand(2, -1, -1),
                           added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": time_ids},
                           cross_attention_kwargs={KWARG: ids}).sample
                lat = sched.step(e[:1] + args.guidance * (e[1:] - e[:1]), t, lat).prev_sample
        arr = pipe.decode(lat)[0]
        ref = load_image(path)
        accs.append(W.attribute_accuracy([W.measure(arr)], [W.measure(ref)], W.IDENTITY_ATTRIBUTES))
        rows.append(np.concatenate([np.asarray(Image.fromarray(ref).resize(arr.shape[:2][::-1])), arr], 1))
        print(f"{name}: identity accuracy {accs[-1]:.2f}", flush=True)
    print(f"identity accuracy with the identity tokens alone: {float(np.mean(accs)):.3f} ({len(accs)} references)")
    if args.sheet:
        Image.fromarray(np.concatenate(rows, 0)).save(args.sheet)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return probe(args) if args.what == "probe" else id_only(args)


if __name__ == "__main__":
    sys.exit(main())
