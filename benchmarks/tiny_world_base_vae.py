"""Experiment, stage 1 of 2: train the tiny model's VAE as an autoencoder of generated-world pictures.

The method trains only the ID module on a frozen base; the tiny base has random weights and
cannot draw anything, so this experiment first gives it a base that knows the world (stage 2:
``tiny_world_base_unet.py``). Run as it was run (7 minutes of a 2-core VM, batch 16, 64 px)::

    python benchmarks/tiny_world_base_vae.py      # writes /tmp/tiny-world-base/vae.pt and vae.png

Results: ``benchmarks/results/train_world_cpu-2026-11-30.md``.
"""
import os, time, numpy as np, torch, torch.nn.functional as F
os.makedirs('/tmp/tiny-world-base', exist_ok=True)
from infiniteid.model.loading import tiny_components
from infiniteid.evaluation import world as W
torch.manual_seed(0)
c = tiny_components(0)
vae = c.vae.train().requires_grad_(True)
rng = np.random.default_rng(0)
def batch(n):
    ims=[W.render(W.Identity.random(rng), W.Scene.random(rng), 64) for _ in range(n)]
    return torch.from_numpy(np.stack(ims)).permute(0,3,1,2).float()/127.5-1
opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
t=time.time(); step=0
while time.time()-t < 420:
    x=batch(16)
    post=vae.encode(x).latent_dist
    z=post.sample()
    rec=vae.decode(z).sample
    loss=F.mse_loss(rec,x)+1e-6*post.kl().mean()
    opt.zero_grad(); loss.backward(); opt.step(); step+=1
    if step%50==0: print(step, round(time.time()-t), float(loss), flush=True)
vae.eval()
x=batch(8)
with torch.no_grad(): rec=vae.decode(vae.encode(x).latent_dist.mean).sample
from PIL import Image
g=torch.cat([x,rec],2).clamp(-1,1).add(1).mul(127.5).byte().permute(0,2,3,1).numpy()
Image.fromarray(np.concatenate(list(g),1)).save('/tmp/tiny-world-base/vae.png')
torch.save(vae.state_dict(),'/tmp/tiny-world-base/vae.pt')
print('done', step, float(F.mse_loss(rec,x)))
