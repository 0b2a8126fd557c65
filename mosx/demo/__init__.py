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

``--seeds N`` runs any of these N times (seed i: training seed and data seed + i, each in
``<out>/seed_<i>/``) and reports every cell as mean +/- standard deviation, how often each method
ranks first and in how many seeds MOS beats each other method (:mod:`mosx.demo.seeds`).
``--um-regime`` tests Unleashing Mask where its premise holds: networks trained past fitting,
per-epoch validation curves, UM / UMAP chosen on validation data only (:mod:`mosx.demo.regime`).

Presets: ``--preset quick`` (the default: 100 classes, a few minutes on a 2-core CPU), ``full`` (larger
model, more data and epochs) and ``tiny`` (seconds; what CI runs). Single settings override a preset.

Layout: settings (DemoSettings, presets, score tables), pipeline (data, recipes, the two models,
the evaluator call), experiments (run_demo, run_scaling, run_unleash), seeds (several seeds and
their summary), regime (Unleashing Mask in its regime), report (tables, JSON / CSV, plots), cli
(build_parser, main).
"""

from __future__ import annotations

# mosx.demo.X keeps working for every name the single-module demo had (the private ones too)
from .cli import _previous_run, build_parser, main, settings_from_args  # noqa: F401
from .experiments import check_unleash_available, run_demo, run_scaling, run_unleash
from .pipeline import (  # noqa: F401
    _train,
    backbone_config,
    evaluate_model,
    fit_subset,
    head_config,
    load_data,
    train_config,
    train_data,
    train_models,
)
from .report import (  # noqa: F401
    _collect,
    _metric_row,
    _plots,
    _scaling_plot,
    _write_demo,
    _write_results,
    format_scaling,
    format_table,
    format_unleash,
)
from .settings import (  # noqa: F401
    FLAT_SCORES,
    GROUPED_SCORES,
    PRESETS,
    SCALING_SCORES,
    DemoError,
    DemoSettings,
    _say,
    _validate,
    make_settings,
    resolve_device,
)

__all__ = [
    "DemoError",
    "DemoSettings",
    "PRESETS",
    "FLAT_SCORES",
    "GROUPED_SCORES",
    "SCALING_SCORES",
    "make_settings",
    "resolve_device",
    "load_data",
    "train_config",
    "train_data",
    "fit_subset",
    "evaluate_model",
    "backbone_config",
    "head_config",
    "train_models",
    "run_demo",
    "run_scaling",
    "run_unleash",
    "check_unleash_available",
    "format_table",
    "format_scaling",
    "format_unleash",
    "build_parser",
    "settings_from_args",
    "main",
]
