"""Several seeds of one demo experiment and their summary: mean +/- standard deviation of every
cell, how often each method ranks first, and in how many seeds one method beats another.

Seed i (i = 0 .. N-1) runs with `seed = s.seed + i` (initialisation, batch order, augmentation and
mixup draws) and `data_seed = s.data_seed + i` (the benchmark's train / test split of typeface
families and its OOD samples), in its own folder `<out>/seed_<i>/`. Standard deviations are the
sample standard deviation (ddof = 1) over seeds; one seed gives no spread.
"""

from __future__ import annotations

import dataclasses
import math
import os

from .settings import DemoSettings

__all__ = ["seed_settings", "seed_folder", "summarize", "summarize_values", "wins", "format_seed_table"]


def seed_settings(s: DemoSettings, i: int) -> DemoSettings:
    """The settings of seed number i: every random draw of the run (data included) moves with i."""
    return dataclasses.replace(s, seed=s.seed + i, data_seed=s.data_seed + i)


def seed_folder(out: str, i: int) -> str:
    return os.path.join(out, f"seed_{i}")


def summarize_values(values) -> dict:
    """{"mean", "std", "values"} of a list of floats (std: sample std, ddof 1; None for one value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("summarize_values: no values")
    mean = math.fsum(v) / len(v)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": mean, "std": std, "values": v}


def _metric_cells(per_seed: list[dict]) -> dict:
    """{metric: summary} over seeds of dicts {metric: value} with the same keys."""
    return {k: summarize_values([d[k] for d in per_seed]) for k in per_seed[0]}


def wins(runs: list[dict], metric: str, better_low: bool, ood_set: str | None = None) -> dict:
    """{a: {b: number of seeds where method a beats method b on the average metric}} (strictly);
    ood_set: on that OOD set instead of the average."""
    labels = list(runs[0]["methods"])

    def value(r, label):
        m = r["methods"][label]
        return (m["average"] if ood_set is None else m["sets"][ood_set])[metric]

    out = {}
    for a in labels:
        out[a] = {}
        for b in labels:
            if a == b:
                continue
            n = 0
            for r in runs:
                va, vb = value(r, a), value(r, b)
                n += (va < vb) if better_low else (va > vb)
            out[a][b] = n
    return out


def first_place(runs: list[dict], metric: str, better_low: bool) -> dict:
    """{method: number of seeds in which it has the best average metric} (ties: every tied method)."""
    counts = {k: 0 for k in runs[0]["methods"]}
    for r in runs:
        vals = {k: m["average"][metric] for k, m in r["methods"].items()}
        best = min(vals.values()) if better_low else max(vals.values())
        for k, v in vals.items():
            counts[k] += v == best
    return counts


def summarize(runs: list[dict]) -> dict:
    """The summary of the main run's results over seeds (each one run_demo's dictionary)."""
    if not runs:
        raise ValueError("summarize: no runs")
    sets = runs[0]["ood_sets"]
    for r in runs[1:]:
        if r["ood_sets"] != sets or list(r["methods"]) != list(runs[0]["methods"]):
            raise ValueError("summarize: the runs have different OOD sets or methods")
    methods = {}
    for label, m in runs[0]["methods"].items():
        methods[label] = {
            "model": m["model"],
            "spec": m["spec"],
            "sets": {o: _metric_cells([r["methods"][label]["sets"][o] for r in runs]) for o in sets},
            "average": _metric_cells([r["methods"][label]["average"] for r in runs]),
            "score_seconds": summarize_values([r["methods"][label]["score_seconds"] for r in runs]),
        }
    return {
        "seeds": [r["settings"]["seed"] for r in runs],
        "data_seeds": [r["settings"]["data_seed"] for r in runs],
        "ood_sets": sets,
        "methods": methods,
        "id_accuracy": {k: summarize_values([r["id_accuracy"][k] for r in runs]) for k in runs[0]["id_accuracy"]},
        "first_place": {
            "auroc": first_place(runs, "auroc", better_low=False),
            "fpr95": first_place(runs, "fpr95", better_low=True),
        },
        "wins": {"auroc": wins(runs, "auroc", better_low=False), "fpr95": wins(runs, "fpr95", better_low=True)},
        "set_wins": {  # {metric: {ood set: {a: {b: seeds in which a beats b on that set}}}}
            metric: {o: wins(runs, metric, metric == "fpr95", o) for o in sets} for metric in ("auroc", "fpr95")
        },
        "conventions": runs[0]["conventions"] + "; mean +/- sample standard deviation (ddof 1) over seeds",
    }


def cell(summary: dict, scale: float = 100.0, digits: int = 2) -> str:
    """'95.34 +/- 0.41' (or '95.34' for one seed)."""
    m = f"{scale * summary['mean']:.{digits}f}"
    return m if summary["std"] is None else f"{m} ± {scale * summary['std']:.{digits}f}"


def _table(head: list, rows: list) -> list:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return " | ".join(c.ljust(w) for c, w in zip(r, widths))

    return [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_seed_table(summary: dict, data: dict | None = None) -> str:
    """Two tables (AUROC, FPR95: mean +/- std per OOD set and the average), ID accuracy, first places
    and MOS against every other method, seed by seed."""
    n = len(summary["seeds"])
    sets = summary["ood_sets"]
    out = []
    if data:
        out.append(f"ID: {data['classes']} letter classes in {data['groups']} scripts (groups)")
    out.append(
        f"{n} seeds (seed {', '.join(map(str, summary['seeds']))}; data seed "
        f"{', '.join(map(str, summary['data_seeds']))}); mean ± sample std over seeds, in %"
    )
    for metric, title in (("auroc", "AUROC (higher is better)"), ("fpr95", "FPR95 (lower is better)")):
        out.append("")
        out.append(title)
        head = ["Method", "model"] + sets + ["Average", "first"]
        rows = [
            [label, m["model"]]
            + [cell(m["sets"][o][metric]) for o in sets]
            + [cell(m["average"][metric]), f"{summary['first_place'][metric][label]}/{n}"]
            for label, m in summary["methods"].items()
        ]
        out += _table(head, rows)
    out.append("")
    acc = summary["id_accuracy"]
    out.append("ID accuracy: " + ", ".join(f"{k} {cell(v)}" for k, v in acc.items()))
    if "MOS" in summary["methods"]:
        for metric, name in (("fpr95", "FPR95"), ("auroc", "AUROC")):
            w = summary["wins"][metric]["MOS"]
            out.append(f"MOS beats, on average {name}: " + ", ".join(f"{b} in {k}/{n}" for b, k in w.items()))
        if "MSP" in summary["methods"]:
            sw = summary["set_wins"]["fpr95"]
            out.append(
                "MOS beats MSP on FPR95, per OOD set: " + ", ".join(f"{o} {sw[o]['MOS']['MSP']}/{n}" for o in sets)
            )
    out.append("first = seeds in which the method has the best average (ties count for each tied method)")
    return "\n".join(out)


# ------------------------------------------------------------------------------ scaling and UM over seeds
def summarize_scaling(results: list[dict]) -> dict:
    """Per class count: mean +/- std of every method's average FPR95 / AUROC and of both accuracies."""
    from .settings import SCALING_SCORES

    rows = []
    for j, r0 in enumerate(results[0]["rows"]):
        per = [res["rows"][j] for res in results]
        if any(p["classes"] != r0["classes"] for p in per):
            raise ValueError("summarize_scaling: the runs have different class counts")
        row = {"classes": r0["classes"], "groups": r0["groups"]}
        for label in SCALING_SCORES.values():
            row[label] = {k: summarize_values([p[label][k] for p in per]) for k in ("fpr95", "auroc")}
        for k in ("accuracy_flat", "accuracy_grouped"):
            row[k] = summarize_values([p[k] for p in per])
        rows.append(row)
    return {"seeds": [res["settings"]["seed"] for res in results], "rows": rows}


def format_seed_scaling(summary: dict) -> str:
    from .settings import SCALING_SCORES

    head = ["classes", "groups"] + [f"{m} FPR95" for m in SCALING_SCORES.values()] + ["acc flat", "acc grouped"]
    rows = [
        [str(r["classes"]), str(r["groups"])]
        + [cell(r[m]["fpr95"]) for m in SCALING_SCORES.values()]
        + [cell(r["accuracy_flat"]), cell(r["accuracy_grouped"])]
        for r in summary["rows"]
    ]
    n = len(summary["seeds"])
    return "\n".join(
        [f"FPR95 in % averaged over the OOD sets (lower is better), ID accuracy in %; mean ± std over {n} seeds"]
        + _table(head, rows)
    )


def scaling_band_plot(summary: dict, path: str) -> None:
    """FPR95 against the number of classes: the mean over seeds and a band of +/- one std."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from .settings import SCALING_SCORES

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["classes"] for r in summary["rows"]]
    for label in SCALING_SCORES.values():
        mean = np.array([100 * r[label]["fpr95"]["mean"] for r in summary["rows"]])
        std = np.array([100 * (r[label]["fpr95"]["std"] or 0.0) for r in summary["rows"]])
        (line,) = ax.plot(xs, mean, "o-", lw=2.0 if label == "MOS" else 1.2, label=label)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set(
        xlabel="number of ID classes",
        ylabel="FPR95 (%), average over OOD sets",
        title=f"OOD detection as the label space grows ({len(summary['seeds'])} seeds, mean ± std)",
    )
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def summarize_unleash(results: list[dict]) -> dict:
    """Per (method, model, stage) row of run_unleash: mean +/- std of AUROC, FPR95 and accuracy."""
    rows = []
    for j, r0 in enumerate(results[0]["rows"]):
        per = [res["rows"][j] for res in results]
        row = {k: r0[k] for k in ("method", "model", "stage")}
        row.update({k: summarize_values([p[k] for p in per]) for k in ("auroc", "fpr95", "accuracy")})
        rows.append(row)
    b = {k: summarize_values([res["models"][k]["flood_level"] for res in results]) for k in results[0]["models"]}
    return {"seeds": len(results), "rows": rows, "flood_level": b, "settings": results[0]["settings"]}


def format_seed_unleash(summary: dict) -> str:
    head = ["Method", "model", "stage", "AUROC avg", "FPR95 avg", "ID acc"]
    rows = [
        [r["method"], r["model"], r["stage"], cell(r["auroc"]), cell(r["fpr95"]), cell(r["accuracy"])]
        for r in summary["rows"]
    ]
    bs = ", ".join(f"{k} b = {cell(v, 1.0, 4)}" for k, v in summary["flood_level"].items())
    return "\n".join(
        [f"Unleashing Mask over {summary['seeds']} seeds: averages over the OOD sets in %, mean ± std ({bs})"]
        + _table(head, rows)
    )


# ------------------------------------------------------------------------------ the runner
def run_seeds(s: DemoSettings, out: str, n: int, *, scaling: bool = False, unleash: bool = False, reuse=False):
    """The experiment (main run, or --scaling) for seeds 0 .. n-1 in <out>/seed_<i>/, then its
    summary in <out>: demo_seeds_table.txt / .json / .csv and seeds_average.png (main run; with
    unleash also unleash_seeds_*), or scaling/scaling_seeds_* and scaling/scaling_seeds.png."""
    from .cli import _previous_run
    from .experiments import run_demo, run_scaling, run_unleash
    from .report import _write_results
    from .settings import _say

    if n < 1:
        raise ValueError(f"seeds must be >= 1, got {n}")
    os.makedirs(out, exist_ok=True)
    runs, unleashed = [], []
    for i in range(n):
        si, folder = seed_settings(s, i), seed_folder(out, i)
        _say(f"===== seed {i + 1}/{n}: seed {si.seed}, data seed {si.data_seed} -> {folder}")
        if scaling:
            prev = _previous_scaling(si, folder) if reuse else None
            runs.append(prev if prev is not None else run_scaling(si, folder))
            continue
        base = _previous_run(si, folder) if reuse else None
        runs.append(base if base is not None else run_demo(si, folder))
        if unleash:
            unleashed.append(run_unleash(si, folder, runs[-1]))

    if scaling:
        summary = summarize_scaling(runs)
        sout = os.path.join(out, "scaling")
        os.makedirs(sout, exist_ok=True)
        table = format_seed_scaling(summary)
        _write_results(
            sout,
            "scaling_seeds",
            table,
            summary,
            ["classes", "groups", "quantity", "mean", "std", "values"],
            _scaling_csv(summary),
        )
        scaling_band_plot(summary, os.path.join(sout, "scaling_seeds.png"))
        print(table)
        print(f"scaling summary over {n} seeds in {sout}: scaling_seeds_table.txt, .json, .csv, scaling_seeds.png")
        return summary

    summary = summarize(runs)
    table = format_seed_table(summary, runs[0]["data"])
    csv_rows = [
        [label, m["model"], o, metric, v["mean"], v["std"], " ".join(f"{x:.6f}" for x in v["values"])]
        for label, m in summary["methods"].items()
        for o in summary["ood_sets"] + ["average"]
        for metric, v in (m["average"] if o == "average" else m["sets"][o]).items()
    ]
    summary["runs"] = [os.path.join(seed_folder(out, i), "demo_results.json") for i in range(n)]
    summary["seconds"] = {"per_seed_total": [r["seconds"].get("total") for r in runs]}
    _write_results(
        out, "demo_seeds", table, summary, ["method", "model", "ood_set", "metric", "mean", "std", "values"], csv_rows
    )
    seeds_plot(summary, os.path.join(out, "seeds_average.png"))
    print(table)
    print(f"summary over {n} seeds in {out}: demo_seeds_table.txt, demo_seeds.json, demo_seeds.csv, seeds_average.png")
    if unleash:
        us = summarize_unleash(unleashed)
        utable = format_seed_unleash(us)
        _write_results(
            out,
            "unleash_seeds",
            utable,
            us,
            ["method", "model", "stage", "quantity", "mean", "std"],
            [
                [r["method"], r["model"], r["stage"], k, r[k]["mean"], r[k]["std"]]
                for r in us["rows"]
                for k in ("auroc", "fpr95", "accuracy")
            ],
        )
        print(utable)
    return summary


def _previous_scaling(s: DemoSettings, folder: str) -> dict | None:
    """scaling/scaling.json of a finished seed in folder made with the same settings, or None."""
    import json

    from .settings import _say, same_settings

    path = os.path.join(folder, "scaling", "scaling.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        prev = json.load(f)
    if not same_settings(prev.get("settings", {}), s):
        return None
    _say(f"--reuse: scaling results of {path}")
    return prev


def _scaling_csv(summary: dict) -> list:
    from .settings import SCALING_SCORES

    rows = []
    for r in summary["rows"]:
        items = [(f"{m} {k}", r[m][k]) for m in SCALING_SCORES.values() for k in ("fpr95", "auroc")]
        items += [(k, r[k]) for k in ("accuracy_flat", "accuracy_grouped")]
        for name, v in items:
            rows.append(
                [r["classes"], r["groups"], name, v["mean"], v["std"], " ".join(f"{x:.6f}" for x in v["values"])]
            )
    return rows


def seeds_plot(summary: dict, path: str) -> None:
    """Average AUROC and FPR95 of every method: mean over seeds, error bar +/- one std, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = list(summary["methods"])
    # one y axis: the method names once, on the left (long names would run into the left panel)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5), sharey=True)
    for ax, metric, title in zip(axes, ("auroc", "fpr95"), ("average AUROC (%)", "average FPR95 (%)")):
        for y, label in enumerate(labels):
            v = summary["methods"][label]["average"][metric]
            ax.errorbar(
                100 * v["mean"],
                y,
                xerr=100 * (v["std"] or 0.0),
                fmt="o",
                color="C3" if label == "MOS" else "C0",
                capsize=3,
            )
            ax.plot([100 * x for x in v["values"]], [y] * len(v["values"]), "|", color="grey", ms=8)
        ax.set(xlabel=title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()  # shared: both panels list the methods top-down
    fig.suptitle(f"{len(summary['seeds'])} seeds: mean ± std (bars), each seed (ticks)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
