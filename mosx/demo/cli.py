"""`mosx demo` on the command line: the parser, the settings it makes, the reuse of an earlier
run's models (--reuse) and `main`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .._io import OutputBusy, disk_full_exit, output_lock
from .experiments import check_unleash_available, run_demo, run_scaling, run_unleash
from .regime import run_regime
from .seeds import run_seeds
from .settings import PRESETS, DemoError, DemoSettings, _say, make_settings, resolve_device, same_settings

__all__ = ["build_parser", "settings_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mosx demo",
        description=sys.modules[__package__].__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs: demo_table.txt, demo_results.json/.csv, roc_<set>.png, "
        "hist_msp_vs_mos.png, eval_flat/ and eval_grouped/ (the evaluator's "
        "own tables and per-method plots), scaling/, unleash/.",
    )
    p.add_argument("--out", default="mosx-out", help="output folder (default ./mosx-out)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes (default quick)")
    p.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="the quick preset (the default): a few minutes on a 2-core CPU",
    )
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
    p.add_argument("--seed", type=int, help="training seed (default 0); with --seeds, the first one")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run N seeds (seed i: --seed + i, --data-seed + i) in <out>/seed_<i>/ and report mean ± std "
        "over them (default 1: one run, outputs in --out)",
    )
    p.add_argument("--data-seed", type=int, help="seed of the data build (default 0)")
    p.add_argument("--data-root", help="benchmark cache (default ~/.cache/mosx/data; env MOSX_DATA)")
    p.add_argument("--font-dir", help="folder of the Noto font files (default: where fonts-noto-* install them)")
    p.add_argument("--device", help="auto (GPU when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="FPR95 of MSP, Energy and MOS as the number of ID classes grows (instead of the main table)",
    )
    p.add_argument("--scaling-classes", help="comma-separated class counts (default 20,50,100,200,400)")
    p.add_argument(
        "--unleash",
        action="store_true",
        help="after the main table: Unleashing Mask (UM, UMAP) fine-tuning, before/after table",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse an earlier run in --out with the same settings (with --seeds: every finished seed, so an "
        "interrupted multi-seed run continues; with --unleash: its models)",
    )
    p.add_argument(
        "--um-regime",
        action="store_true",
        help="instead of the main table: train past fitting, per-epoch validation curves, then UM / UMAP "
        "chosen on validation data (an OOD validation set disjoint from the test sets); see mosx.demo.regime",
    )
    p.add_argument("--regime-epochs", type=float, help="epochs of the --um-regime training from scratch")
    p.add_argument("--um-epochs", type=float)
    p.add_argument("--um-lr", type=float)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_from_args(a) -> DemoSettings:
    over = {
        k: getattr(a, k)
        for k in (
            "classes",
            "scripts",
            "image_size",
            "train_per_class",
            "test_per_class",
            "ood_per_set",
            "fit_per_class",
            "arch",
            "width",
            "weight_decay",
            "epochs",
            "head_epochs",
            "head_lr",
            "batch_size",
            "lr",
            "seed",
            "data_seed",
            "data_root",
            "font_dir",
            "device",
            "um_epochs",
            "um_lr",
            "regime_epochs",
        )
        if getattr(a, k) is not None
    }
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
    # the settings of the later experiments (Unleashing Mask, scaling, the regime) do not change the
    # main run's models
    later = ("um_keep", "umap_keep", "um_epochs", "um_lr", "scaling_classes")
    if not same_settings(prev.get("settings", {}), s, ignore=later, ignore_prefix="regime_"):
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
    if a.um_regime and (a.scaling or a.unleash):
        print("mosx demo: --um-regime is its own experiment; leave out --scaling and --unleash", file=sys.stderr)
        return 2
    if a.seeds < 1:
        print(f"mosx demo: --seeds must be >= 1, got {a.seeds}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with output_lock(a.out, "mosx demo run"):
            _run(a, s)
    except (MissingDataError, DemoError, OutputBusy) as e:
        print(f"mosx demo: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return disk_full_exit(
            "mosx demo", e, "Results written in full are intact: free space, then rerun with --reuse."
        )
    print(f"mosx demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _run(a, s: DemoSettings) -> None:
    """The experiment the arguments ask for."""
    if a.unleash and not a.scaling:
        check_unleash_available()  # before the main run, not after it
    if a.um_regime:
        run_regime(s, a.out, a.seeds, reuse=a.reuse)
    elif a.seeds > 1:
        run_seeds(s, a.out, a.seeds, scaling=a.scaling, unleash=a.unleash, reuse=a.reuse)
    elif a.scaling:
        run_scaling(s, a.out)
    else:
        base = _previous_run(s, a.out) if a.reuse else None
        if base is None:
            base = run_demo(s, a.out)
        if a.unleash:
            run_unleash(s, a.out, base)
