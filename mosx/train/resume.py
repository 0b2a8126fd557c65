"""Exact resume: the run checkpoint (`<out>/checkpoint.pt`: model, optimizer, mixup, every rank's
RNG state, the loss history, the flood level) written atomically by `save`, and read back by
`restore` so that a killed run continues as if it had never stopped."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.distributed as dist

from ..models.files import read_file
from .checkpoint import atomic_save, rng_state, set_rng_state
from .log import diverged_message
from .state import NonFiniteTraining, Progress, Run

__all__ = ["CKPT_FORMAT", "ResumeMismatch", "data_fingerprint", "restore", "save"]

CKPT_FORMAT = "mosx.checkpoint/1"

# settings that do not change what a run computes: a resumed run may change them freely ("steps" may
# grow, and is checked on its own; the data are compared by content, not by path)
_FREE = {
    "resume", "resume_force", "progress", "log_every", "ckpt_every", "workers", "threads", "step_sleep",
    "trust_pickle", "out", "device", "compile", "data", "data_root", "val_data", "steps",
}  # fmt: skip


class ResumeMismatch(ValueError):
    """--resume found a checkpoint of another run (other settings, grouping or data, or a later step)."""


def data_fingerprint(data) -> dict:
    """What identifies a training set cheaply: its size, class count, a hash of every label and of a
    strided sample of at most 1,024 inputs (tensor data) or of every file path (image folders / lists)."""
    h = hashlib.sha256()
    h.update(np.asarray(data.targets, dtype=np.int64).tobytes())
    x = getattr(data, "x", None)
    if isinstance(x, torch.Tensor):
        step = max(1, len(x) // 1024)
        h.update(x[::step].detach().cpu().contiguous().numpy().tobytes())
    samples = getattr(data, "samples", None)
    if samples is not None:
        h.update("\0".join(str(p) for p, _ in samples).encode())
    return {"n": len(data), "classes": int(data.num_classes), "hash": h.hexdigest()}


def _data_id(run: Run) -> dict:
    """The run's data fingerprint; the data do not change during a run, so it is hashed once."""
    if run.data_id is None:
        run.data_id = data_fingerprint(run.data)
    return run.data_id


def _check_same_run(run: Run, ck: dict, path: str) -> None:
    cfg = run.cfg
    if ck["step"] > cfg.steps:
        raise ResumeMismatch(
            f"--resume: {path} is at step {ck['step']}, past --steps {cfg.steps}; its weights are not a "
            f"step-{cfg.steps} model (use --init to start a new run from it, or a new --out)"
        )
    if cfg.resume_force:
        return
    diffs = []
    old = ck.get("config")
    if old is not None:
        now = cfg.to_dict()
        for k in sorted(set(old) | set(now)):
            if k not in _FREE and old.get(k) != now.get(k):
                diffs.append(f"{k}: checkpoint {old.get(k)!r}, now {now.get(k)!r}")
    groups = None if run.groups is None else list(run.groups.class_to_group)
    if "groups" in ck and ck["groups"] != groups:
        diffs.append("the grouping differs (class -> group map)")
    d, n = ck.get("data"), _data_id(run)
    if d is not None and d != n:
        diffs.append(f"the training data differ ({d['n']} samples, {d['classes']} classes -> {n['n']}, {n['classes']})")
    if diffs:
        raise ResumeMismatch(
            f"--resume: {path} was made by another run; "
            + "; ".join(diffs)
            + ". Use another --out for a new run, or --resume-force to continue anyway."
        )


def restore(run: Run) -> Progress:
    """The progress to start from: the checkpoint's when cfg.resume finds one (model, optimizer,
    mixup and this rank's RNG state are loaded in place), else step 0 with cfg.um_flood_level."""
    cfg, rt, say, path = run.cfg, run.rt, run.say, run.ckpt_path
    progress = Progress(flood_level=cfg.um_flood_level)
    if cfg.resume and os.path.exists(path):
        ck = read_file(path)  # mosx's own checkpoint: tensors and plain values only
        if ck.get("format") != CKPT_FORMAT:
            raise ValueError(f"{path}: not a mosx checkpoint")
        _check_same_run(run, ck, path)
        if ck["world"] != rt.world or ck["batch"] != [cfg.batch_size, run.micro]:
            say(
                f"resume: checkpoint of world {ck['world']} batch {ck['batch']}, now world {rt.world} "
                f"batch {[cfg.batch_size, run.micro]}: the data order continues, RNG streams are not exact"
            )
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        run.mixup.load_state_dict(ck["mixup"])
        rngs = ck["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        progress.start_step, progress.losses = ck["step"], list(ck["losses"])
        progress.flood_level = ck.get("flood_level", progress.flood_level)
        progress.resumed_from = progress.saved_step = progress.start_step
        say(f"resumed from {path} at step {progress.start_step}")
    elif cfg.resume:
        say(f"resume: no checkpoint at {path}, starting from step 0")
    return progress


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def save(run: Run, progress: Progress, done_steps: int, flush) -> None:
    """Write the checkpoint after `done_steps` steps (rank 0; every rank's RNG state gathered).
    flush() first lands the pending logged losses in progress.losses. All ranks wait for the write."""
    cfg, rt = run.cfg, run.rt
    rngs = [rng_state()]
    if rt.world > 1:
        rngs = [None] * rt.world
        dist.all_gather_object(rngs, rng_state())
    flush()  # raises NonFiniteTraining on a NaN / inf logged loss
    model = _unwrap(run.model)
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist() if named else []  # one sync
    bad = [n for (n, _), ok in zip(named, finite) if not ok]
    if bad:
        what = f"{len(bad)} weight tensor(s) hold NaN / inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        raise NonFiniteTraining(diverged_message(run, progress, what, done_steps))
    if rt.main:
        atomic_save(
            {
                "format": CKPT_FORMAT,
                "step": done_steps,
                "model": _unwrap(run.model).state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "mixup": run.mixup.state_dict(),
                "rng": rngs,
                "losses": list(progress.losses),
                "flood_level": progress.flood_level,
                "world": rt.world,
                "batch": [cfg.batch_size, run.micro],
                "config": cfg.to_dict(),
                "groups": None if run.groups is None else list(run.groups.class_to_group),
                "data": _data_id(run),
            },
            run.ckpt_path,
        )
    progress.saved_step = done_steps
    rt.barrier()
