"""The training loop: Accelerate for processes, devices and mixed precision.

``train(cfg)`` runs in one process or under ``accelerate launch`` (DDP over
GPUs or CPU processes with gloo, one node or many): Accelerate sets up the
process group, wraps :class:`~.objective.IdentityTrainingModel` in DDP and
runs its forward under autocast for ``bf16``/``fp16``. Everything else is
explicit here, so that its guarantees are easy to check:

* each optimizer step's global batch is samples ``0 .. batch_size x processes x
  grad_accum - 1`` of that step (drawn from ``(seed, step, sample)``); process
  ``r`` takes its slice (:func:`~.objective.micro_batch_ids`), gradients are
  averaged by DDP and over micro-steps, so N processes equal one;
* checkpoints (``checkpoints/step-NNNNNN/``: ``adapter.safetensors`` in the
  adapter format plus ``state.pt`` with optimizer, LR schedule, EMA, RNG states
  and the step) are written by the main process, atomically; resuming restores
  all of it, so a resumed run equals an uninterrupted one bit for bit on a CPU;
* the learning-rate schedule steps once per optimizer step (not once per
  process, as an Accelerate-prepared scheduler would).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from ..model.adapter import load_adapter, save_adapter
from ..model.pipeline import Components
from ..model.weights_file import load_weights_file
from .config import ConfigError, ModelConfig, TrainConfig
from .data import prepare_data
from .objective import IdentityTrainingModel, make_batch, micro_batch_ids

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
ADAPTER_FILE = "adapter.safetensors"


@dataclass
class TrainResult:
    step: int
    losses: List[float] = field(default_factory=list)  # per optimizer step of this run, global mean
    adapter: Optional[Path] = None
    log: Optional[Path] = None
    skipped: int = 0


def build_components(cfg: ModelConfig) -> Components:
    """The model to train: the seeded tiny model or SDXL from local folders (see ModelConfig)."""
    from ..model.id_encoder import build_mapper
    from ..model.loading import load_components, tiny_components

    if cfg.kind == "sdxl":
        c = load_components(cfg.base, cfg.image_encoder, cfg.init_adapter, face_tokens=cfg.face_tokens)
    else:
        c = tiny_components(cfg.seed)
        if cfg.init_adapter:
            c.id_encoder.mapper = load_adapter(cfg.init_adapter, c.unet)
        elif cfg.face_tokens != c.id_encoder.mapper.config.face_tokens:
            mcfg = c.id_encoder.mapper.config
            mcfg.face_tokens = cfg.face_tokens
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                c.id_encoder.mapper = build_mapper(mcfg)
    if not cfg.init_adapter and cfg.ip_init == "text":
        ip_from_text(c.unet)
    return c


@torch.no_grad()
def ip_from_text(unet: torch.nn.Module) -> int:
    """Every ``attn2``'s ``to_k_ip``/``to_v_ip`` := its ``to_k``/``to_v`` (IP-Adapter's
    training starts so: the mapper's tokens live in the text tokens' space, so the frozen
    attention reads them from the first step). Returns the number of layers set."""
    from diffusers.models.attention_processor import Attention

    from ..model.processors import IDCrossAttnProcessor

    n = 0
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        if isinstance(module, Attention) and isinstance(proc, IDCrossAttnProcessor):
            proc.to_k_ip.weight.copy_(module.to_k.weight)
            proc.to_v_ip.weight.copy_(module.to_v.weight)
            n += 1
    return n


def vae_encoder(vae: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Pixels in [-1, 1] ``(B, 3, R, R)`` -> scaled latents (the posterior mean), fp32."""
    p = next(vae.parameters())

    @torch.no_grad()
    def encode(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(p.device, torch.float32)
        lat = vae.float().encode(x).latent_dist.mean * vae.config.scaling_factor
        return lat.cpu().numpy()

    return encode


def checkpoint_dirs(output_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """``None``, ``"latest"`` (the newest checkpoint, or a fresh start when there is none) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / ADAPTER_FILE).is_file():
        raise ConfigError(f"{path} is not a training checkpoint (expected {STATE_FILE} and {ADAPTER_FILE} in it)")
    return path


def train(cfg: TrainConfig, resume: Optional[str] = None, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    from accelerate import Accelerator

    cfg.validate()
    try:
        # Processes started by `accelerate launch --multi_gpu` / torchrun on a machine without
        # CUDA: CPU DDP over gloo (accelerate's own `--cpu` launcher needs MPI for >1 process).
        cpu_ddp = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
        acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp)
    except ValueError as e:  # a precision this device cannot run
        raise ConfigError(f"mixed_precision={cfg.mixed_precision!r} cannot run here: {e}") from None
    try:
        return _run(acc, cfg, resume, progress, log if acc.is_main_process else (lambda _msg: None))
    finally:
        if acc.num_processes == 1:
            # Accelerate keeps its state in a process-wide singleton; release it so that a
            # later train() in this process (a notebook, a test) may use other settings.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)


def _run(acc, cfg: TrainConfig, resume: Optional[str], progress: bool, say: Callable[[str], None]) -> TrainResult:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    ckpt = resolve_resume(resume, out)

    components = build_components(cfg.model)
    if ckpt is not None:  # weights first, on every process, before DDP wraps the model
        components.id_encoder.mapper.load_state_dict(load_adapter(ckpt / ADAPTER_FILE, components.unet).state_dict())
    with acc.main_process_first():  # the main process fills the cache, the others read it
        data = prepare_data(cfg.data, cfg.cache_dir, vae_encoder(components.vae), components.clip_image.size,
                            components.sources.get("model", json.dumps(components.sources, sort_keys=True)),
                            progress=progress and acc.is_main_process, log=say)
    if data.skipped:
        say(data.report())
    components.vae.to("meta")  # the latents are cached: free the VAE and the text encoders
    model = IdentityTrainingModel(components, cfg.data.resolution)
    components.text_encoder.to("meta"), components.text_encoder_2.to("meta")
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()  # diffusers checkpoints only in training mode (the U-Net has no dropout)
    params = [p for _, p in model.trainable_named_parameters()]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=o.warmup_steps)
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay else None
    ddp_model, optimizer = acc.prepare(model, optimizer)

    step = 0
    if ckpt is not None:
        state = load_weights_file(ckpt / STATE_FILE)  # weights-only unpickling: the state is plain data
        step = _restore(state, optimizer, lr_schedule, ema)
        say(f"resumed from {ckpt} at step {step}")
    result = TrainResult(step=step, skipped=len(data.skipped))
    if step >= cfg.max_steps:
        say(f"nothing to do: the checkpoint is at step {step}, max_steps is {cfg.max_steps}")

    log_file = _open_log(out, acc.is_main_process)
    result.log = log_file
    procs, rank = acc.num_processes, acc.process_index
    per_step = cfg.batch_size * procs * cfg.grad_accum
    _write(log_file, {"event": "start", "step": step, "resumed_from": str(ckpt) if ckpt else None,
                      "processes": procs, "global_batch": per_step, "device": str(acc.device),
                      "photos": len(data), "identities": len(data.identities),
                      "skipped": [[s.path, s.reason] for s in data.skipped],
                      "trainable_parameters": int(sum(p.numel() for p in params)),
                      "config": cfg.to_dict(), "versions": _versions()})
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", disable=not (progress and acc.is_main_process))
    partners = data.same_identity()
    t_steps = model.noise_scheduler.config.num_train_timesteps
    t0 = time.perf_counter()
    while step < cfg.max_steps:
        t_step = time.perf_counter()
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            ids = micro_batch_ids(per_step, procs, rank, micro, cfg.batch_size)
            batch = make_batch(data, partners, ids, step, cfg.seed, components.clip_image, t_steps, cfg.id_dropout,
                               cfg.timesteps)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = micro == cfg.grad_accum - 1
            with (nullcontext() if sync or procs == 1 else acc.no_sync(ddp_model)):
                loss = ddp_model(**batch)
                acc.backward(loss / cfg.grad_accum)
            total += loss.detach().float() / cfg.grad_accum
        if o.max_grad_norm > 0:
            acc.clip_grad_norm_(params, o.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        step += 1
        loss_value = float(acc.reduce(total, reduction="mean"))
        result.losses.append(loss_value)
        rate = per_step / max(time.perf_counter() - t_step, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", samples_per_s=f"{rate:.1f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            _write(log_file, {"event": "step", "step": step, "loss": loss_value, "lr": lr_schedule.get_last_lr()[0],
                              "samples_per_s": round(rate, 3), "seconds": round(time.perf_counter() - t0, 3)})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            if acc.is_main_process:
                path = _save_checkpoint(out, step, model, optimizer, lr_schedule, ema, cfg)
                _write(log_file, {"event": "checkpoint", "step": step, "path": str(path)})
            acc.wait_for_everyone()
    bar.close()
    result.step = step
    if acc.is_main_process:
        result.adapter = _save_final(out, model, ema, params)
        _write(log_file, {"event": "end", "step": step, "adapter": str(result.adapter),
                          "seconds": round(time.perf_counter() - t0, 3)})
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _restore(state: dict, optimizer, lr_schedule, ema) -> int:
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if ema is not None:
        if state.get("ema") is None:
            raise ConfigError("the checkpoint was written without EMA; set ema_decay to null to resume it")
        ema.load_state_dict(state["ema"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(rng["python"])
    return int(state["step"])


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and numbers, so the checkpoint loads with the weights-only unpickler."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _save_checkpoint(out: Path, step: int, model, optimizer, lr_schedule, ema, cfg: TrainConfig) -> Path:
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(tmp / ADAPTER_FILE, model.id_encoder.mapper, model.unet)
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()},
        "config": cfg.to_dict(),
    }, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if cfg.keep_checkpoints:
        for old in checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    return final


def _save_final(out: Path, model, ema, params) -> Path:
    """``adapter.safetensors``: the EMA weights when EMA is on (the raw ones then go to
    ``adapter-raw.safetensors``), else the trained weights."""
    path = out / ADAPTER_FILE
    if ema is None:
        save_adapter(path, model.id_encoder.mapper, model.unet)
        return path
    save_adapter(out / "adapter-raw.safetensors", model.id_encoder.mapper, model.unet)
    ema.store(params)
    ema.copy_to(params)
    save_adapter(path, model.id_encoder.mapper, model.unet)
    ema.restore(params)
    return path


def _open_log(out: Path, main: bool) -> Optional[Path]:
    if not main:
        return None
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    n = len(list(logs.glob(f"run-{stamp}*.jsonl")))
    return logs / f"run-{stamp}{'-' + str(n) if n else ''}.jsonl"


def _write(path: Optional[Path], record: dict) -> None:
    if path is None:
        return
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _versions() -> dict:
    import accelerate
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__}

