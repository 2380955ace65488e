"""Train a tiny model that knows the generated world, end to end, on one device (a GPU in minutes).

The method trains only the ID module on a frozen base, and the tiny model's base has random
weights, so a model that really learns needs a base that can draw the world first. Stages, each
time-boxed, each writing its results before the next starts (a run stopped early keeps them):

1. the tiny VAE as an autoencoder of world pictures; its latent scaling factor is then fitted
   (1 / the latents' standard deviation) instead of SDXL's 0.13025;
2. the tiny U-Net on text-conditioned denoising of those latents with the world's captions
   (10 % dropped to the empty prompt, which is also the unconditional prompt of this model);
   saved in the SDXL folder layout (``OUT/model/base``, ``OUT/model/image_encoder``);
3. ``infiniteid train`` (the project's identity-enhanced training loop, unchanged) on a world of
   ``--identities`` people, one run per ``--variant``, side by side, each stopped after
   ``--id-seconds`` at its last checkpoint; plus ``OUT/heldout``: new people for evaluation.

Evaluate afterwards (any machine)::

    infiniteid evaluate --base OUT/model/base --image-encoder OUT/model/image_encoder \\
        --adapter OUT/id-a/adapter.safetensors --references OUT/heldout/people \\
        --face-models OUT/heldout/face-models --world --height 128 --width 128 --out eval-a

Run as it was run (one H200, through ``benchmarks/world_model_device.sh``; results in
``benchmarks/results/world_model-2026-11-30.md``)::

    python benchmarks/world_model.py --out world-run --vae-seconds 90 --unet-seconds 170 --id-seconds 140 \\
        --variant a:lr=1e-3,batch_size=32 --variant b:lr=3e-4,batch_size=64 \\
        --variant c:lr=1e-3,batch_size=32,face_tokens=16
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=parts[0], epilog="\n\n".join(parts[-2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("world-run"), help="output folder (default world-run)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--size", type=int, default=128, help="picture side in pixels (default 128, the tiny model's own)")
    p.add_argument("--pool", type=int, default=16384, help="world pictures rendered for stages 1-2 (default 16384)")
    p.add_argument("--batch", type=int, default=128, help="pictures per step in stages 1-2 (default 128)")
    p.add_argument("--vae-seconds", type=float, default=100.0)
    p.add_argument("--unet-seconds", type=float, default=170.0)
    p.add_argument("--id-seconds", type=float, default=170.0, help="time box of every stage-3 run (side by side)")
    p.add_argument("--identities", type=int, default=400, help="people in the training world (default 400 of 648)")
    p.add_argument("--photos", type=int, default=4, help="photos per person (default 4)")
    p.add_argument("--heldout", type=int, default=12, help="new people for evaluation (default 12)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="one stage-3 run; keys: lr, batch_size, id_dropout, face_tokens, warmup_steps, ema_decay, "
                        "logit_mean (logit-normal timesteps with this mean, e.g. 1.0; default uniform), "
                        "init (an adapter file to start from) (default: a:lr=1e-3,batch_size=32)")
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="a model folder of an earlier run (base/, image_encoder/): skip stages 1 and 2")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes that render")
    return p.parse_args(argv)


# -- the world's pictures ---------------------------------------------------------------------

def _render_chunk(job):
    import numpy as np

    from infiniteid.evaluation import world as W

    seed, n, size = job
    rng = np.random.default_rng(seed)
    scenes = [W.Scene.random(rng) for _ in range(n)]
    ims = np.stack([W.render(W.Identity.random(rng), s, size, 0.01, rng) for s in scenes])
    return ims, [W.caption(s) for s in scenes]


def render_pool(n: int, size: int, workers: int):
    import multiprocessing as mp

    import numpy as np

    jobs = [(1000 + i, min(256, n - i * 256), size) for i in range((n + 255) // 256)]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


# -- stages 1 and 2 ------------------------------------------------------------------------------

def _lr_at(t: float, total: float, lr: float) -> float:
    """Constant, then a cosine down to a tenth over the last 30 % of the time box."""
    import math

    f = max(0.0, (t / total - 0.7) / 0.3)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(f, 1.0))))


def train_vae(c, pool, args, dev, say) -> Dict[str, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    vae = c.vae.to(dev).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    gpu_pool = torch.from_numpy(pool).to(dev)
    t0, step = time.time(), 0
    while (el := time.time() - t0) < args.vae_seconds:
        for g in opt.param_groups:
            g["lr"] = _lr_at(el, args.vae_seconds, 2e-3)
        x = gpu_pool[torch.from_numpy(rng.integers(len(pool), size=args.batch)).to(dev)]
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            say(f"vae step {step} {el:.0f}s loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(gpu_pool[i:i + 512].permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
                         for i in range(0, len(pool), 512)])
        x = gpu_pool[:256].permute(0, 3, 1, 2).float() / 127.5 - 1
        mse = F.mse_loss(vae.decode(lat[:256]).sample, x).item()
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    return {"steps": step, "seconds": time.time() - t0, "reconstruction_mse": mse, "scaling_factor": scale,
            "pictures_per_s": step * args.batch / (time.time() - t0)}, lat * scale


def train_unet(c, latents, captions, args, dev, say) -> Dict[str, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from infiniteid.generation import sdxl_time_ids

    prompts = sorted(set(captions)) + [""]
    index = {p: i for i, p in enumerate(prompts)}
    with torch.no_grad():
        te1, te2 = c.text_encoder.to(dev), c.text_encoder_2.to(dev)
        ids1 = torch.from_numpy(c.tokenizer(prompts)).to(dev)
        ids2 = torch.from_numpy(c.tokenizer_2(prompts)).to(dev)
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids2, output_hidden_states=True)
        embeds, pooled = torch.cat([h1, o2.hidden_states[-2]], -1), o2.text_embeds
    cap = torch.tensor([index[p] for p in captions], device=dev)
    empty = index[""]
    unet = c.unet.to(dev).train()
    sched = DDPMScheduler.from_config(c.scheduler_config)
    params = [p for n, p in unet.named_parameters() if "_ip." not in n]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    time_ids = torch.from_numpy(sdxl_time_ids(args.size, args.size)).to(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    n = args.batch
    t0, step, ema = time.time(), 0, None
    while (el := time.time() - t0) < args.unet_seconds:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(el, args.unet_seconds, 1e-3)
        i = torch.randint(0, len(latents), (n,), device=dev, generator=g)
        lat = latents[i]
        k = torch.where(torch.rand(n, device=dev, generator=g) < 0.1, empty, cap[i])
        noise = torch.randn(lat.shape, device=dev, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), device=dev, generator=g)
        pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=embeds[k],
                    added_cond_kwargs={"text_embeds": pooled[k], "time_ids": time_ids.expand(n, -1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 500 == 0:
            say(f"unet step {step} {el:.0f}s loss {ema:.4f}")
    unet.eval()
    return {"steps": step, "seconds": time.time() - t0, "loss_ema": ema, "samples_per_s": step * n / (time.time() - t0)}


# -- stage 3 -----------------------------------------------------------------------------------

def parse_variant(text: str) -> Dict[str, object]:
    name, _, rest = text.partition(":")
    out: Dict[str, object] = {"name": name}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        out[k] = v if k == "init" else int(v) if k in ("batch_size", "face_tokens", "warmup_steps") else float(v)
    return out


def train_config(v: Dict[str, object], out: Path, model: Path, world: Path, cache: Path, size: int) -> dict:
    return {
        "output_dir": str(out), "seed": 0,
        "data": {"root": str(world / "people"), "face_models": str(world / "face-models"), "resolution": size,
                 "cache_dir": str(cache)},
        "model": {"kind": "sdxl", "base": str(model / "base"), "image_encoder": str(model / "image_encoder"),
                  "face_tokens": int(v.get("face_tokens", 4)),
                  **({"init_adapter": str(Path(str(v["init"])).resolve())} if "init" in v else {})},
        "optim": {"lr": float(v.get("lr", 1e-3)), "warmup_steps": int(v.get("warmup_steps", 100))},
        "batch_size": int(v.get("batch_size", 32)), "max_steps": 10 ** 7, "checkpoint_every": 250,
        "keep_checkpoints": 2, "log_every": 100, "id_dropout": float(v.get("id_dropout", 0.1)),
        **({"ema_decay": float(v["ema_decay"])} if "ema_decay" in v else {}),
        **({"timestep_sampling": "logit_normal", "logit_mean": float(v["logit_mean"])} if "logit_mean" in v else {}),
    }


def run_train(cfg_file: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "infiniteid.cli", "train", str(cfg_file), "--no-progress"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["a:lr=1e-3,batch_size=32"])]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    t_all = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t_all:6.0f}s] {msg}", flush=True)

    def save_report() -> None:
        (out / "report.json").write_text(json.dumps(report, indent=1))

    from infiniteid.evaluation import world as W
    from infiniteid.face import write_synthetic_face_models

    # The worlds first (CPU only, before any device work): training people, then new ones.
    world, heldout = out / "world", out / "heldout"
    if not (world / "people" / "world.json").is_file():
        W.write_world(world / "people", args.identities, args.photos, args.size, seed=0)
        write_synthetic_face_models(world / "face-models")
    if not (heldout / "people" / "world.json").is_file():
        W.write_world(heldout / "people", args.heldout, 1, args.size, seed=99,
                      exclude=W.world_identities(world / "people"))
        write_synthetic_face_models(heldout / "face-models")
    import torch

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    report["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    report["versions"] = {"torch": torch.__version__}
    model = (out / "model" if args.base is None else args.base).resolve()
    if args.base is None:
        stages_1_2(args, model, report, dev, say, save_report)
    rc = _stage_3(args, variants, model, world, out, report, say, save_report)
    say("done")
    return rc


def stages_1_2(args, model: Path, report, dev, say, save_report) -> None:
    import torch

    from infiniteid.model.loading import tiny_components
    from infiniteid.model.weights_folder import save_weight_folders

    pool, captions = render_pool(args.pool, args.size, args.workers)
    say(f"rendered {len(pool)} pictures of {args.size} px")
    torch.manual_seed(0)
    c = tiny_components(0)
    report["vae"], latents = train_vae(c, pool, args, dev, say)
    say(f"vae: {report['vae']}")
    save_report()
    report["unet"] = train_unet(c, latents, captions, args, dev, say)
    say(f"unet: {report['unet']}")
    c.force_zeros_for_empty_prompt = False  # the empty prompt is this model's unconditional prompt
    for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2, c.id_encoder):
        m.to("cpu")
    save_weight_folders(c, model)
    save_report()
    say(f"saved the world base to {model}")


def _stage_3(args, variants, model: Path, world: Path, out: Path, report, say, save_report) -> int:
    # Stage 3: the data cache once, then the variants side by side, each in its time box.
    cache = out / "cache"
    prep = out / "id-prepare"
    cfg = train_config({"batch_size": 1}, prep, model, world, cache, args.size)
    cfg["max_steps"] = 1
    (out / "prepare.json").write_text(json.dumps(cfg, indent=1))
    t0 = time.time()
    rc = run_train(out / "prepare.json", out / "prepare.log").wait()
    report["id_data_seconds"] = time.time() - t0
    say(f"prepared the ID data ({rc=}) in {report['id_data_seconds']:.0f}s")
    if rc != 0:
        print((out / "prepare.log").read_text()[-3000:])
        save_report()
        return 1
    procs = {}
    for v in variants:
        d = out / f"id-{v['name']}"
        cfg = train_config(v, d, model, world, cache, args.size)
        (out / f"id-{v['name']}.json").write_text(json.dumps(cfg, indent=1))
        procs[v["name"]] = run_train(out / f"id-{v['name']}.json", out / f"id-{v['name']}.log")
    time.sleep(args.id_seconds)
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for name, p in procs.items():
        p.wait()
        d = out / f"id-{name}"
        ckpts = sorted((d / "checkpoints").glob("step-*"))
        report[f"id-{name}"] = {"last_checkpoint": ckpts[-1].name if ckpts else None}
        if ckpts:
            (d / "adapter.safetensors").write_bytes((ckpts[-1] / "adapter.safetensors").read_bytes())
        say(f"id-{name}: {report[f'id-{name}']}")
    save_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
