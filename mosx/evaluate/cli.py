"""`mosx eval`: the command line of the evaluator; it builds an EvalConfig and runs it."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

from .. import scores as S
from .._io import disk_full_exit
from .config import EvalConfig
from .report import combine, write_outputs
from .run import SEARCH_METRICS, evaluate, resolve_model

__all__ = ["build_parser", "config_from_args", "split_scores", "main"]

_DESCRIPTION = "Score ID and OOD image sets with every OOD method from one cached backbone pass; paper-style table."


def _known_scores() -> str:
    """The spec names the scorer registry knows, wrappers as <wrapper>-<name>."""
    return ", ".join([*S.scorer_names(), *(f"{w}-<name>" for w in S.wrapper_names())])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mosx eval", description=_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="mosx model file, timm model name, BiT .npz or state dict")
    p.add_argument("--arch", help="timm architecture for a .npz or a plain state dict")
    p.add_argument("--weights", help="local weights for a timm model name")
    p.add_argument("--num-classes", type=int, help="output width when building a timm model")
    p.add_argument(
        "--flat-model",
        help="a second, flat model scored in the same run (baselines beside MOS); "
        "same loading rules as --model (--flat-arch/--flat-weights)",
    )
    p.add_argument("--flat-arch")
    p.add_argument("--flat-weights")
    p.add_argument("--flat-scores", help="scorer specs for the flat model (default: the baselines)")
    p.add_argument(
        "--groups",
        help="grouping of a grouped model (as for mosx train): sizes '398,521,...' or 'sizes:398,...', "
        "a groups .json, a reference list file or a .npy of group sizes (default: the model file's)",
    )
    p.add_argument("--classes", help="file with the expected class names, one per line (checked against the ID folder)")
    p.add_argument("--id", required=True, help="ID images: folder (class sub-folders) or list file")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=PATH", help="an OOD set (repeat)")
    p.add_argument("--fit-data", help="ID images for fitted scorers (KL matching, Mahalanobis, ReAct)")
    p.add_argument("--fit-on-id", action="store_true", help="fit those on the ID test set (optimistic)")
    p.add_argument(
        "--scores",
        help="scorer specs name[:key=value,...], comma-separated, e.g. "
        "'msp,energy:temperature=2,odin:temperature=1000,eps=0.0014,react-energy:percentile=90' "
        f"(known: {_known_scores()})",
    )
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a validation set for tuning the scorers' hyperparameters (repeat, or comma-separated): "
        "NAME 'id' for the ID one, any other name for an OOD one, e.g. --search id=val_id/ --search ood=val_ood/; "
        "never a test set",
    )
    p.add_argument(
        "--search-metric", choices=SEARCH_METRICS, default="fpr95", help="what --search optimises (mean over OOD sets)"
    )
    p.add_argument("--out", required=True, help="output folder (table, JSON, CSV, PNG, cache)")
    p.add_argument("--cache-dir", help="logits/features cache folder (default OUT/cache)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", choices=("squash", "crop"), default="squash")
    p.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    p.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, help="loader workers (default: up to 8 on GPU)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="autocast for the backbone; auto: bf16 on a GPU, fp32 on a CPU",
    )
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--tpr", type=float, default=0.95)
    p.add_argument("--positive", choices=("id", "ood"), default="id")
    p.add_argument("--fpr-rule", choices=("nearest", "first"), default="nearest")
    p.add_argument("--aupr", choices=("ap", "trapezoid"), default="ap")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow model files that need pickle to load (it can run code stored in the file): "
        "only for files you trust",
    )
    return p


def split_scores(s: str | None):
    """'msp,energy:temperature=2,odin:temperature=1000,eps=0.001' -> specs: a comma-separated piece
    of the form key=value (no ':') continues the previous spec's parameters; ';' always separates."""
    if not s:
        return None
    out = []
    for group in s.split(";"):
        start = len(out)
        for piece in (p.strip() for p in group.split(",")):
            if not piece:
                continue
            if len(out) > start and "=" in piece and ":" not in piece:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def _ood_sets(items) -> dict:
    ood = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--ood expects NAME=PATH, got {item!r}")
        if name in ood:
            raise ValueError(f"OOD set {name!r} given twice")
        ood[name] = path
    return ood


def _search_sets(items) -> dict | None:
    """--search values ('id=val/', 'id=val/,ood=val_ood/') -> {name: path}; a comma-separated piece
    without '=' belongs to the previous path (a path holding a comma)."""
    pieces = []
    for item in items:
        for piece in item.split(","):
            if not piece.strip():
                continue
            if pieces and "=" not in piece:
                pieces[-1] += "," + piece
            else:
                pieces.append(piece)
    out = {}
    for piece in pieces:
        name, eq, path = piece.strip().partition("=")
        if not eq or not name or not path:
            raise ValueError(
                f"--search expects NAME=PATH (NAME: 'id' for the ID validation set, else an OOD one's name), "
                f"got {piece!r}"
            )
        if name in out:
            raise ValueError(f"validation set {name!r} given twice in --search")
        out[name] = path
    return out or None


def config_from_args(args) -> EvalConfig:
    """The EvalConfig of a `mosx eval` command line (the --model run; --flat-model is built from it)."""
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    class_names = None
    if args.classes:
        with open(args.classes) as f:
            class_names = [ln.strip() for ln in f if ln.strip()]
    return EvalConfig(
        model=args.model,
        arch=args.arch,
        weights=args.weights,
        num_classes=args.num_classes,
        trust_pickle=args.trust_pickle,
        id_data=args.id,
        ood_data=_ood_sets(args.ood),
        groups=args.groups,
        scores=split_scores(args.scores),
        fit_data=args.fit_data,
        fit_on_id=args.fit_on_id,
        class_names=class_names,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        resize=args.resize,
        mean=args.mean,
        std=args.std,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        precision=args.precision,
        channels_last=not args.no_channels_last,
        tpr=args.tpr,
        positive=args.positive,
        fpr_rule=args.fpr_rule,
        aupr=args.aupr,
        search=_search_sets(args.search),
        search_metric=args.search_metric,
        plots=not args.no_plots,
        progress=not args.no_progress,
    )


def _grouped_and_flat(cfg: EvalConfig, args) -> None:
    """--model and --flat-model scored in one run, one table (methods side by side)."""
    model, groups, class_names, in_chans = resolve_model(cfg)
    flat_cfg = replace(
        cfg, model=args.flat_model, arch=args.flat_arch, weights=args.flat_weights, groups=None, class_names=None
    )
    flat, flat_groups, flat_names, flat_chans = resolve_model(flat_cfg)
    if flat_groups is not None:
        raise ValueError("--flat-model holds a grouped model; give the flat baseline there")
    if class_names is not None and flat_names is not None and list(flat_names) != list(class_names):
        raise ValueError("--flat-model's class list differs from --model's")
    if flat_chans != in_chans:
        raise ValueError(f"--model takes {in_chans}-channel images but --flat-model takes {flat_chans}")
    cache = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    runs = {}
    for label, (m, g, sc) in {
        "grouped" if groups is not None else "model": (model, groups, cfg.scores),
        "flat": (flat, None, split_scores(args.flat_scores)),
    }.items():
        runs[label] = evaluate(
            replace(
                cfg,
                model=m,
                groups=g,
                class_names=class_names,
                in_chans=in_chans,
                scores=sc,
                out_dir=None,
                cache_dir=cache,
                plots=False,
                verbose=False,
            )
        )
    if runs["flat"] is None:  # not rank 0
        return
    res = combine(runs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    fit = cfg.fit_data or ("id (optimistic)" if cfg.fit_on_id else None)
    settings = {**cfg.describe(), "flat_model": args.flat_model, "flat_scores": args.flat_scores}
    res.files = write_outputs(
        res,
        cfg.out_dir,
        cfg.tpr,
        dict(positive=cfg.positive, fpr_rule=cfg.fpr_rule, aupr=cfg.aupr, fit=fit),
        cfg.plots,
        settings,
    )
    print(res.summary(cfg.tpr))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.flat_model:
            _grouped_and_flat(cfg, args)
        else:
            evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"mosx eval: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        advice = "The cache keeps every array written in full: free space, then rerun the same command."
        return disk_full_exit("mosx eval", e, advice)
    return 0
