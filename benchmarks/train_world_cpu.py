"""CPU training benchmark on the generated world: throughput, and whether the ID module learned identity.

Reads a finished ``infiniteid train`` run (its config, JSON log and adapter) and prints:

* throughput: samples/s from the run's log (median over the logged steps), with
  the machine, versions and shapes;
* the *identity signal*: the denoising loss on the training photos with the right
  person's reference, and with another person's reference (same targets, noise and
  timesteps), for the untrained and the trained ID module. A module that learned
  identity lowers the first more than the second.

Run::

    infiniteid world --out world && infiniteid train train.json   # see the README
    python benchmarks/train_world_cpu.py --run run [--samples 256] [--out benchmarks/results/x.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch


def identity_signal(cfg, adapter, samples: int) -> dict:
    from infiniteid.model.adapter import load_adapter
    from infiniteid.training.data import prepare_data
    from infiniteid.training.objective import IdentityTrainingModel, make_batch
    from infiniteid.training.trainer import build_components, vae_encoder

    c = build_components(cfg.model)
    if adapter is not None:
        c.id_encoder.mapper = load_adapter(adapter, c.unet)
    data = prepare_data(cfg.data, cfg.cache_dir, vae_encoder(c.vae), c.clip_image.size, c.sources["model"],
                        progress=False, log=lambda _m: None)
    model = IdentityTrainingModel(c, cfg.data.resolution).eval()
    partners = data.same_identity()
    t = c.scheduler_config["num_train_timesteps"]
    right, wrong = [], []
    with torch.no_grad():
        for start in range(0, samples, 32):
            ids = range(start, min(start + 32, samples))
            b = make_batch(data, partners, ids, step=10**7, seed=321, clip_cfg=c.clip_image,
                           num_train_timesteps=t, id_dropout=0.0)
            right.append(float(model(**b)) * len(ids))
            # Another person's reference: roll the references by half the batch.
            b["face_embeds"] = torch.roll(b["face_embeds"], len(ids) // 2, 0)
            b["clip_pixels"] = torch.roll(b["clip_pixels"], len(ids) // 2, 0)
            wrong.append(float(model(**b)) * len(ids))
    return {"right": sum(right) / samples, "wrong": sum(wrong) / samples}


def main() -> None:
    from infiniteid.training import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="output_dir of a finished training run")
    ap.add_argument("--config", type=Path, help="its config (default: from the run's log)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = ap.parse_args()

    logs = sorted((args.run / "logs").glob("run-*.jsonl"))
    records = [json.loads(line) for f in logs for line in f.read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig.from_dict(start["config"])
    rates = [r["samples_per_s"] for r in records if r["event"] == "step"]
    losses = [r["loss"] for r in records if r["event"] == "step"]
    untrained = identity_signal(cfg, None, args.samples)
    trained = identity_signal(cfg, args.run / "adapter.safetensors", args.samples)
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; versions: {start['versions']}",
        f"shapes: {start['photos']} photos of {start['identities']} identities, {cfg.data.resolution}px, "
        f"global batch {start['global_batch']}, {start['processes']} process(es), "
        f"{start['trainable_parameters']} trainable parameters, model {cfg.model.kind}",
        "",
        "| | value |", "|---|---|",
        f"| steps | {len(rates) and max(r['step'] for r in records if r['event'] == 'step')} |",
        f"| samples/s (median of logged steps) | {statistics.median(rates):.1f} |" if rates else "| samples/s | - |",
        f"| logged loss, first / last | {losses[0]:.4f} / {losses[-1]:.4f} |" if losses else "| loss | - |",
        f"| loss, right reference: untrained / trained | {untrained['right']:.4f} / {trained['right']:.4f} |",
        f"| loss, another person's reference: untrained / trained | {untrained['wrong']:.4f} / {trained['wrong']:.4f} |",
        f"| identity signal (wrong - right), trained | {trained['wrong'] - trained['right']:+.4f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
