"""``infiniteid train CONFIG``: identity-enhanced training of the ID module.

SDXL stays frozen; the ID mappers and every ``attn2``'s ``to_k_ip``/``to_v_ip``
learn to denoise one photo of a person from another photo of the same person,
with text cross-attention off (the paper's objective). CONFIG is a JSON file
(``--example-config`` prints one with every field; the fields are documented in
``infiniteid.training.config`` and the README). The data is one folder per
identity; the face front end runs once and its results are cached.

One process by default; more through Hugging Face Accelerate (DDP on GPUs, or
CPU processes over gloo; multi-node with ``--num_machines``/``--machine_rank``):
``accelerate launch [--num_processes N] -m infiniteid.cli train CONFIG``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  infiniteid train --example-config > train.json      # then edit paths and steps
  infiniteid train train.json
  infiniteid train train.json --resume latest         # continue from the newest checkpoint
  accelerate launch --num_processes 8 -m infiniteid.cli train train.json
  accelerate launch --cpu --num_processes 2 -m infiniteid.cli train train.json

Outputs in output_dir: adapter.safetensors (load it with --adapter in export and
generate), checkpoints/step-NNNNNN/, logs/run-*.jsonl and the data cache.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the ID module (mappers + attn2 identity projections) on photos of people",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", type=Path, help="training config (JSON)")
    p.add_argument("--resume", metavar="latest|DIR", help="resume from the newest checkpoint in output_dir, or from DIR")
    p.add_argument("--max-steps", type=int, help="override max_steps of the config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--example-config", action="store_true", help="print a complete example config and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..model.adapter import AdapterError
    from ..model.loading import WeightsError
    from ..training.config import ConfigError, TrainConfig, example_config
    from ..training.data import DataError

    if args.example_config:
        print(json.dumps(example_config(), indent=2))
        return 0
    if args.config is None:
        raise UserError("give a training config file (infiniteid train --example-config prints one)")
    try:
        cfg = TrainConfig.from_file(args.config)
        if args.max_steps is not None:
            cfg.max_steps = args.max_steps
            cfg.validate()
        from ..training.trainer import train

        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataError, AdapterError, WeightsError) as e:
        raise UserError(str(e)) from None
    if result.adapter is not None:
        last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"trained to step {result.step}{last}; adapter: {result.adapter}; log: {result.log}")
    return 0
