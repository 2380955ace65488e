"""Experiment, stage 1 of 2: train the tiny model's VAE as an autoencoder of generated-world pictures.

The method trains only the ID module on a frozen base; the tiny base has random weights and
cannot draw anything, so this experiment first gives it a base that knows the world (stage 2:
``tiny_world_base_unet.py``). Run as it was run (7 minutes of a 2-core VM, batch 16, 64 px)::

    python benchmarks/tiny_world_base_vae.py --seconds 420 --work tiny-world-base   # writes vae.safetensors, vae.png

Results: ``benchmarks/results/train_world_cpu-2026-11-30.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=420.0, help="training time budget (default 420)")
    p.add_argument("--work", type=Path, default=Path("tiny-world-base"), help="output folder (default tiny-world-base)")
    p.add_argument("--batch", type=int, default=16, help="pictures per step (default 16)")
    p.add_argument("--size", type=int, default=64, help="picture size in pixels (default 64)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import save_file

    from infiniteid.evaluation import world as W
    from infiniteid.model.loading import tiny_components

    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = tiny_components(0).vae.train().requires_grad_(True)
    rng = np.random.default_rng(0)

    def batch(n: int):
        ims = [W.render(W.Identity.random(rng), W.Scene.random(rng), args.size) for _ in range(n)]
        return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1

    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    t0, step = time.time(), 0
    while time.time() - t0 < args.seconds:
        x = batch(args.batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(step, round(time.time() - t0), round(loss.item(), 5), flush=True)
    vae.eval()
    x = batch(8)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    grid = torch.cat([x, rec], 2).clamp(-1, 1).add(1).mul(127.5).byte().permute(0, 2, 3, 1).numpy()
    Image.fromarray(np.concatenate(list(grid), 1)).save(args.work / "vae.png")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(args.work / "vae.safetensors"))
    print("done", step, "steps, reconstruction MSE", round(F.mse_loss(rec, x).item(), 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
