"""Experiment, stage 2 of 2: train the tiny U-Net (text-conditioned, the world's captions) on the
latents of the stage-1 VAE, then save the tiny model in the SDXL folder layout, so that
``infiniteid train`` (``model.kind: sdxl``) trains the ID module on a base that knows the world::

    python benchmarks/tiny_world_base_unet.py --seconds 1080 --work tiny-world-base   # writes tiny-world-base/base/

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
    p.add_argument("--seconds", type=float, default=1080.0, help="training time budget (default 1080)")
    p.add_argument("--work", type=Path, default=Path("tiny-world-base"),
                   help="folder holding stage 1's vae.safetensors; base/ is written here (default tiny-world-base)")
    p.add_argument("--batch", type=int, default=16, help="pictures per step (default 16)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from infiniteid.evaluation import world as W
    from infiniteid.model.loading import tiny_components
    from infiniteid.model.weights_file import load_weights_file
    from infiniteid.model.weights_folder import save_weight_folders

    vae_file = args.work / "vae.safetensors"
    if not vae_file.is_file():
        print(f"error: {vae_file} not found: run benchmarks/tiny_world_base_vae.py --work {args.work} first", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    c = tiny_components(0)
    c.vae.load_state_dict(load_weights_file(vae_file))
    vae, unet = c.vae.eval(), c.unet.train()
    sched = DDPMScheduler.from_config(c.scheduler_config)
    rng = np.random.default_rng(1)

    @torch.no_grad()
    def text(prompts):
        ids1, ids2 = torch.from_numpy(c.tokenizer(prompts)), torch.from_numpy(c.tokenizer_2(prompts))
        h1 = c.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = c.text_encoder_2(ids2, output_hidden_states=True)
        return torch.cat([h1, o2.hidden_states[-2]], -1), o2.text_embeds

    params = [p for n, p in unet.named_parameters() if "_ip." not in n]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    n = args.batch
    time_ids = torch.tensor([64, 64, 0, 0, 64, 64], dtype=torch.float32)
    t0, step, ema = time.time(), 0, None
    while time.time() - t0 < args.seconds:
        scenes = [W.Scene.random(rng) for _ in range(n)]
        ims = [W.render(W.Identity.random(rng), s, 64) for s in scenes]
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        prompts = [W.caption(s) if rng.random() > 0.1 else "" for s in scenes]
        emb, pooled = text(prompts)
        noise, t = torch.randn_like(lat), torch.randint(0, 1000, (n,))
        pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(n, -1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            print(step, round(time.time() - t0), round(ema, 4), flush=True)
    unet.eval()
    print("saved", save_weight_folders(c, args.work / "base"), step, "steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
