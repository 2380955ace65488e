"""Experiment, stage 2 of 2: train the tiny U-Net (text-conditioned, the world's captions) on the
latents of the stage-1 VAE, then save the tiny model in the SDXL folder layout, so that
``infiniteid train`` (``model.kind: sdxl``) trains the ID module on a base that knows the world::

    python benchmarks/tiny_world_base_unet.py SECONDS   # writes /tmp/tiny-world-base/base/
"""
import time, sys, numpy as np, torch, torch.nn.functional as F
from diffusers import DDPMScheduler
from infiniteid.model.loading import tiny_components
from infiniteid.model.weights_folder import save_weight_folders
from infiniteid.evaluation import world as W
budget = float(sys.argv[1])
torch.manual_seed(0)
c = tiny_components(0)
c.vae.load_state_dict(torch.load('/tmp/tiny-world-base/vae.pt'))
vae, unet = c.vae.eval(), c.unet.train()
sched = DDPMScheduler.from_config(c.scheduler_config)
rng = np.random.default_rng(1)
@torch.no_grad()
def text(prompts):
    ids1 = torch.from_numpy(c.tokenizer(prompts)); ids2 = torch.from_numpy(c.tokenizer_2(prompts))
    h1 = c.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
    o2 = c.text_encoder_2(ids2, output_hidden_states=True)
    return torch.cat([h1, o2.hidden_states[-2]], -1), o2.text_embeds
params = [p for n, p in unet.named_parameters() if "_ip." not in n]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
time_ids = torch.tensor([64, 64, 0, 0, 64, 64], dtype=torch.float32)
t0 = time.time(); step = 0; ema = None
while time.time() - t0 < budget:
    scenes = [W.Scene.random(rng) for _ in range(16)]
    ims = [W.render(W.Identity.random(rng), s, 64) for s in scenes]
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    prompts = [W.caption(s) if rng.random() > 0.1 else "" for s in scenes]
    emb, pooled = text(prompts)
    noise = torch.randn_like(lat); t = torch.randint(0, 1000, (16,))
    pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=emb,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(16, -1)}).sample
    loss = F.mse_loss(pred, noise)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
    if step % 100 == 0: print(step, round(time.time() - t0), round(ema, 4), flush=True)
unet.eval()
w = save_weight_folders(c, '/tmp/tiny-world-base/base')
print('saved', w, step)
