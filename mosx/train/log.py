"""The training log: losses summed on the device and read back without a host-device sync
(`AsyncLog`), and `TrainLog`, which records each window's mean loss in the run's history, in
`<out>/log.jsonl` and on the progress bar (rank 0)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from .._io import atomic_write_text
from .state import NonFiniteTraining, Progress, Run

__all__ = ["AsyncLog", "TrainLog", "diverged_message"]


def diverged_message(run: Run, progress: Progress, what: str, step: int, lr: float | None = None) -> str:
    """The message of a diverged run: what went non-finite, where, and what was kept."""
    at = f" at step {step}" + ("" if lr is None else f" (lr {lr:g})")
    if progress.saved_step is not None:
        kept = f"the last good checkpoint {run.ckpt_path} (step {progress.saved_step}) is kept"
    else:
        kept = "no checkpoint had been written yet"
    return (
        f"{what}{at}: training diverged and stopped; model.pt was not written and {kept}. "
        "Lower --lr (or raise --warmup-steps) and run again."
    )


class AsyncLog:
    """Losses accumulate on the device; every log_every steps their sum is copied to pinned host
    memory without waiting, and read once the copy has finished: no host-device sync in the loop."""

    def __init__(self, device, sink):
        self.cuda = device.type == "cuda"
        self.pending, self.sink = [], sink

    def push(self, step, loss_sum, count, lr, images, seconds):
        value = loss_sum.detach() / count
        if self.cuda:
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        else:
            host, ev = value, None
        self.pending.append((step, host, ev, lr, images, seconds))
        self.poll()

    def poll(self, block=False):
        while self.pending:
            step, host, ev, lr, images, seconds = self.pending[0]
            if ev is not None and not ev.query():
                if not block:
                    return
                ev.synchronize()
            self.pending.pop(0)
            self.sink(step, float(host), lr, images / max(seconds, 1e-9))


class TrainLog:
    """Where the logged losses go: progress.losses (every rank), log.jsonl and the bar (rank 0).

    A fresh run starts log.jsonl; a resumed one keeps the lines up to its checkpoint's step and drops
    what the killed run logged after it (a torn last line included)."""

    def __init__(self, run: Run, progress: Progress):
        cfg, rt, start = run.cfg, run.rt, progress.start_step
        self.run, self.progress = run, progress
        self.history = progress.losses
        self.file = self.bar = None
        if rt.main:
            log_path = os.path.join(cfg.out, "log.jsonl")
            if start > 0 and os.path.exists(log_path):
                with open(log_path) as f:
                    text = f.read()
                # A run killed mid-line leaves a torn last line; it is past the checkpoint (the log is
                # flushed before every checkpoint), so only whole lines are read.
                whole = text[: text.rfind("\n") + 1]
                kept = [ln + "\n" for ln in whole.splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
                # Rewritten atomically before anything is appended: a kill of this run at any moment
                # keeps them (truncating, then writing them through a buffer, lost them).
                atomic_write_text("".join(kept), log_path)
            self.file = open(log_path, "a" if start > 0 else "w")
        if rt.main and cfg.progress and cfg.steps > start:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0
            )
        self.meter = AsyncLog(rt.device, self._sink)

    def _sink(self, step, loss, lr, ips):
        if not math.isfinite(loss):
            raise NonFiniteTraining(diverged_message(self.run, self.progress, f"the training loss is {loss}", step, lr))
        self.history.append((step, loss))
        if self.file:
            self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "images_per_s": ips}) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")

    def push(self, step, loss_sum, count, lr, images, seconds):
        """Log the mean of loss_sum over count micro-batches at `step` (read back asynchronously)."""
        self.meter.push(step, loss_sum, count, lr, images, seconds)

    def flush(self):
        """Wait for every pending loss and record it."""
        self.meter.poll(block=True)

    def step_done(self):
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()

    def close(self):
        if self.file:
            self.file.close()
