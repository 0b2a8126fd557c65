"""The steps every demo experiment shares: the benchmark for the settings, the training recipes
(stage 1: the backbone from scratch; stage 2: flat and grouped heads on the frozen backbone), the
two trained models, the fitted scores' ID subset and the evaluator call."""

from __future__ import annotations

import os
import time

from .settings import DemoSettings, _say, resolve_device

__all__ = [
    "load_data",
    "train_config",
    "train_data",
    "fit_subset",
    "evaluate_model",
    "backbone_config",
    "head_config",
    "train_models",
]


def load_data(s: DemoSettings, classes: int | None = None):
    """The benchmark for these settings (built into the cache when missing)."""
    import mosx.data

    kw = dict(num_scripts=s.scripts) if s.scripts is not None and classes in (None, s.classes) else {}
    if s.font_dir is not None:
        kw["font_dir"] = s.font_dir
    return mosx.data.load_benchmark(
        s.data_root,
        num_classes=classes or s.classes,
        image_size=s.image_size,
        train_per_class=s.train_per_class,
        test_per_class=s.test_per_class,
        ood_per_set=s.ood_per_set,
        seed=s.data_seed,
        progress=s.progress,
        **kw,
    )


def train_config(s: DemoSettings, loss: str, n_train: int, out: str, **over):
    """The demo's recipe: the trainer's cpu-demo preset (small CNN from scratch, SGD, warm-up, step decay,
    mixup) sized to the data; no horizontal flip (a mirrored letter is often another letter)."""
    from mosx.train import make_config

    steps = s.steps(n_train)
    size = s.image_size
    kw = dict(
        model=s.model_name,
        loss=loss,
        steps=steps,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=min(20, max(1, steps // 10)),
        milestones=(int(steps * 0.75), int(steps * 0.9)),
        mixup_alpha=s.mixup,
        resize=size + max(1, size // 8),
        crop=size,
        eval_resize=size,
        flip=False,
        seed=s.seed,
        device=resolve_device(s.device),
        out=out,
        progress=s.progress,
        ckpt_every=0,
        log_every=max(1, min(20, steps)),
        workers=0,
    )
    kw.update(over)
    return make_config("cpu-demo", **kw)


def train_data(bench):
    """The training split as the trainer's in-memory tensors: float images in [0, 1] (the trainer and
    the evaluator both use them as they are), class ids and names."""
    x, y = bench.train.tensors()
    return {"x": x, "y": y, "class_names": bench.class_names}


def fit_subset(bench, per_class: int, seed: int):
    """The first `per_class` training images of each class (a seeded shuffle): the ID data that
    KL matching, Mahalanobis and ReAct fit their statistics on."""
    import numpy as np

    import mosx.data

    labels = bench.train.labels.numpy()
    rng = np.random.default_rng([seed, 0xF17])
    keep = []
    for c in range(bench.num_classes):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:per_class])
    keep = np.sort(np.concatenate(keep))
    return mosx.data.ImageSet(bench.train.images[keep, 0].numpy(), labels[keep], "fit")


def evaluate_model(model, bench, groups, scores, out_dir, s: DemoSettings, fit=None):
    """The evaluator on the benchmark's ID test set and every OOD set (fp32, so CPU and GPU runs and
    reruns agree; the cache goes under out_dir/cache)."""
    from mosx.evaluate import evaluate

    device = resolve_device(s.device)
    return evaluate(
        model,
        bench.test,
        bench.ood,
        groups=groups,
        scores=list(scores),
        fit_data=fit,
        out_dir=out_dir,
        device=device,
        precision="fp32",
        channels_last=False,
        batch_size=256,
        workers=0,
        plots=True,
        progress=s.progress,
        verbose=False,
    )


def _train(cfg, data, groups):
    from mosx.train import train

    t0 = time.perf_counter()
    r = train(cfg, data=data, groups=groups, log=_say)
    return r, time.perf_counter() - t0


def backbone_config(s: DemoSettings, n_train: int, out: str):
    """Stage 1's recipe: the whole network from scratch with a flat softmax and weight decay; a random
    head (a backbone trained from scratch gets no gradient through a zero head at the first step)."""
    return train_config(s, "flat", n_train, out, weight_decay=s.weight_decay, head_init="random")


def head_config(s: DemoSettings, loss: str, n_train: int, out: str, backbone: str):
    """Stage 2's recipe, identical for the flat and the grouped head: the backbone's weights loaded and
    frozen, features cached once, a zero-initialised head trained with SGD, warm-up, step decay, mixup."""
    steps = max(1, round(s.head_epochs * n_train / s.batch_size))
    return train_config(
        s,
        loss,
        n_train,
        out,
        weights=backbone,
        train_blocks=0,
        cache_features=True,
        steps=steps,
        lr=s.head_lr,
        warmup_steps=min(20, max(1, steps // 10)),
        milestones=(int(steps * 0.75), int(steps * 0.9)),
        log_every=max(1, min(50, steps)),
    )


def train_models(s: DemoSettings, bench, out: str, data=None, step_log: bool = False):
    """The two models, as in the MOS paper: one backbone, two heads trained the same way on it.

    Stage 1 trains the small CNN from scratch with a flat softmax (seeded random start, random head),
    as BiT-S was pretrained with a flat softmax on ImageNet-1k, the ID data of the MOS paper. Stage 2
    freezes that backbone and trains a flat head and a group-softmax head with the same recipe (the
    paper's: head only, zero-initialised head, mixup; through the trainer's frozen-backbone feature
    cache).
    Returns ({"flat": model, "grouped": model}, training info, seconds per stage)."""
    data = data if data is not None else train_data(bench)
    n_train = len(bench.train)
    say = _say if step_log else (lambda msg: None)
    info, seconds, models = {}, {}, {}
    tout = os.path.join(out, "train_backbone")
    cfg = backbone_config(s, n_train, tout)
    say(
        f"[2/4] training the backbone: {s.model_name} from scratch, flat softmax, {cfg.steps} steps of "
        f"{cfg.batch_size} ({s.epochs:g} epochs), lr {cfg.lr}, weight decay {cfg.weight_decay:g}, seed {s.seed}, "
        f"{cfg.device}"
    )
    r, sec = _train(cfg, data, None)
    seconds["train_backbone"] = sec
    info["backbone"] = {
        "steps": cfg.steps,
        "final_loss": r.final_loss,
        "seconds": sec,
        "images_per_s": r.images_per_s,
        "model": r.model_path,
    }
    backbone = r.model_path
    head_steps = head_config(s, "flat", n_train, out, backbone).steps
    say(
        f"[3/4] training the flat and the grouped head on the frozen backbone: {head_steps} steps of "
        f"{s.batch_size} ({s.head_epochs:g} epochs), lr {s.head_lr}, zero-initialised heads, same recipe"
    )
    for kind, loss in (("flat", "flat"), ("grouped", "group")):
        cfg = head_config(s, loss, n_train, os.path.join(out, f"train_{kind}"), backbone)
        r, sec = _train(cfg, data, bench.groups if loss == "group" else None)
        seconds[f"train_{kind}_head"] = sec
        models[kind] = r.model.cpu()
        info[kind] = {
            "steps": cfg.steps,
            "final_loss": r.final_loss,
            "seconds": sec,
            "feature_cache_seconds": r.cache_seconds,
            "model": r.model_path,
        }
    return models, info, seconds
