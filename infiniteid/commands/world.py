"""``infiniteid world --out DIR``: write the generated test world (drawn people in captioned scenes).

``DIR/people/<person-NN>/<k>.png`` + ``<k>.txt`` (captions) and ``DIR/people/world.json``
(every photo's attributes): the training layout of ``infiniteid train``; and
``DIR/face-models/``, the synthetic insightface folder whose scripted detector
finds these faces (they fill the middle half of every picture). See
``infiniteid.evaluation.world``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  infiniteid world --out world                       # 16 people x 6 photos, 128x128
  infiniteid world --out world --identities 4 --photos 3 --size 64 --seed 1
  infiniteid world --out heldout --identities 12 --photos 1 --seed 99 --exclude world   # new people only
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("world", help="write the generated test world (people, scenes, captions, face models)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--identities", type=int, default=16, help="people (default 16)")
    p.add_argument("--photos", type=int, default=6, help="photos per person (default 6)")
    p.add_argument("--size", type=int, default=128, help="square picture side in pixels (default 128, at least 64)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--exclude", type=Path, default=None, metavar="WORLD",
                   help="another world's folder: none of its people are drawn (a held-out set of new people)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..evaluation import world as W
    from ..face import write_synthetic_face_models

    distinct = W.distinct_identities()
    if not 1 <= args.identities <= distinct:
        raise UserError(f"--identities must be between 1 and {distinct} (the distinct people the world can draw)")
    if args.photos < 1:
        raise UserError(f"--photos must be at least 1, got {args.photos}")
    if args.size < 64:
        raise UserError(f"--size must be at least 64 pixels (the face detector's minimum), got {args.size}")
    if (args.out / "people").exists():
        raise UserError(f"{args.out / 'people'} exists; choose another --out")
    exclude = _excluded(args.exclude, UserError)
    if args.identities > distinct - len(exclude):
        raise UserError(f"--identities must be at most {distinct - len(exclude)}: the world draws {distinct} people "
                        f"and --exclude takes {len(exclude)} of them")
    people = W.write_world(args.out / "people", args.identities, args.photos, args.size, args.seed, exclude=exclude)
    faces = write_synthetic_face_models(args.out / "face-models")
    print(f"wrote {args.identities * args.photos} photos of {args.identities} people to {people} "
          f"and the synthetic face models to {faces}")
    return 0


def _excluded(folder, error) -> list:
    """The people of the world at ``folder`` (``folder`` or ``folder/people`` holds ``world.json``)."""
    from ..evaluation import world as W

    if folder is None:
        return []
    for f in (folder, folder / "people"):
        if (f / "world.json").is_file():
            try:
                return W.world_identities(f)
            except (ValueError, KeyError, TypeError) as e:
                raise error(f"--exclude: {f / 'world.json'} is not a world description: {e}") from None
    raise error(f"--exclude: no world.json in {folder} or {folder / 'people'} (a folder written by infiniteid world)")
