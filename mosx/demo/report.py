"""The demo's report: the results dictionary of the main run, the paper-style tables (main run,
scaling, Unleashing Mask), the JSON / CSV / text writers and the PNG plots (ROC per OOD set, MSP vs
MOS histograms, FPR95 against the number of classes)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform

from .._io import atomic_write_text
from .settings import FLAT_SCORES, GROUPED_SCORES, SCALING_SCORES, resolve_device, settings_record

__all__ = ["format_table", "format_scaling", "format_unleash"]


# ------------------------------------------------------------------------------ the main run
def _metric_row(m) -> dict:
    return {
        "auroc": m.auroc,
        "fpr95": m.fpr_at_tpr,
        "aupr_in": m.aupr_in,
        "aupr_out": m.aupr_out,
        "detection_error": m.detection_error,
    }


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
                "model": kind,
                "spec": spec,
                "sets": {o: _metric_row(per[o]) for o in ood_sets},
                "average": {
                    "auroc": a["auroc"],
                    "fpr95": a["fpr_at_tpr"],
                    "aupr_in": a["aupr_in"],
                    "aupr_out": a["aupr_out"],
                    "detection_error": a["detection_error"],
                },
                "score_seconds": r.scorer_seconds.get(spec, 0.0),
            }
            labels[label] = spec
    return {
        "settings": settings_record(s),
        "data": {
            "folder": bench.path,
            "key": bench.manifest["key"],
            "classes": bench.num_classes,
            "groups": len(bench.script_names),
            "scripts": bench.script_names,
            "counts": bench.manifest["counts"],
        },
        "ood_sets": ood_sets,
        "id_accuracy": {k: r.id_accuracy for k, r in res.items()},
        "backbone_images_per_s": {k: r.images_per_s for k, r in res.items()},
        "methods": methods,
        "training": train_info,
        "seconds": dict(stages),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "device": resolve_device(s.device),
            "threads": torch.get_num_threads(),
        },
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
    out = [
        f"ID: {d['classes']} letter classes in {d['groups']} scripts (groups); "
        f"{d['counts']['test']} ID test images; AUROC / FPR95 in % (ID positive; higher AUROC and lower FPR95 are better)",
        line(head),
        "-+-".join("-" * w for w in widths),
    ]
    out += [line(r) for r in rows]
    out.append(f"ID accuracy: flat {100 * acc['flat']:.2f}%, grouped {100 * acc['grouped']:.2f}%")
    out.append(
        "backbone pass: "
        + ", ".join(f"{k} {v:.0f} images/s" for k, v in ips.items() if v)
        + "; 'score s' = fit + scoring time of the method on the cached logits/features"
    )
    out.append(f"lowest average FPR95: {best}")
    return "\n".join(out)


def _write_demo(results: dict, res: dict, out: str) -> None:
    table = format_table(results)
    results["files"] = {
        "table": os.path.join(out, "demo_table.txt"),
        "json": os.path.join(out, "demo_results.json"),
        "csv": os.path.join(out, "demo_results.csv"),
    }
    atomic_write_text(table + "\n", results["files"]["table"])
    rows = []
    for label, m in results["methods"].items():
        for o in results["ood_sets"] + ["average"]:
            v = m["average"] if o == "average" else m["sets"][o]
            rows.append(
                [label, m["model"], o, v["auroc"], v["fpr95"], v["aupr_in"], v["aupr_out"], v["detection_error"],
                 m["score_seconds"]]
            )  # fmt: skip
    header = ["method", "model", "ood_set", "auroc", "fpr95", "aupr_in", "aupr_out", "detection_error", "score_seconds"]
    atomic_write_text(_csv_text(header, rows), results["files"]["csv"])
    results["files"]["plots"] = _plots(results, res, out)
    # the JSON last: --reuse takes a run whose demo_results.json exists as finished
    atomic_write_text(json.dumps(results, indent=1), results["files"]["json"])
    print(table)
    sec = results["seconds"]
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items()))
    print(
        f"outputs in {out}: demo_table.txt, demo_results.json, demo_results.csv, "
        f"{len(results['files']['plots'])} PNG plots (+ per-model evaluator outputs in eval_flat/, eval_grouped/)"
    )


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
            ax.plot(
                fpr[::step].numpy(),
                tpr[::step].numpy(),
                lw=2.0 if m["spec"] == "mos" else 1.0,
                label=f"{label} ({100 * m['sets'][o]['auroc']:.1f} / {100 * m['sets'][o]['fpr95']:.1f})",
            )
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
            ax.hist(
                np.asarray(v, np.float64),
                bins=bins,
                density=True,
                histtype="step",
                lw=2.0 if name == "id" else 1.0,
                label=name,
            )
        ax.set(xlabel=f"{label} score (higher = more ID)", ylabel="density", title=f"{label} ({kind} model)")
        ax.legend(fontsize=7)
    p = os.path.join(out, "hist_msp_vs_mos.png")
    fig.savefig(p, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(p)
    return written


# ------------------------------------------------------------------------------ scaling
def _csv_text(header: list, rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_results(out: str, stem: str, table: str, result: dict, header: list, csv_rows: list) -> None:
    """<stem>_table.txt, <stem>.json and <stem>.csv in out: the experiment's three output files, each
    written atomically (a killed run leaves the previous file or the new one)."""
    atomic_write_text(table + "\n", os.path.join(out, f"{stem}_table.txt"))
    atomic_write_text(json.dumps(result, indent=1), os.path.join(out, f"{stem}.json"))
    atomic_write_text(_csv_text(header, csv_rows), os.path.join(out, f"{stem}.csv"))


def format_scaling(result: dict) -> str:
    head = ["classes", "groups"] + [f"{m} FPR95" for m in SCALING_SCORES.values()] + ["acc flat", "acc grouped"]
    rows = [
        [str(r["classes"]), str(r["groups"])]
        + [f"{100 * r[m]['fpr95']:.2f}" for m in SCALING_SCORES.values()]
        + [f"{100 * r['accuracy_flat']:.2f}", f"{100 * r['accuracy_grouped']:.2f}"]
        for r in result["rows"]
    ]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: " | ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join(
        [
            "FPR95 in % averaged over the OOD sets (lower is better), ID accuracy in %",
            line(head),
            "-+-".join("-" * w for w in widths),
        ]
        + [line(r) for r in rows]
    )


def _scaling_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["classes"] for r in result["rows"]]
    for label in SCALING_SCORES.values():
        ax.plot(
            xs, [100 * r[label]["fpr95"] for r in result["rows"]], "o-", lw=2.0 if label == "MOS" else 1.2, label=label
        )
    ax.set_xscale("log")
    ax.minorticks_off()  # only the measured sizes as ticks
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set(
        xlabel="number of ID classes",
        ylabel="FPR95 (%), average over OOD sets",
        title="OOD detection as the label space grows",
    )
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------ Unleashing Mask
def format_unleash(result: dict) -> str:
    head = ["Method", "model", "stage", "AUROC avg", "FPR95 avg", "ID acc"]
    rows = [
        [
            r["method"],
            r["model"],
            r["stage"],
            f"{100 * r['auroc']:.2f}",
            f"{100 * r['fpr95']:.2f}",
            f"{100 * r['accuracy']:.2f}",
        ]
        for r in result["rows"]
    ]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    bs = ", ".join(f"{k} b = {v['flood_level']:.4f}" for k, v in result["models"].items())
    return "\n".join(
        [
            f"Unleashing Mask: before vs UM vs UMAP, averages over the OOD sets in % ({bs})",
            line(head),
            "-+-".join("-" * w for w in widths),
        ]
        + [line(r) for r in rows]
    )
