"""report.html: one self-contained page of an evaluation (the table, ROC curves and score histograms
embedded as images, the settings and the versions), which opens offline in any browser."""

from __future__ import annotations

import base64
import datetime
import html
import os
import platform

from .._io import temp_path

__all__ = ["write_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef; }
td.best { font-weight: bold; }
table.kv td { text-align: left; }
.figs img { max-width: 32em; margin: 0.3em; border: 1px solid #ddd; vertical-align: top; }
.note { color: #555; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _metrics_table(res, tpr: float) -> str:
    sets = list(next(iter(res.metrics.values()))) if res.metrics else []
    fpr_name = f"FPR{round(tpr * 100):d}"
    head = "".join(f"<th>{_e(s)}</th>" for s in sets + ["Average"])
    best_fpr = {s: min(per[s].fpr_at_tpr for per in res.metrics.values()) for s in sets}
    best_avg = min((a["fpr_at_tpr"] for a in res.averages.values()), default=None)
    rows = []
    for method, per in res.metrics.items():
        cells = []
        for s in sets:
            v = per[s]
            cls = ' class="best"' if v.fpr_at_tpr == best_fpr[s] else ""
            cells.append(f"<td{cls}>{100 * v.auroc:.2f} / {100 * v.fpr_at_tpr:.2f}</td>")
        a = res.averages[method]
        cls = ' class="best"' if a["fpr_at_tpr"] == best_avg else ""
        cells.append(f"<td{cls}>{100 * a['auroc']:.2f} / {100 * a['fpr_at_tpr']:.2f}</td>")
        rows.append(f"<tr><td>{_e(method)}</td>{''.join(cells)}</tr>")
    return (
        f"<p>AUROC / {fpr_name} in % (ID positive; bold: lowest {fpr_name} of the column)</p>"
        f"<table><thead><tr><th>Method</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _kv_table(items) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _versions() -> list:
    import numpy
    import torch

    from .. import __version__

    out = [
        ("mosx", __version__),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
    ]
    try:
        from .. import cuda_built

        out.append(("mosx CUDA kernels built", cuda_built()))
    except ImportError:  # pragma: no cover - the op library always loads with mosx
        pass
    return out


def _figures(paths) -> str:
    imgs = []
    for p in paths:
        with open(p, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        imgs.append(f'<img alt="{_e(os.path.basename(p))}" src="data:image/png;base64,{data}">')
    return f'<div class="figs">{"".join(imgs)}</div>'


def write_html(res, path: str, tpr: float, settings: dict, plot_files) -> str:
    """Write report.html for an EvalResult at `path`; plot_files: the PNGs to embed (None: plots off)."""
    accs = (
        res.id_accuracy
        if isinstance(res.id_accuracy, dict)
        else {("grouped" if res.grouped else "flat"): res.id_accuracy}
    )
    summary = [(f"ID accuracy ({k})", f"{100 * a:.2f}%") for k, a in accs.items() if a is not None]
    summary += [(f"images scored: {k}", v) for k, v in res.counts.items()]
    summary += [(f"unreadable images skipped: {k}", len(v)) for k, v in res.unreadable.items() if v]
    summary += [(f"scorer time: {k}", f"{v:.3f} s") for k, v in res.scorer_seconds.items()]
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>mosx evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>mosx evaluation</h1>",
        f'<p class="note">written {_e(datetime.datetime.now().isoformat(timespec="seconds"))}</p>',
        "<h2>OOD detection</h2>",
        _metrics_table(res, tpr),
        "<h2>Summary</h2>",
        _kv_table(summary),
    ]
    if plot_files:
        parts += ["<h2>ROC curves and score histograms</h2>", _figures(plot_files)]
    else:
        parts += ['<p class="note">Plots were turned off (--no-plots).</p>']
    parts += [
        "<h2>Settings</h2>",
        _kv_table(settings.items()),
        "<h2>Versions</h2>",
        _kv_table(_versions()),
        "</body></html>",
    ]
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path
