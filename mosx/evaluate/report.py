"""The evaluator's report: the result object (metrics, averages, accuracy, timings) and what is
written from it: the paper-style table, results.json, results.csv and the ROC / histogram plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import metrics as M
from .._io import temp_path
from .cache import safe_name
from .html_report import write_html

__all__ = ["EvalResult", "combine", "write_outputs", "plots_of"]


@dataclass
class EvalResult:
    """`metrics[method][ood_set]` -> OODMetrics; `averages[method]` -> mean AUROC / FPR over sets."""

    metrics: dict
    averages: dict
    id_accuracy: float | None  # a dict {model label: accuracy} for combined results
    grouped: bool  # (dict {label: grouped} when combined)
    images_per_s: float | None  # (dict when combined)
    scorer_seconds: dict
    unreadable: dict  # set name -> [paths]
    counts: dict  # set name -> images scored
    scores: dict = field(default_factory=dict)  # method -> {set: np.ndarray}
    files: dict = field(default_factory=dict)  # what was written where
    # the validation search: method -> SearchResult.as_dict() (+ "seconds"), None: nothing to search
    search: dict = field(default_factory=dict)

    def summary(self, tpr_level: float = 0.95) -> str:
        """The table plus accuracy, throughput, scorer times and skipped images."""
        out = [self.table(tpr_level)]
        out += self.search_lines()
        accs = (
            self.id_accuracy
            if isinstance(self.id_accuracy, dict)
            else {("grouped" if self.grouped else "flat"): self.id_accuracy}
        )
        for k, a in accs.items():
            if a is not None:
                out.append(f"ID accuracy ({k}): {100 * a:.2f}%")
        ips = self.images_per_s if isinstance(self.images_per_s, dict) else {"": self.images_per_s}
        for k, v in ips.items():
            if v:
                out.append(f"backbone{' (' + k + ')' if k else ''}: {v:.1f} images/s")
        out.append("scorer time: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.scorer_seconds.items()))
        skipped = sum(len(v) for v in self.unreadable.values())
        if skipped:
            out.append(
                f"{skipped} unreadable image(s) skipped: "
                + ", ".join(f"{k} {len(v)}" for k, v in self.unreadable.items() if v)
            )
        return "\n".join(out)

    def search_lines(self) -> list:
        """One line per method of the validation search: what it chose and its validation metric."""
        out = []
        for m, rec in self.search.items():
            if rec is None:
                out.append(f"{m}: no hyperparameters to search, scored as given")
                continue
            chosen = ", ".join(f"{k}={v}" for k, v in rec["params"].items())
            n_skip = sum("skipped" in g for g in rec["grid"])
            skipped = f", {n_skip} skipped: the fit data cannot support them" if n_skip else ""
            out.append(
                f"{m}: chose {chosen} on validation {rec['metric']} {100 * rec['value']:.2f}% "
                f"({len(rec['grid'])} points{skipped}, validation sets {', '.join(rec['val_sets'])})"
            )
        return out

    def table(self, tpr_level: float = 0.95) -> str:
        sets = list(next(iter(self.metrics.values()))) if self.metrics else []
        fpr_name = f"FPR{round(tpr_level * 100):d}"
        head = ["Method"] + sets + ["Average"]
        rows = []
        for method, per in self.metrics.items():
            cells = [f"{100 * per[s].auroc:6.2f} / {100 * per[s].fpr_at_tpr:6.2f}" for s in sets]
            a = self.averages[method]
            cells.append(f"{100 * a['auroc']:6.2f} / {100 * a['fpr_at_tpr']:6.2f}")
            rows.append([method] + cells)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
        out = [f"AUROC / {fpr_name} in % (ID positive)", line(head), "-+-".join("-" * w for w in widths)]
        out += [line(r) for r in rows]
        return "\n".join(out)


def combine(results: Mapping[str, EvalResult]) -> EvalResult:
    """One result from several models' results on the same sets (e.g. {"grouped": .., "flat": ..}):
    methods side by side (a method name present twice gets " (label)" appended); accuracy, images/s,
    grouped flag as {label: value}."""
    names = [m for r in results.values() for m in r.metrics]
    metrics, averages, scores, timings, search = {}, {}, {}, {}, {}
    for label, r in results.items():
        for m in r.metrics:
            key = f"{m} ({label})" if names.count(m) > 1 else m
            metrics[key], averages[key] = r.metrics[m], r.averages[m]
            if m in r.scores:
                scores[key] = r.scores[m]
            if m in r.scorer_seconds:
                timings[key] = r.scorer_seconds[m]
            if m in r.search:
                search[key] = r.search[m]
    first = next(iter(results.values()))
    return EvalResult(
        metrics,
        averages,
        {k: r.id_accuracy for k, r in results.items()},
        {k: r.grouped for k, r in results.items()},
        {k: r.images_per_s for k, r in results.items()},
        timings,
        first.unreadable,
        first.counts,
        scores=scores,
        search=search,
    )


def write_outputs(
    res: EvalResult, out_dir: str, tpr: float, conventions: dict, plots: bool, settings: dict | None = None
) -> dict:
    """table.txt, results.json, results.csv, the plots (when on) and report.html in out_dir."""
    files = {}
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(res.table(tpr) + "\n")
    files["table"] = os.path.join(out_dir, "table.txt")
    doc = {
        "conventions": {**conventions, "tpr_level": tpr, "id_is_positive": conventions["positive"] == "id"},
        "metrics": {m: {o: v.as_dict() for o, v in per.items()} for m, per in res.metrics.items()},
        "average": res.averages,
        "id_accuracy": res.id_accuracy,
        "grouped_model": res.grouped,
        "images_per_s": res.images_per_s,
        "scorer_seconds": res.scorer_seconds,
        "images_scored": res.counts,
        "unreadable": res.unreadable,
        # the validation search (empty without one): per method what it chose, the grid, the sets
        "search": res.search,
        # per method: the threshold keeping `tpr` of the ID samples (keep as ID when score >= it),
        # under the FPR metric's own rule; and one compressed file of per-sample scores per set
        "thresholds": _thresholds(res, tpr, conventions.get("fpr_rule", "nearest")),
        "score_files": _write_scores(res, out_dir),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    files["json"] = os.path.join(out_dir, "results.json")
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["method", "ood_set", "auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "detection_error", "num_id", "num_ood"]
        )
        for m, per in res.metrics.items():
            for o, v in per.items():
                w.writerow([m, o, v.auroc, v.aupr_in, v.aupr_out, v.fpr_at_tpr, v.detection_error, v.num_id, v.num_ood])
            a = res.averages[m]
            w.writerow(
                [m, "average", a["auroc"], a["aupr_in"], a["aupr_out"], a["fpr_at_tpr"], a["detection_error"], "", ""]
            )
    files["csv"] = os.path.join(out_dir, "results.csv")
    if plots:
        files["plots"] = plots_of(res, out_dir)
    files["html"] = write_html(
        res, os.path.join(out_dir, "report.html"), tpr, {**(settings or {}), **conventions}, files.get("plots")
    )
    return files


def _thresholds(res: EvalResult, tpr: float, fpr_rule: str) -> dict:
    out = {}
    for m, per in res.scores.items():
        ids = per.get("id")
        out[m] = float(M.threshold_at_tpr(ids, tpr, fpr_rule=fpr_rule)) if ids is not None and len(ids) else None
    return out


def _write_scores(res: EvalResult, out_dir: str) -> dict:
    """scores/<set>.npz: one array per method (keys: the methods' file-safe names, listed here)."""
    if not res.scores:
        return {}
    folder = os.path.join(out_dir, "scores")
    os.makedirs(folder, exist_ok=True)
    keys = {m: safe_name(m) for m in res.scores}
    sets = list(next(iter(res.scores.values())))
    files = {}
    for s in sets:
        path = os.path.join(folder, f"{safe_name(s)}.npz")
        tmp = temp_path(path, ".npz")  # np.savez adds .npz to a name without it
        np.savez_compressed(tmp, **{keys[m]: np.asarray(per[s]) for m, per in res.scores.items() if s in per})
        os.replace(tmp, path)
        files[s] = path
    return {"files": files, "keys": keys}


def plots_of(res: EvalResult, out_dir: str) -> list:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    for m, per in res.scores.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        for o in res.metrics[m]:
            fpr, tpr_, _ = M.roc_curve(per["id"], per[o])
            step = max(1, len(fpr) // 4000)  # plotting needs no more points than pixels
            ax.plot(fpr[::step].numpy(), tpr_[::step].numpy(), label=f"{o} (AUROC {100 * res.metrics[m][o].auroc:.1f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="FPR (OOD kept as ID)", ylabel="TPR (ID kept)", title=f"ROC: {m}")
        ax.legend(loc="lower right", fontsize=8)
        p = os.path.join(out_dir, f"roc_{safe_name(m)}.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(p)
        fig, ax = plt.subplots(figsize=(6, 4))
        all_s = np.concatenate([np.asarray(v, np.float64) for v in per.values()])
        finite = all_s[np.isfinite(all_s)]
        bins = np.linspace(finite.min(), finite.max(), 80) if finite.size and finite.min() < finite.max() else 20
        for s, v in per.items():
            ax.hist(np.asarray(v, np.float64), bins=bins, density=True, histtype="step", label=s)
        ax.set(xlabel=f"{m} score (higher = more ID)", ylabel="density", title=f"Score histogram: {m}")
        ax.legend(fontsize=8)
        p = os.path.join(out_dir, f"hist_{safe_name(m)}.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(p)
    return written
