"""The demo's experiments: the main run (`run_demo`: flat and grouped models, every score on every
OOD set), the scaling run (`run_scaling`: FPR95 as the number of ID classes grows) and Unleashing
Mask (`run_unleash`: UM and UMAP fine-tuning, before vs after). Each returns its results and writes
them through mosx.demo.report."""

from __future__ import annotations

import os
import time

from .pipeline import _train, evaluate_model, fit_subset, load_data, train_config, train_data, train_models
from .report import _collect, _scaling_plot, _write_demo, _write_results, format_scaling, format_unleash
from .settings import FLAT_SCORES, GROUPED_SCORES, SCALING_SCORES, DemoError, DemoSettings, _say, settings_record

__all__ = ["run_demo", "run_scaling", "run_unleash", "check_unleash_available"]


# ------------------------------------------------------------------------------ the main run
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
    _say(
        f"      {bench.num_classes} classes in {len(bench.script_names)} scripts (groups), "
        f"{n_train} train / {len(bench.test)} test images, OOD sets: "
        + ", ".join(f"{k} {len(v)}" for k, v in bench.ood.items())
        + f"  ({stages['data']:.1f}s)"
    )
    data = train_data(bench)

    models, train_info, seconds = train_models(s, bench, out, data, step_log=True)
    stages.update(seconds)

    _say("[4/4] scoring: baselines on the flat model, MOS (plain and feature-shaped) on the grouped model")
    t0 = time.perf_counter()
    fit = fit_subset(bench, s.fit_per_class, s.seed)
    res_flat = evaluate_model(models["flat"], bench, None, FLAT_SCORES, os.path.join(out, "eval_flat"), s, fit=fit)
    res_grp = evaluate_model(
        models["grouped"], bench, bench.groups, GROUPED_SCORES, os.path.join(out, "eval_grouped"), s, fit=fit
    )
    stages["evaluate"] = time.perf_counter() - t0

    results = _collect(s, bench, {"flat": res_flat, "grouped": res_grp}, train_info, stages)
    results["seconds"]["total"] = time.perf_counter() - t_start
    _write_demo(results, {"flat": res_flat, "grouped": res_grp}, out)
    return results


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
            ev = evaluate_model(
                models[kind],
                bench,
                bench.groups if kind == "grouped" else None,
                scores,
                os.path.join(out, f"c{classes}", f"eval_{kind}"),
                s,
            )
            row[f"accuracy_{kind}"] = ev.id_accuracy
            for spec in scores:
                label = SCALING_SCORES[spec]
                row[label] = {
                    "fpr95": ev.averages[spec]["fpr_at_tpr"],
                    "auroc": ev.averages[spec]["auroc"],
                    "per_set_fpr95": {o: v.fpr_at_tpr for o, v in ev.metrics[spec].items()},
                }
        rows.append(row)
    result = {
        "settings": settings_record(s),
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }
    table = format_scaling(result)
    csv_rows = [
        [
            r["classes"],
            r["groups"],
            label,
            r[label]["fpr95"],
            r[label]["auroc"],
            r["accuracy_grouped"] if label == "MOS" else r["accuracy_flat"],
        ]
        for r in rows
        for label in SCALING_SCORES.values()
    ]
    _write_results(
        out,
        "scaling",
        table,
        result,
        ["classes", "groups", "method", "fpr95_average", "auroc_average", "accuracy"],
        csv_rows,
    )
    _scaling_plot(result, os.path.join(out, "scaling.png"))
    print(table)
    print(
        f"scaling outputs in {out}: scaling_table.txt, scaling.json, scaling.csv, scaling.png "
        f"({result['seconds']:.0f}s)"
    )
    return result


# ------------------------------------------------------------------------------ Unleashing Mask
def check_unleash_available() -> None:
    """UM and UMAP need mosx.unleash, whose masks run on the masked_weight op of the compiled library."""
    try:
        import mosx.unleash  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise DemoError(
            "--unleash needs mosx.unleash and the masked_weight op, which this build of "
            f"mosx._C lacks ({e}); rebuild it: pip install --no-build-isolation -e ."
        ) from None


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
    scores = {
        "flat": {"msp": "MSP", "energy": "Energy", "odin:temperature=1000": "ODIN (T=1000)"},
        "grouped": {"mos": "MOS"},
    }
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
        cfg = train_config(
            s, loss, n, os.path.join(uout, f"umap_{kind}"), um_flood_level=b, umap_keep=s.umap_keep, **common
        )
        r_umap, _ = _train(cfg, data, groups)
        variants["UMAP"] = r_umap.model.cpu()
        before, _ = load_model(init)
        evals = {"before": evaluate_model(before, bench, groups, scores[kind], os.path.join(out, f"eval_{kind}"), s)}
        for v, model in variants.items():
            evals[v] = evaluate_model(
                model, bench, groups, scores[kind], os.path.join(uout, f"eval_{v.lower()}_{kind}"), s
            )
        info[kind] = {"flood_level": b, "steps": um_steps, "id_accuracy": {k: e.id_accuracy for k, e in evals.items()}}
        for spec, label in scores[kind].items():
            for stage, e in evals.items():
                a = e.averages[spec]
                table_rows.append(
                    {
                        "method": label,
                        "model": kind,
                        "stage": stage,
                        "auroc": a["auroc"],
                        "fpr95": a["fpr_at_tpr"],
                        "accuracy": e.id_accuracy,
                        "sets": {o: {"auroc": m.auroc, "fpr95": m.fpr_at_tpr} for o, m in e.metrics[spec].items()},
                    }
                )
    result = {
        "models": info,
        "rows": table_rows,
        "seconds": time.perf_counter() - t_start,
        "settings": {"um_keep": s.um_keep, "umap_keep": s.umap_keep, "um_epochs": s.um_epochs, "um_lr": s.um_lr},
    }
    table = format_unleash(result)
    _write_results(
        uout,
        "unleash",
        table,
        result,
        ["method", "model", "stage", "auroc_average", "fpr95_average", "id_accuracy"],
        [[r["method"], r["model"], r["stage"], r["auroc"], r["fpr95"], r["accuracy"]] for r in table_rows],
    )
    print(table)
    print(f"unleash outputs in {uout} ({result['seconds']:.0f}s)")
    return result
