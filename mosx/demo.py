"""`mosx demo`: the built-in offline benchmark, end to end, on a CPU in minutes.

What it does (every step seeded, so a rerun with the same settings gives the same numbers):

1. builds (or reuses) the offline benchmark of :mod:`mosx.data`: letters of many scripts, one class per
   letter, one group per script, train and test drawn from different typeface families; OOD sets from
   held-out scripts to Fashion-MNIST, textures, digits and silhouettes;
2. trains a small CNN from scratch (flat softmax), then, as the MOS paper does on a backbone pretrained
   with a flat softmax on the ID classes (BiT-S on ImageNet-1k), freezes it and trains two heads on it
   with the same recipe (:mod:`mosx.train`): a flat softmax and a group softmax (MOS) over the scripts;
3. scores the ID test set and every OOD set with every method of :mod:`mosx.scores` through the
   evaluator (:func:`mosx.evaluate.evaluate`, one backbone pass per image): the baselines on the flat
   model, MOS on the grouped one, as in the MOS paper;
4. prints the paper-style table (AUROC / FPR95 per OOD set and the average, ID accuracy of both
   models, time per method) and writes it with JSON, CSV and PNG plots to --out.

``--scaling`` repeats steps 1-3 for a growing number of ID classes (FPR95 of MSP, Energy and MOS; the
MOS paper's core claim). ``--unleash`` fine-tunes both models with Unleashing Mask (UM: flooding at an
estimated level b; UMAP: learned weight masks at the same b) and compares the OOD metrics before and
after.

Presets: ``--preset quick`` (the default: 100 classes, a few minutes on a 2-core CPU), ``full`` (larger
model, more data and epochs) and ``tiny`` (seconds; what CI runs). Single settings override a preset.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

__all__ = ["DemoError", "DemoSettings", "PRESETS", "run_demo", "run_scaling", "run_unleash", "main"]

# Flat-model scores (the baselines of the MOS paper and later ones) and their table labels, in the
# order the table shows them; MOS (grouped model) comes last.
FLAT_SCORES = {
    "msp": "MSP",
    "odin:temperature=1000": "ODIN (T=1000)",
    "mahalanobis": "Mahalanobis",
    "energy": "Energy",
    "kl_matching": "KL matching",
    "maxlogit": "MaxLogit",
    "gradnorm": "GradNorm",
    "react-energy": "ReAct + Energy",
}
GROUPED_SCORES = {"mos": "MOS"}
SCALING_SCORES = {"msp": "MSP", "energy": "Energy", "mos": "MOS"}


@dataclass
class DemoSettings:
    # data (mosx.data.BenchmarkConfig)
    classes: int = 100
    scripts: int | None = None          # groups; None: the data builder's default (classes // 5, <= 22)
    image_size: int = 32
    train_per_class: int = 200
    test_per_class: int = 50
    ood_per_set: int = 2000
    fit_per_class: int = 50             # training images per class used to fit KL / Mahalanobis / ReAct
    data_seed: int = 0
    data_root: str | None = None        # default ~/.cache/mosx/data (env MOSX_DATA)
    # model and recipe (mosx.train, preset cpu-demo)
    arch: str = "plain-cnn"             # backbone: plain-cnn or small-cnn (mosx.train.models)
    width: int = 16                     # backbone width (model name f"{arch}-{width}")
    epochs: float = 6.0                 # backbone training (stage 1)
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4          # stage 1 only; the heads follow the paper (no weight decay)
    head_epochs: float = 10.0           # flat / grouped heads on the frozen backbone (stage 2)
    head_lr: float = 0.1
    mixup: float = 0.1                  # the MOS recipe's Beta(0.1, 0.1) mixup
    # Unleashing Mask
    um_keep: float = 0.965              # weights kept by the random mask that estimates b
    umap_keep: float = 0.8              # weights kept by UMAP's learned masks
    um_epochs: float = 0.5
    um_lr: float = 0.01
    # scaling experiment
    scaling_classes: tuple = (20, 50, 100, 200, 400)
    # runtime
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def steps(self, n_train: int) -> int:
        return max(1, round(self.epochs * n_train / self.batch_size))

    @property
    def model_name(self) -> str:
        return f"{self.arch}-{self.width}"


PRESETS = {
    # what the README runs: about two minutes on an idle 2-core CPU, data build included
    # (recipe chosen on ID validation data: docs/demo_results.md, tools/demo_recipe_search.py)
    "quick": {},
    # a stronger model with more data: tens of minutes on a CPU, about a minute on a GPU
    "full": {"width": 32, "train_per_class": 400, "epochs": 8.0, "head_epochs": 20.0,
             "fit_per_class": 100},
    # CI smoke size: a few classes, a few hundred images, one epoch
    "tiny": {"classes": 8, "scripts": 4, "image_size": 16, "train_per_class": 40, "test_per_class": 10,
             "ood_per_set": 40, "fit_per_class": 10, "width": 8, "epochs": 1.0, "head_epochs": 2.0,
             "batch_size": 32, "lr": 0.05,
             "um_epochs": 0.5, "scaling_classes": (8, 12)},
}


def make_settings(preset: str = "quick", **overrides) -> DemoSettings:
    from mosx.train.config import from_preset

    s = from_preset(DemoSettings, PRESETS, preset, overrides, "demo")
    _validate(s)
    return s


def _validate(s: DemoSettings) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"demo setting: {msg}")
    need(s.classes >= 2, f"classes must be >= 2, got {s.classes}")
    need(s.epochs > 0 and s.um_epochs > 0 and s.head_epochs > 0, "epochs, head_epochs and um_epochs must be > 0")
    need(s.batch_size >= 2, f"batch_size must be >= 2, got {s.batch_size}")
    need(s.width >= 1, f"width must be >= 1, got {s.width}")
    need(s.arch in ("plain-cnn", "small-cnn"), f"arch must be plain-cnn or small-cnn, got {s.arch!r}")
    need(s.weight_decay >= 0, f"weight_decay must be >= 0, got {s.weight_decay}")
    need(s.fit_per_class >= 1, f"fit_per_class must be >= 1, got {s.fit_per_class}")
    need(s.classes * s.train_per_class >= s.batch_size,
         f"{s.classes} classes x {s.train_per_class} training images is less than one batch of {s.batch_size}")
    need(all(c >= 2 for c in s.scaling_classes), f"scaling classes must be >= 2, got {s.scaling_classes}")
    need(s.device == "auto" or s.device.split(":")[0] in ("cpu", "cuda"),
         f"device must be auto, cpu or cuda[:N], got {s.device!r}")


class DemoError(RuntimeError):
    """A demo setting or a missing piece that stops the run with a message (no traceback)."""


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    return name


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ pieces
def load_data(s: DemoSettings, classes: int | None = None):
    """The benchmark for these settings (built into the cache when missing)."""
    import mosx.data
    kw = dict(num_scripts=s.scripts) if s.scripts is not None and classes in (None, s.classes) else {}
    return mosx.data.load_benchmark(s.data_root, num_classes=classes or s.classes, image_size=s.image_size,
                                    train_per_class=s.train_per_class, test_per_class=s.test_per_class,
                                    ood_per_set=s.ood_per_set, seed=s.data_seed, progress=s.progress, **kw)


def train_config(s: DemoSettings, loss: str, n_train: int, out: str, **over):
    """The demo's recipe: the trainer's cpu-demo preset (small CNN from scratch, SGD, warm-up, step decay,
    mixup) sized to the data; no horizontal flip (a mirrored letter is often another letter)."""
    from mosx.train import make_config
    steps = s.steps(n_train)
    size = s.image_size
    kw = dict(model=s.model_name, loss=loss, steps=steps, batch_size=s.batch_size, lr=s.lr,
              warmup_steps=min(20, max(1, steps // 10)), milestones=(int(steps * 0.75), int(steps * 0.9)),
              mixup_alpha=s.mixup, resize=size + max(1, size // 8), crop=size, eval_resize=size, flip=False,
              seed=s.seed, device=resolve_device(s.device), out=out, progress=s.progress, ckpt_every=0,
              log_every=max(1, min(20, steps)), workers=0)
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
    return evaluate(model, bench.test, bench.ood, groups=groups, scores=list(scores), fit_data=fit,
                    out_dir=out_dir, device=device, precision="fp32", channels_last=False,
                    batch_size=256, workers=0, plots=True, progress=s.progress, verbose=False)


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
    return train_config(s, loss, n_train, out, weights=backbone, train_blocks=0, cache_features=True, steps=steps,
                        lr=s.head_lr, warmup_steps=min(20, max(1, steps // 10)),
                        milestones=(int(steps * 0.75), int(steps * 0.9)), log_every=max(1, min(50, steps)))


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
    say(f"[2/4] training the backbone: {s.model_name} from scratch, flat softmax, {cfg.steps} steps of "
        f"{cfg.batch_size} ({s.epochs:g} epochs), lr {cfg.lr}, weight decay {cfg.weight_decay:g}, seed {s.seed}, "
        f"{cfg.device}")
    r, sec = _train(cfg, data, None)
    seconds["train_backbone"] = sec
    info["backbone"] = {"steps": cfg.steps, "final_loss": r.final_loss, "seconds": sec,
                        "images_per_s": r.images_per_s, "model": r.model_path}
    backbone = r.model_path
    head_steps = head_config(s, "flat", n_train, out, backbone).steps
    say(f"[3/4] training the flat and the grouped head on the frozen backbone: {head_steps} steps of "
        f"{s.batch_size} ({s.head_epochs:g} epochs), lr {s.head_lr}, zero-initialised heads, same recipe")
    for kind, loss in (("flat", "flat"), ("grouped", "group")):
        cfg = head_config(s, loss, n_train, os.path.join(out, f"train_{kind}"), backbone)
        r, sec = _train(cfg, data, bench.groups if loss == "group" else None)
        seconds[f"train_{kind}_head"] = sec
        models[kind] = r.model.cpu()
        info[kind] = {"steps": cfg.steps, "final_loss": r.final_loss, "seconds": sec,
                      "feature_cache_seconds": r.cache_seconds, "model": r.model_path}
    return models, info, seconds


# ------------------------------------------------------------------------------ the main job
def run_demo(s: DemoSettings, out: str) -> dict:
    """Train flat + grouped, score every OOD set with every method; write and return the results."""
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    stages = {}
    _say(f"[1/4] data: {s.classes} classes, {s.train_per_class} train / {s.test_per_class} test images per class")
    t0 = time.perf_counter()
    bench = load_data(s)
    stages["data"] = time.perf_counter() - t0
    n_train = len(bench.train)
    _say(f"      {bench.num_classes} classes in {len(bench.script_names)} scripts (groups), "
         f"{n_train} train / {len(bench.test)} test images, OOD sets: "
         + ", ".join(f"{k} {len(v)}" for k, v in bench.ood.items()) + f"  ({stages['data']:.1f}s)")
    data = train_data(bench)

    models, train_info, seconds = train_models(s, bench, out, data, step_log=True)
    stages.update(seconds)

    _say("[4/4] scoring: baselines on the flat model, MOS on the grouped model")
    t0 = time.perf_counter()
    fit = fit_subset(bench, s.fit_per_class, s.seed)
    res_flat = evaluate_model(models["flat"], bench, None, FLAT_SCORES, os.path.join(out, "eval_flat"), s, fit=fit)
    res_grp = evaluate_model(models["grouped"], bench, bench.groups, GROUPED_SCORES, os.path.join(out, "eval_grouped"), s)
    stages["evaluate"] = time.perf_counter() - t0

    results = _collect(s, bench, {"flat": res_flat, "grouped": res_grp}, train_info, stages)
    results["seconds"]["total"] = time.perf_counter() - t_start
    _write_demo(results, {"flat": res_flat, "grouped": res_grp}, out)
    return results


def _metric_row(m) -> dict:
    return {"auroc": m.auroc, "fpr95": m.fpr_at_tpr, "aupr_in": m.aupr_in, "aupr_out": m.aupr_out,
            "detection_error": m.detection_error}


def _collect(s, bench, res: dict, train_info: dict, stages: dict) -> dict:
    import torch
    ood_sets = list(bench.ood)
    methods, labels = {}, {}
    for kind, table in (("flat", FLAT_SCORES), ("grouped", GROUPED_SCORES)):
        r = res[kind]
        for spec, label in table.items():
            per = r.metrics[spec]
            a = r.averages[spec]
            methods[label] = {
                "model": kind, "spec": spec,
                "sets": {o: _metric_row(per[o]) for o in ood_sets},
                "average": {"auroc": a["auroc"], "fpr95": a["fpr_at_tpr"], "aupr_in": a["aupr_in"],
                            "aupr_out": a["aupr_out"], "detection_error": a["detection_error"]},
                "score_seconds": r.scorer_seconds.get(spec, 0.0),
            }
            labels[label] = spec
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
        "data": {"folder": bench.path, "key": bench.manifest["key"], "classes": bench.num_classes,
                 "groups": len(bench.script_names), "scripts": bench.script_names, "counts": bench.manifest["counts"]},
        "ood_sets": ood_sets,
        "id_accuracy": {k: r.id_accuracy for k, r in res.items()},
        "backbone_images_per_s": {k: r.images_per_s for k, r in res.items()},
        "methods": methods,
        "training": train_info,
        "seconds": dict(stages),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(),
                        "device": resolve_device(s.device), "threads": torch.get_num_threads()},
        "conventions": "AUROC and FPR95 in %; ID is the positive class; FPR95 = share of OOD images kept at "
                       "the threshold that keeps 95% of ID test images (nearest-TPR rule)",
    }


def format_table(results: dict) -> str:
    """The paper-style table: AUROC / FPR95 (%) per OOD set and the average, time per method."""
    sets = results["ood_sets"]
    head = ["Method", "model", "score s"] + sets + ["Average"]
    rows = []
    for label, m in results["methods"].items():
        cells = [f"{100 * m['sets'][o]['auroc']:.2f} / {100 * m['sets'][o]['fpr95']:.2f}" for o in sets]
        cells.append(f"{100 * m['average']['auroc']:.2f} / {100 * m['average']['fpr95']:.2f}")
        rows.append([label, m["model"], f"{m['score_seconds']:.3f}"] + cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return " | ".join(c.ljust(w) for c, w in zip(r, widths))
    best = min(results["methods"], key=lambda k: results["methods"][k]["average"]["fpr95"])
    acc = results["id_accuracy"]
    ips = results["backbone_images_per_s"]
    d = results["data"]
    out = [f"ID: {d['classes']} letter classes in {d['groups']} scripts (groups); "
           f"{d['counts']['test']} ID test images; AUROC / FPR95 in % (ID positive; higher AUROC and lower FPR95 are better)",
           line(head), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"ID accuracy: flat {100 * acc['flat']:.2f}%, grouped {100 * acc['grouped']:.2f}%")
    out.append("backbone pass: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in ips.items() if v)
               + "; 'score s' = fit + scoring time of the method on the cached logits/features")
    out.append(f"lowest average FPR95: {best}")
    return "\n".join(out)


def _write_demo(results: dict, res: dict, out: str) -> None:
    table = format_table(results)
    results["files"] = {"table": os.path.join(out, "demo_table.txt"), "json": os.path.join(out, "demo_results.json"),
                        "csv": os.path.join(out, "demo_results.csv")}
    with open(results["files"]["table"], "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(results["files"]["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "model", "ood_set", "auroc", "fpr95", "aupr_in", "aupr_out", "detection_error", "score_seconds"])
        for label, m in results["methods"].items():
            for o in results["ood_sets"] + ["average"]:
                v = m["average"] if o == "average" else m["sets"][o]
                w.writerow([label, m["model"], o, v["auroc"], v["fpr95"], v["aupr_in"], v["aupr_out"],
                            v["detection_error"], m["score_seconds"]])
    results["files"]["plots"] = _plots(results, res, out)
    with open(results["files"]["json"], "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    sec = results["seconds"]
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items()))
    print(f"outputs in {out}: demo_table.txt, demo_results.json, demo_results.csv, "
          f"{len(results['files']['plots'])} PNG plots (+ per-model evaluator outputs in eval_flat/, eval_grouped/)")


def _plots(results: dict, res: dict, out: str) -> list:
    """roc_<set>.png: every method's ROC curve on one OOD set; hist_msp_vs_mos.png: the two scores'
    ID and OOD histograms side by side. (The evaluator writes one ROC / histogram per method too.)"""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from mosx import metrics as M

    written = []
    for o in results["ood_sets"]:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for label, m in results["methods"].items():
            sc = res[m["model"]].scores[m["spec"]]
            fpr, tpr, _ = M.roc_curve(sc["id"], sc[o])
            step = max(1, len(fpr) // 3000)
            ax.plot(fpr[::step].numpy(), tpr[::step].numpy(), lw=2.0 if m["spec"] == "mos" else 1.0,
                    label=f"{label} ({100 * m['sets'][o]['auroc']:.1f} / {100 * m['sets'][o]['fpr95']:.1f})")
        ax.axhline(0.95, ls=":", color="grey", lw=0.8)
        ax.set(xlabel="FPR (OOD kept as ID)", ylabel="TPR (ID kept)", title=f"ROC, OOD set: {o}")
        ax.legend(loc="lower right", fontsize=7, title="AUROC / FPR95 %", title_fontsize=7)
        p = os.path.join(out, f"roc_{o}.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(p)
    pair = [("MSP", "flat", "msp"), ("MOS", "grouped", "mos")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (label, kind, spec) in zip(axes, pair):
        sc = res[kind].scores[spec]
        vals = np.concatenate([np.asarray(v, np.float64) for v in sc.values()])
        bins = np.linspace(vals.min(), vals.max(), 60) if vals.max() > vals.min() else 20
        for name, v in sc.items():
            ax.hist(np.asarray(v, np.float64), bins=bins, density=True, histtype="step",
                    lw=2.0 if name == "id" else 1.0, label=name)
        ax.set(xlabel=f"{label} score (higher = more ID)", ylabel="density", title=f"{label} ({kind} model)")
        ax.legend(fontsize=7)
    p = os.path.join(out, "hist_msp_vs_mos.png")
    fig.savefig(p, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(p)
    return written


# ------------------------------------------------------------------------------ scaling
def run_scaling(s: DemoSettings, out: str) -> dict:
    """FPR95 (average over OOD sets) of MSP, Energy (flat model) and MOS (grouped model) as the number
    of ID classes grows; the same recipe, per-class counts and epochs at every size."""
    t_start = time.perf_counter()
    out = os.path.join(out, "scaling")
    os.makedirs(out, exist_ok=True)
    rows = []
    for n, classes in enumerate(s.scaling_classes):
        _say(f"[scaling {n + 1}/{len(s.scaling_classes)}] {classes} classes")
        bench = load_data(s, classes)
        data = train_data(bench)
        row = {"classes": bench.num_classes, "groups": len(bench.script_names)}
        models, _, _ = train_models(s, bench, os.path.join(out, f"c{classes}"), data)
        for kind, scores in (("flat", ("msp", "energy")), ("grouped", ("mos",))):
            ev = evaluate_model(models[kind], bench, bench.groups if kind == "grouped" else None, scores,
                                os.path.join(out, f"c{classes}", f"eval_{kind}"), s)
            row[f"accuracy_{kind}"] = ev.id_accuracy
            for spec in scores:
                label = SCALING_SCORES[spec]
                row[label] = {"fpr95": ev.averages[spec]["fpr_at_tpr"], "auroc": ev.averages[spec]["auroc"],
                              "per_set_fpr95": {o: v.fpr_at_tpr for o, v in ev.metrics[spec].items()}}
        rows.append(row)
    result = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
              "rows": rows, "seconds": time.perf_counter() - t_start}
    table = format_scaling(result)
    csv_rows = [[r["classes"], r["groups"], label, r[label]["fpr95"], r[label]["auroc"],
                 r["accuracy_grouped"] if label == "MOS" else r["accuracy_flat"]]
                for r in rows for label in SCALING_SCORES.values()]
    _write_results(out, "scaling", table, result,
                   ["classes", "groups", "method", "fpr95_average", "auroc_average", "accuracy"], csv_rows)
    _scaling_plot(result, os.path.join(out, "scaling.png"))
    print(table)
    print(f"scaling outputs in {out}: scaling_table.txt, scaling.json, scaling.csv, scaling.png "
          f"({result['seconds']:.0f}s)")
    return result


def _write_results(out: str, stem: str, table: str, result: dict, header: list, csv_rows: list) -> None:
    """<stem>_table.txt, <stem>.json and <stem>.csv in out: the experiment's three output files."""
    with open(os.path.join(out, f"{stem}_table.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(csv_rows)


def format_scaling(result: dict) -> str:
    head = ["classes", "groups"] + [f"{m} FPR95" for m in SCALING_SCORES.values()] + ["acc flat", "acc grouped"]
    rows = [[str(r["classes"]), str(r["groups"])] + [f"{100 * r[m]['fpr95']:.2f}" for m in SCALING_SCORES.values()]
            + [f"{100 * r['accuracy_flat']:.2f}", f"{100 * r['accuracy_grouped']:.2f}"] for r in result["rows"]]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: " | ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join(["FPR95 in % averaged over the OOD sets (lower is better), ID accuracy in %",
                      line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def _scaling_plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["classes"] for r in result["rows"]]
    for label in SCALING_SCORES.values():
        ax.plot(xs, [100 * r[label]["fpr95"] for r in result["rows"]], "o-", lw=2.0 if label == "MOS" else 1.2,
                label=label)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the measured sizes as ticks
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set(xlabel="number of ID classes", ylabel="FPR95 (%), average over OOD sets",
           title="OOD detection as the label space grows")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------ Unleashing Mask
def check_unleash_available() -> None:
    """UM and UMAP need mosx.unleash, whose masks run on the masked_weight op of the compiled library."""
    try:
        import mosx.unleash  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise DemoError("--unleash needs mosx.unleash and the masked_weight op, which this build of "
                           f"mosx._C lacks ({e}); rebuild it: pip install --no-build-isolation -e .") from None


def run_unleash(s: DemoSettings, out: str, base: dict | None = None) -> dict:
    """UM and UMAP fine-tuning of the demo's flat and grouped models; OOD metrics before and after.

    base: the results of run_demo in the same out folder (its trained models are reused); trained here
    when missing. b is estimated per model (mean training loss under a random mask keeping um_keep of
    each layer's weights, eval mode); UM fine-tunes with the flooding loss |L - b| + b, UMAP learns
    masks keeping umap_keep of each layer's weights (weights frozen) with the same b."""
    from mosx.train import load_model
    check_unleash_available()
    t_start = time.perf_counter()
    if base is None:
        base = run_demo(s, out)
    uout = os.path.join(out, "unleash")
    os.makedirs(uout, exist_ok=True)
    bench = load_data(s)
    data = train_data(bench)
    scores = {"flat": {"msp": "MSP", "energy": "Energy", "odin:temperature=1000": "ODIN (T=1000)"},
              "grouped": {"mos": "MOS"}}
    table_rows, info = [], {}
    for kind, loss in (("flat", "flat"), ("grouped", "group")):
        init = base["training"][kind]["model"]
        groups = bench.groups if loss == "group" else None
        n = len(bench.train)
        um_steps = max(1, round(s.um_epochs * n / s.batch_size))
        common = dict(init=init, steps=um_steps, lr=s.um_lr, warmup_steps=0, milestones=())
        variants = {}
        _say(f"[unleash] {kind} model: UM (estimate b with keep {s.um_keep}, {um_steps} steps)")
        cfg = train_config(s, loss, n, os.path.join(uout, f"um_{kind}"), um_estimate=s.um_keep, **common)
        r_um, _ = _train(cfg, data, groups)
        b = r_um.flood_level
        variants["UM"] = r_um.model.cpu()
        _say(f"[unleash] {kind} model: UMAP (masks keeping {s.umap_keep}, b = {b:.4f}, {um_steps} steps)")
        cfg = train_config(s, loss, n, os.path.join(uout, f"umap_{kind}"), um_flood_level=b,
                           umap_keep=s.umap_keep, **common)
        r_umap, _ = _train(cfg, data, groups)
        variants["UMAP"] = r_umap.model.cpu()
        before, _ = load_model(init)
        evals = {"before": evaluate_model(before, bench, groups, scores[kind], os.path.join(out, f"eval_{kind}"), s)}
        for v, model in variants.items():
            evals[v] = evaluate_model(model, bench, groups, scores[kind], os.path.join(uout, f"eval_{v.lower()}_{kind}"), s)
        info[kind] = {"flood_level": b, "steps": um_steps,
                      "id_accuracy": {k: e.id_accuracy for k, e in evals.items()}}
        for spec, label in scores[kind].items():
            for stage, e in evals.items():
                a = e.averages[spec]
                table_rows.append({"method": label, "model": kind, "stage": stage, "auroc": a["auroc"],
                                   "fpr95": a["fpr_at_tpr"], "accuracy": e.id_accuracy,
                                   "sets": {o: {"auroc": m.auroc, "fpr95": m.fpr_at_tpr} for o, m in e.metrics[spec].items()}})
    result = {"models": info, "rows": table_rows, "seconds": time.perf_counter() - t_start,
              "settings": {"um_keep": s.um_keep, "umap_keep": s.umap_keep, "um_epochs": s.um_epochs, "um_lr": s.um_lr}}
    table = format_unleash(result)
    _write_results(uout, "unleash", table, result,
                   ["method", "model", "stage", "auroc_average", "fpr95_average", "id_accuracy"],
                   [[r["method"], r["model"], r["stage"], r["auroc"], r["fpr95"], r["accuracy"]]
                    for r in table_rows])
    print(table)
    print(f"unleash outputs in {uout} ({result['seconds']:.0f}s)")
    return result


def format_unleash(result: dict) -> str:
    head = ["Method", "model", "stage", "AUROC avg", "FPR95 avg", "ID acc"]
    rows = [[r["method"], r["model"], r["stage"], f"{100 * r['auroc']:.2f}", f"{100 * r['fpr95']:.2f}",
             f"{100 * r['accuracy']:.2f}"] for r in result["rows"]]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    bs = ", ".join(f"{k} b = {v['flood_level']:.4f}" for k, v in result["models"].items())
    return "\n".join([f"Unleashing Mask: before vs UM vs UMAP, averages over the OOD sets in % ({bs})",
                      line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosx demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Outputs: demo_table.txt, demo_results.json/.csv, roc_<set>.png, "
                                       "hist_msp_vs_mos.png, eval_flat/ and eval_grouped/ (the evaluator's "
                                       "own tables and per-method plots), scaling/, unleash/.")
    p.add_argument("--out", default="mosx-out", help="output folder (default ./mosx-out)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes (default quick)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the quick preset (the default): a few minutes on a 2-core CPU")
    p.add_argument("--full", dest="preset", action="store_const", const="full", help="the full preset")
    p.add_argument("--classes", type=int, help="number of ID classes (letters)")
    p.add_argument("--scripts", type=int, help="number of groups (scripts); default classes // 5, at most 22")
    p.add_argument("--image-size", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--ood-per-set", type=int)
    p.add_argument("--fit-per-class", type=int, help="training images per class that fitted scores use")
    p.add_argument("--arch", choices=("plain-cnn", "small-cnn"), help="backbone (default plain-cnn)")
    p.add_argument("--width", type=int, help="backbone width")
    p.add_argument("--epochs", type=float, help="epochs of the backbone's training (stage 1)")
    p.add_argument("--head-epochs", type=float, help="epochs of the flat / grouped heads' training (stage 2)")
    p.add_argument("--head-lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, help="weight decay of the backbone's training (stage 1)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--data-seed", type=int, help="seed of the data build (default 0)")
    p.add_argument("--data-root", help="benchmark cache (default ~/.cache/mosx/data; env MOSX_DATA)")
    p.add_argument("--device", help="auto (GPU when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--scaling", action="store_true",
                   help="FPR95 of MSP, Energy and MOS as the number of ID classes grows (instead of the main table)")
    p.add_argument("--scaling-classes", help="comma-separated class counts (default 20,50,100,200,400)")
    p.add_argument("--unleash", action="store_true",
                   help="after the main table: Unleashing Mask (UM, UMAP) fine-tuning, before/after table")
    p.add_argument("--reuse", action="store_true",
                   help="with --unleash: reuse the models of an earlier run in --out with the same settings")
    p.add_argument("--um-epochs", type=float)
    p.add_argument("--um-lr", type=float)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_from_args(a) -> DemoSettings:
    over = {k: getattr(a, k) for k in ("classes", "scripts", "image_size", "train_per_class", "test_per_class",
                                        "ood_per_set", "fit_per_class", "arch", "width", "weight_decay", "epochs",
                                        "head_epochs", "head_lr", "batch_size", "lr", "seed", "data_seed",
                                        "data_root", "device", "um_epochs", "um_lr")
            if getattr(a, k) is not None}
    if a.scaling_classes:
        over["scaling_classes"] = tuple(int(v) for v in a.scaling_classes.split(",") if v.strip())
    if a.no_progress:
        over["progress"] = False
    return make_settings(a.preset, **over)


def _previous_run(s: DemoSettings, out: str) -> dict | None:
    """demo_results.json of an earlier run in `out` made with the same settings (None if there is none)."""
    path = os.path.join(out, "demo_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        prev = json.load(f)
    now = json.loads(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}))
    # how a run shows progress, where it ran, and the settings of the later experiments (Unleashing Mask,
    # scaling) do not change the main run's models
    keep = ("progress", "device", "um_keep", "umap_keep", "um_epochs", "um_lr", "scaling_classes")
    if {k: v for k, v in prev.get("settings", {}).items() if k not in keep} != {k: v for k, v in now.items() if k not in keep}:
        _say(f"--reuse: {path} was made with other settings; running the demo again")
        return None
    if not all(os.path.exists(prev["training"][k]["model"]) for k in ("flat", "grouped")):
        return None
    _say(f"--reuse: models of {path}")
    return prev


def main(argv=None) -> int:
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from mosx.data import MissingDataError
    try:
        s = settings_from_args(a)
        resolve_device(s.device)
    except ValueError as e:
        print(f"mosx demo: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if a.unleash and not a.scaling:
            check_unleash_available()  # before the main run, not after it
        if a.scaling:
            run_scaling(s, a.out)
        else:
            base = _previous_run(s, a.out) if a.reuse else None
            if base is None:
                base = run_demo(s, a.out)
            if a.unleash:
                run_unleash(s, a.out, base)
    except (MissingDataError, DemoError) as e:
        print(f"mosx demo: {e}", file=sys.stderr)
        return 2
    print(f"mosx demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
