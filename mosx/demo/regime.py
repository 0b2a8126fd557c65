"""Unleashing Mask in its own regime (`mosx demo --um-regime`).

UM's premise (Zhu et al., ICML 2023): a model trained until it memorises its atypical training
samples detects OOD worse than it did at an intermediate epoch; fine-tuning the final model under a
loss floor b makes it forget them. The quick demo's backbone never reaches that regime (6 epochs with
mixup and weight decay end near loss 0.24), so this experiment builds it and then tests UM there:

1. a small training set (`regime_train_per_class` images per class of the benchmark's training
   split) and a disjoint ID validation set (the next `regime_val_per_class` of each class);
2. a flat and a grouped (MOS) network trained from scratch for `regime_epochs` epochs with no mixup
   and no random crops, until the training loss is near zero; after every epoch the training loss,
   ID validation accuracy and the OOD metrics of MSP, Energy (flat) and MOS (grouped) on the
   validation OOD set (`regime_val_ood`, one of the benchmark's OOD sets, never used for testing)
   and on the test OOD sets (the others; recorded for the report, never used to choose anything);
3. UM (flooding at b, b estimated as released: mean training loss under a random mask keeping a
   fraction `keep` of each layer's weights) and UMAP (learned masks keeping `umap_keep` of each
   layer, weights frozen, the same b) fine-tuning the final model, over a grid of keep x learning
   rate, evaluated after every fine-tuning epoch;
4. the grid point (keep, lr, epoch) chosen on validation data only: the highest validation-OOD
   AUROC of the model's own score (Energy for the flat model, as the UM paper reports; MOS for the
   grouped one) among the points whose ID validation accuracy is at most `regime_max_acc_drop` below
   the final model's. The released UM code picks checkpoints on its test OOD loader; mosx does not,
   because a number chosen on the test set is not a test result.

Outputs in <out>/um_regime/: um_regime_table.txt / .json / .csv and um_regime_curves.png (per-epoch
curves, mean +/- std over seeds)."""

from __future__ import annotations

import os
import time

from .experiments import check_unleash_available
from .pipeline import load_data, train_config
from .seeds import _table, cell, seed_settings, summarize_values
from .settings import DemoError, DemoSettings, _say, same_settings, settings_record

__all__ = ["run_regime", "split_train_val", "select", "format_regime"]

SCORES = {"flat": {"msp": "MSP", "energy": "Energy"}, "grouped": {"mos": "MOS"}}
PRIMARY = {"flat": "energy", "grouped": "mos"}  # the score each model's grid point is chosen by


def split_train_val(bench, per_class: int, val_per_class: int, seed: int):
    """(train, val) ImageSets: per class, a seeded shuffle of the benchmark's training images; the
    first per_class train, the next val_per_class validate (disjoint by construction)."""
    import numpy as np

    import mosx.data

    labels = bench.train.labels.numpy()
    rng = np.random.default_rng([seed, 0x0E6])
    tr, va = [], []
    for c in range(bench.num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < per_class + val_per_class:
            raise DemoError(
                f"--um-regime: class {c} has {len(idx)} training images, fewer than "
                f"{per_class} + {val_per_class} (train + validation per class)"
            )
        tr.append(idx[:per_class])
        va.append(idx[per_class : per_class + val_per_class])
    tr, va = np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))
    imgs = bench.train.images[:, 0].numpy()
    return mosx.data.ImageSet(imgs[tr], labels[tr], "regime_train"), mosx.data.ImageSet(imgs[va], labels[va], "val")


class _Scorer:
    """Logits of fixed image sets through a model in eval mode, and their OOD metrics."""

    def __init__(self, kind: str, groups, id_val, ood_val, id_test, ood_test, batch: int = 1024):
        self.kind, self.groups, self.batch = kind, groups, batch
        self.id_val, self.ood_val, self.id_test, self.ood_test = id_val, ood_val, id_test, ood_test

    def _logits(self, model, images):
        import torch

        dev = next(model.parameters()).device
        out = [
            model(images[i : i + self.batch].to(dev, torch.float32).div_(255.0)).float().cpu()
            for i in range(0, len(images), self.batch)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    def _scores(self, logits):
        from mosx.scores import build_scorer

        return {
            spec: build_scorer(spec, groups=self.groups).score(logits=logits).double() for spec in SCORES[self.kind]
        }

    def _accuracy(self, logits, labels) -> float:
        from mosx import group_predict

        pred = group_predict(logits, self.groups)[0] if self.kind == "grouped" else logits.argmax(1)
        return float((pred == labels).double().mean())

    def __call__(self, model, test: bool = True) -> dict:
        """The record of one model: validation accuracy and validation-OOD metrics; with test, the
        test accuracy and test-OOD metrics too (for the report; selection never reads them)."""
        import torch

        from mosx.metrics import ood_metrics

        with torch.no_grad():
            zv = self._logits(model, self.id_val.images)
            sv, so = self._scores(zv), self._scores(self._logits(model, self.ood_val.images))
            if test:
                zt = self._logits(model, self.id_test.images)
                st = self._scores(zt)
                tests = {k: self._scores(self._logits(model, v.images)) for k, v in self.ood_test.items()}
        rec = {"val_accuracy": self._accuracy(zv, self.id_val.labels)}
        if test:
            rec["test_accuracy"] = self._accuracy(zt, self.id_test.labels)
        for spec in SCORES[self.kind]:
            m = ood_metrics(sv[spec], so[spec])
            rec[spec] = {"val": {"auroc": m.auroc, "fpr95": m.fpr_at_tpr}}
            if test:
                per = {k: ood_metrics(st[spec], t[spec]) for k, t in tests.items()}
                rec[spec]["test"] = {
                    "auroc": sum(p.auroc for p in per.values()) / len(per),
                    "fpr95": sum(p.fpr_at_tpr for p in per.values()) / len(per),
                    "sets": {k: {"auroc": p.auroc, "fpr95": p.fpr_at_tpr} for k, p in per.items()},
                }
        return rec


def _epoch_steps(n_train: int, batch: int) -> int:
    return max(1, round(n_train / batch))


def _train_curve(s, kind, data, groups, scorer, steps, out, test=True, **over):
    """One training run with the scorer called after every epoch: (TrainResult, [epoch records],
    [a copy of the model after each epoch] (when not test: the selected one is tested afterwards))."""
    import copy

    n = len(data["y"])
    per_epoch = _epoch_steps(n, s.batch_size)
    records, states = [], []

    def hook(step, model):
        rec = scorer(model, test=test)
        rec["epoch"] = step / per_epoch
        records.append(rec)
        if not test:
            states.append(copy.deepcopy(model))  # a UMAP model folds its masks at the end: keep a copy

    kw = dict(
        steps=steps,
        mixup_alpha=0.0,
        resize=s.image_size,
        crop=s.image_size,
        log_every=per_epoch,
        progress=False,
    )
    kw.update(over)
    cfg = train_config(s, "flat" if kind == "flat" else "group", n, out, **kw)
    from mosx.train import train

    r = train(cfg, data=data, groups=groups, log=lambda msg: None, every=(per_epoch, hook))
    losses = dict(r.losses)
    for rec in records:
        rec["train_loss"] = losses.get(round(rec["epoch"] * per_epoch))
    return r, records, states


def select(candidates: list[dict], kind: str, min_val_accuracy: float) -> dict | None:
    """The candidate with the highest validation-OOD AUROC of the model's primary score among those
    with val_accuracy >= min_val_accuracy (ties: the earliest); None when none qualifies. Reads only
    validation fields."""
    spec = PRIMARY[kind]
    ok = [c for c in candidates if c["record"]["val_accuracy"] >= min_val_accuracy]
    if not ok:
        return None
    return max(ok, key=lambda c: c["record"][spec]["val"]["auroc"])


def _one_seed(s: DemoSettings, out: str) -> dict:
    bench = load_data(s)
    if s.regime_val_ood not in bench.ood:
        raise DemoError(f"--um-regime: validation OOD set {s.regime_val_ood!r} is not built; have {list(bench.ood)}")
    train_set, val_set = split_train_val(bench, s.regime_train_per_class, s.regime_val_per_class, s.seed)
    ood_test = {k: v for k, v in bench.ood.items() if k != s.regime_val_ood}
    x, y = train_set.tensors()
    data = {"x": x, "y": y, "class_names": bench.class_names}
    n = len(y)
    per_epoch = _epoch_steps(n, s.batch_size)
    steps = max(1, round(s.regime_epochs * per_epoch))
    result = {"models": {}, "ood_val": s.regime_val_ood, "ood_test": list(ood_test), "n_train": n}
    for kind in ("flat", "grouped"):
        groups = bench.groups if kind == "grouped" else None
        scorer = _Scorer(kind, groups, val_set, bench.ood[s.regime_val_ood], bench.test, ood_test)
        folder = os.path.join(out, f"train_{kind}")
        _say(
            f"[um-regime] {kind} model from scratch: {steps} steps ({s.regime_epochs:g} epochs of {n} images), "
            f"no mixup, no crops, lr {s.regime_lr}, weight decay {s.regime_weight_decay:g}"
        )
        t0 = time.perf_counter()
        r, curve, _ = _train_curve(
            s,
            kind,
            data,
            groups,
            scorer,
            steps,
            folder,
            lr=s.regime_lr,
            weight_decay=s.regime_weight_decay,
            head_init="random",
            warmup_steps=min(per_epoch, max(1, steps // 20)),
            milestones=(int(steps * 0.5), int(steps * 0.75)),
        )
        final = curve[-1]
        _say(
            f"[um-regime] {kind}: final training loss {final['train_loss']:.4f}, ID val accuracy "
            f"{100 * final['val_accuracy']:.2f}% ({time.perf_counter() - t0:.0f}s)"
        )
        min_acc = final["val_accuracy"] - s.regime_max_acc_drop
        # the observation: the best epoch by validation (same rule as the fine-tuning grid) vs the last
        best_epoch = select([{"record": c} for c in curve], kind, min_acc)
        grid = {}
        for method in ("UM", "UMAP"):
            cands, models = [], []
            for keep in s.regime_um_keeps:
                for lr in s.regime_um_lrs:
                    ft_steps = max(1, round(s.regime_um_epochs * per_epoch))
                    over = dict(
                        init=r.model_path,
                        lr=lr,
                        weight_decay=s.regime_weight_decay,
                        warmup_steps=0,
                        milestones=(),
                        um_estimate=keep,
                    )
                    if method == "UMAP":
                        over["umap_keep"] = s.umap_keep
                    sub = os.path.join(out, f"{method.lower()}_{kind}_keep{keep:g}_lr{lr:g}")
                    rr, c, states = _train_curve(s, kind, data, groups, scorer, ft_steps, sub, test=False, **over)
                    cands += [
                        {"keep": keep, "lr": lr, "epoch": rec["epoch"], "flood_level": rr.flood_level, "record": rec}
                        for rec in c
                    ]
                    models += states
                    _say(
                        f"[um-regime] {kind} {method} keep {keep:g} lr {lr:g}: b = {rr.flood_level:.4f}, val "
                        f"{PRIMARY[kind]} AUROC {100 * c[-1][PRIMARY[kind]]['val']['auroc']:.2f} after "
                        f"{s.regime_um_epochs:g} epochs"
                    )
            chosen = select(cands, kind, min_acc)
            if chosen is not None:  # only the chosen point sees the test sets
                model = models[next(i for i, c in enumerate(cands) if c is chosen)]
                model.eval()
                chosen["selected_on"] = chosen["record"]  # what the choice read (validation only)
                chosen["record"] = scorer(model, test=True)
                chosen["record"]["epoch"] = chosen["epoch"]
            grid[method] = {"candidates": cands, "selected": chosen}
        result["models"][kind] = {"curve": curve, "best_epoch": best_epoch, "final": final, "grid": grid}
    return result


def _seed_result(s: DemoSettings, folder: str, reuse: bool) -> dict:
    """One seed's result: read back from folder/um_regime_seed.json when reuse finds it made with
    the same settings, else computed and written there (atomically) before the next seed starts."""
    import json

    from .._io import atomic_write_text

    path = os.path.join(folder, "um_regime_seed.json")
    if reuse and os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        if same_settings(prev["settings"], s):
            _say(f"--reuse: {path}")
            return prev["result"]
    result = _one_seed(s, folder)
    atomic_write_text(json.dumps({"settings": settings_record(s), "result": result}), path)
    return result


def run_regime(s: DemoSettings, out: str, seeds: int = 1, reuse: bool = False) -> dict:
    """The experiment for `seeds` seeds (seed i in <out>/um_regime/seed_<i>/), its summary table,
    JSON, CSV and the per-epoch curves plot. reuse: read back the seeds a previous run finished."""
    from .report import _write_results

    check_unleash_available()
    t_start = time.perf_counter()
    rout = os.path.join(out, "um_regime")
    os.makedirs(rout, exist_ok=True)
    runs = []
    for i in range(seeds):
        si = seed_settings(s, i)
        _say(f"===== um-regime seed {i + 1}/{seeds}: seed {si.seed}, data seed {si.data_seed}")
        runs.append(_seed_result(si, os.path.join(rout, f"seed_{i}"), reuse))
    summary = summarize_regime(runs)
    summary["settings"] = settings_record(s)
    summary["seconds"] = time.perf_counter() - t_start
    summary["runs"] = runs
    table = format_regime(summary)
    _write_results(
        rout,
        "um_regime",
        table,
        summary,
        ["score", "model", "stage", "metric", "mean", "std", "values"],
        [
            [
                r["score"],
                r["model"],
                r["stage"],
                k,
                r[k]["mean"],
                r[k]["std"],
                " ".join(f"{v:.6f}" for v in r[k]["values"]),
            ]
            for r in summary["rows"]
            for k in ("test_auroc", "test_fpr95", "val_auroc", "test_accuracy")
        ],
    )
    curves_plot(runs, os.path.join(rout, "um_regime_curves.png"))
    print(table)
    print(
        f"um-regime outputs in {rout}: um_regime_table.txt, .json, .csv, um_regime_curves.png "
        f"({summary['seconds']:.0f}s)"
    )
    return summary


def _stage_records(m: dict) -> dict:
    """{stage: the record of the model at that stage} ('final', 'best epoch', 'UM', 'UMAP'); a stage
    whose selection found no qualifying point is left out."""
    out = {"final": m["final"]}
    if m["best_epoch"] is not None:
        out["best val epoch"] = m["best_epoch"]["record"]
    for method in ("UM", "UMAP"):
        sel = m["grid"][method]["selected"]
        if sel is not None:
            out[method] = sel["record"]
    return out


def _val_prefers(m: dict, kind: str, method: str) -> bool:
    """Whether the chosen fine-tuned point beats the final model on validation-OOD AUROC."""
    sel = m["grid"][method]["selected"]
    spec = PRIMARY[kind]
    return sel is not None and sel["record"][spec]["val"]["auroc"] > m["final"][spec]["val"]["auroc"]


def summarize_regime(runs: list[dict]) -> dict:
    rows = []
    for kind, scores in SCORES.items():
        stages = list(_stage_records(runs[0]["models"][kind]))
        for spec, label in scores.items():
            for stage in stages:
                recs = [_stage_records(r["models"][kind]).get(stage) for r in runs]
                recs = [x for x in recs if x is not None]
                row = {"score": label, "model": kind, "stage": stage, "seeds": len(recs)}
                row["test_auroc"] = summarize_values([x[spec]["test"]["auroc"] for x in recs])
                row["test_fpr95"] = summarize_values([x[spec]["test"]["fpr95"] for x in recs])
                row["val_auroc"] = summarize_values([x[spec]["val"]["auroc"] for x in recs])
                row["test_accuracy"] = summarize_values([x["test_accuracy"] for x in recs])
                rows.append(row)
    chosen = {
        kind: {
            "best_epoch": [
                None if r["models"][kind]["best_epoch"] is None else r["models"][kind]["best_epoch"]["record"]["epoch"]
                for r in runs
            ],
            **{
                method: [
                    None
                    if (sel := r["models"][kind]["grid"][method]["selected"]) is None
                    else {k: sel[k] for k in ("keep", "lr", "epoch", "flood_level")}
                    for r in runs
                ]
                for method in ("UM", "UMAP")
            },
            "final_train_loss": summarize_values([r["models"][kind]["final"]["train_loss"] for r in runs]),
            "epochs": runs[0]["models"][kind]["final"]["epoch"],
            "val_prefers": {
                method: sum(_val_prefers(r["models"][kind], kind, method) for r in runs) for method in ("UM", "UMAP")
            },
        }
        for kind in SCORES
    }
    return {
        "seeds": len(runs),
        "ood_val": runs[0]["ood_val"],
        "ood_test": runs[0]["ood_test"],
        "rows": rows,
        "chosen": chosen,
    }


def format_regime(summary: dict) -> str:
    head = ["score", "model", "stage", "seeds", "test AUROC", "test FPR95", "val AUROC", "test ID acc"]
    rows = [
        [
            r["score"],
            r["model"],
            r["stage"],
            str(r["seeds"]),
            cell(r["test_auroc"]),
            cell(r["test_fpr95"]),
            cell(r["val_auroc"]),
            cell(r["test_accuracy"]),
        ]
        for r in summary["rows"]
    ]
    lines = [
        f"Unleashing Mask in its regime over {summary['seeds']} seeds: mean ± std in %; test = average over "
        f"{', '.join(summary['ood_test'])}; val = OOD validation set {summary['ood_val']} (the only OOD data "
        "anything is chosen on)"
    ] + _table(head, rows)
    for kind, c in summary["chosen"].items():
        lines.append(
            f"{kind}: final training loss {cell(c['final_train_loss'], 1.0, 4)}; best validation epoch per seed "
            + ", ".join("none" if e is None else f"{e:g}" for e in c["best_epoch"])
            + f" of {c['epochs']:g}"
        )
        for method in ("UM", "UMAP"):
            lines.append(f"  {method} chosen per seed: " + "; ".join(_chosen(x) for x in c[method]))
        lines.append(
            "  validation prefers the fine-tuned model to the final one in: "
            + ", ".join(f"{method} {c['val_prefers'][method]}/{summary['seeds']}" for method in ("UM", "UMAP"))
        )
    lines.append(
        f"chosen = highest validation AUROC of {PRIMARY['flat']} (flat) / {PRIMARY['grouped']} (grouped) with ID "
        "validation accuracy at most the allowed drop below the final model's; none = no grid point qualified"
    )
    return "\n".join(lines)


def _chosen(x) -> str:
    return "none" if x is None else f"keep {x['keep']:g} lr {x['lr']:g} epoch {x['epoch']:g} (b {x['flood_level']:.4f})"


def curves_plot(runs: list[dict], path: str) -> None:
    """Per epoch (mean +/- std over seeds): training loss, ID validation accuracy, validation-OOD and
    test-OOD AUROC of each score."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))

    def band(ax, kind, get, label):
        vals = np.array([[get(rec) for rec in r["models"][kind]["curve"]] for r in runs], dtype=float)
        xs = [rec["epoch"] for rec in runs[0]["models"][kind]["curve"]]
        mean, std = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(vals.shape[1])
        (ln,) = ax.plot(xs, mean, lw=1.5, label=label)
        ax.fill_between(xs, mean - std, mean + std, color=ln.get_color(), alpha=0.2, lw=0)

    for kind in SCORES:
        band(axes[0], kind, lambda rec: rec["train_loss"] if rec["train_loss"] is not None else np.nan, kind)
        band(axes[1], kind, lambda rec: 100 * rec["val_accuracy"], kind)
        for spec, label in SCORES[kind].items():
            band(axes[2], kind, lambda rec, sp=spec: 100 * rec[sp]["val"]["auroc"], label)
            band(axes[3], kind, lambda rec, sp=spec: 100 * rec[sp]["test"]["auroc"], label)
    axes[0].set_yscale("log")
    for ax, t in zip(
        axes,
        ("training loss", "ID validation accuracy (%)", "validation-OOD AUROC (%)", "test-OOD AUROC (%, report only)"),
    ):
        ax.set(xlabel="epoch", title=t)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
