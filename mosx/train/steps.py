"""The step loop: for each optimizer step, the learning rate, one mixup draw, `accum` micro-batches
(DDP syncs gradients on the last), the loss (flooded when UM's b is set), the optimizer step, the
loss log every cfg.log_every steps and a checkpoint every cfg.ckpt_every steps."""

from __future__ import annotations

import contextlib
import time

import torch

from ..unleash import flood
from . import resume
from .features import to_input
from .log import TrainLog
from .mixup import mix_inputs
from .models import train_mode
from .state import Progress, Run

__all__ = ["run_steps"]


def run_steps(run: Run, progress: Progress, log: TrainLog, batches, net, ddp=None, every=None) -> float:
    """Steps progress.start_step .. cfg.steps - 1 on `net` (the model, its head on the feature
    cache, or their DDP / compiled wrappers; `ddp` the DDP wrapper or None); every = (n, fn): fn(step,
    model) in eval mode after every n-th step and the last. Returns the loop's wall seconds (CUDA
    synchronised at the end; the time spent in fn is not counted)."""
    cfg, rt, model, micro, accum = run.cfg, run.rt, run.model, run.micro, run.accum
    flood_b = progress.flood_level
    loss_sum = torch.zeros((), device=rt.device)
    window_count, window_images, window_t = 0, 0, time.perf_counter()

    def training_mode():
        train_mode(model)
        if cfg.cache_features:
            model.backbone.eval()

    training_mode()
    hook_seconds = 0.0
    it = iter(batches)
    t_loop = time.perf_counter()
    for step in range(progress.start_step, cfg.steps):
        lr = run.sched.apply(step)
        lam, perm = run.mixup.draw(micro)
        if perm is not None and rt.device.type == "cuda":  # one small async copy per step
            perm = perm.pin_memory().to(rt.device, non_blocking=True)
        for a in range(accum):
            x, y = next(it)
            x = mix_inputs(to_input(x, rt), lam, perm)
            y = y.to(rt.device, non_blocking=True)
            sync = contextlib.nullcontext() if ddp is None or a == accum - 1 else ddp.no_sync()
            with sync:
                with rt.autocast():
                    logits = net(x)
                loss = run.loss_fn(logits, y, lam, perm)
                if flood_b is not None:
                    loss = flood(loss, flood_b)
                (loss / accum if accum > 1 else loss).backward()
            loss_sum += loss.detach()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        window_count += accum
        window_images += accum * micro * rt.world
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
        done = step + 1
        log.step_done()
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            log.push(done, loss_sum, window_count, lr, window_images, now - window_t)
            loss_sum = torch.zeros((), device=rt.device)
            window_count, window_images, window_t = 0, 0, now
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
            resume.save(run, progress, done, log.flush)
        if every is not None and (done % every[0] == 0 or done == cfg.steps):
            t_hook = time.perf_counter()
            model.eval()
            with torch.no_grad():
                every[1](done, model)
            training_mode()
            spent = time.perf_counter() - t_hook
            hook_seconds += spent
            window_t += spent  # the logged images/s counts training only
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter() - t_loop - hook_seconds
