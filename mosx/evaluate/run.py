"""The evaluation itself, top-down: check everything before any work (`plan`), fill the cache with one
backbone pass per image set (`cache_sets`), fit the fitted scorers, tune them on the validation sets
when asked (`search`), score every set from the cache, then metrics and ID accuracy (`score_sets`)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .. import metrics as M
from .. import scores as S
from ..groups import Groups
from ..models import load_model
from ..ops import group_predict
from ..runtime import Runtime
from ..scores.search import METRICS, _check_disjoint
from .backbone import perturbed_scores
from .cache import Cached, cache_set, model_fingerprint
from .config import EvalConfig
from .image_fit import check_image_fit, fit_on_images, needs_image_fit
from .images import ImageDataset, ImageList, as_images, make_transform
from .report import EvalResult, write_outputs

SEARCH_METRICS = tuple(METRICS)  # the metrics a search can optimise (--search-metric)

__all__ = ["evaluate", "resolve_model", "ResolvedModel", "default_scores"]


def default_scores(grouped: bool, have_fit: bool) -> list:
    """The scorers run when none are named: MOS for a grouped model, the baselines for a flat one."""
    if grouped:
        return ["mos"]
    out = ["msp", "maxlogit", "energy", "odin:temperature=1000", "gradnorm"]
    if have_fit:
        out += ["kl_matching", "mahalanobis", "react-energy"]
    return out


class ResolvedModel(NamedTuple):
    model: torch.nn.Module
    groups: Groups | None
    class_names: list | None
    in_chans: int  # image channels the model takes (1: grey images)


def resolve_model(cfg: EvalConfig) -> ResolvedModel:
    """The model of a config, loaded when it is a path or a name, with the grouping, class list and
    input channels of a mosx model file checked against the config's (the config's win when the
    file does not know them)."""
    groups = Groups.parse(cfg.groups, need_data=False) if cfg.groups is not None else None
    class_names = list(cfg.class_names) if cfg.class_names is not None else None
    if isinstance(cfg.model, torch.nn.Module):
        return ResolvedModel(cfg.model, groups, class_names, cfg.in_chans or 3)
    model, info = load_model(
        cfg.model, arch=cfg.arch, weights=cfg.weights, num_classes=cfg.num_classes, trust_pickle=cfg.trust_pickle
    )
    stored = info.get("groups")
    if groups is not None and stored is not None and groups != stored:
        raise ValueError("groups (--groups) differ from the grouping stored in the model file")
    stored_names = info.get("class_names")
    if class_names is not None and stored_names is not None and class_names != list(stored_names):
        raise ValueError(
            f"--classes ({len(class_names)} names) does not match the class list stored in "
            f"{cfg.model} ({len(stored_names)} names)"
        )
    stored_chans = info.get("in_chans")
    if cfg.in_chans is not None and stored_chans is not None and cfg.in_chans != stored_chans:
        raise ValueError(f"in_chans={cfg.in_chans} but {cfg.model} takes {stored_chans}-channel images")
    return ResolvedModel(
        model,
        groups if groups is not None else stored,
        class_names if class_names is not None else stored_names,
        cfg.in_chans or stored_chans or 3,
    )


@dataclass
class _Plan:
    """Everything an evaluation needs, resolved and checked before the first backbone pass."""

    cfg: EvalConfig
    model: torch.nn.Module
    head: S.LinearHead | None
    groups: Groups | None
    id_images: ImageList
    ood_images: dict
    fit_images: ImageList | None
    val_images: dict  # search: {"id": ImageList, ood name: ImageList}; {} without a search
    search_sets: tuple | None  # search: (validation, test) set identities, as mosx.scores.search takes them
    scorers: dict
    transform: object
    transform_key: str
    shape: tuple
    device: torch.device
    precision: str
    workers: int


def evaluate(config_or_model, id_data=None, ood_data=None, **options) -> EvalResult | None:
    """Score an ID set and named OOD sets with every requested method (see :mod:`mosx.evaluate`).

    Call it with an :class:`EvalConfig`, or as ``evaluate(model, id_data, ood_data, **options)`` with
    the config's fields as keyword arguments (an unknown keyword is an error).
    Returns the EvalResult on rank 0 (None on other ranks).
    """
    if isinstance(config_or_model, EvalConfig):
        if id_data is not None or ood_data is not None or options:
            raise TypeError("evaluate: give either an EvalConfig or (model, id_data, ood_data, **options), not both")
        cfg = config_or_model
    else:
        unknown = sorted(set(options) - set(EvalConfig.field_names()))
        if unknown:
            raise TypeError(f"evaluate: unknown option(s) {', '.join(unknown)}")
        cfg = EvalConfig(model=config_or_model, id_data=id_data, ood_data=ood_data, **options)
    plan = _plan(cfg)
    rt = Runtime.setup(plan.device)
    try:
        return _run(plan, rt)
    finally:
        rt.close()


def _plan(cfg: EvalConfig) -> _Plan:
    """Every check before any work."""
    if not cfg.ood_data:
        raise ValueError("evaluate: give at least one OOD set")
    if cfg.out_dir is None and cfg.cache_dir is None:
        raise ValueError("evaluate: give out_dir or cache_dir (the logits/features cache lives on disk)")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"evaluate: precision must be auto, bf16, fp16 or fp32, got {cfg.precision!r}")
    M._check_options("evaluate", cfg.positive, cfg.fpr_rule, cfg.aupr)
    model, g, class_names, in_chans = resolve_model(cfg)
    device = cfg.device
    if device is None:  # under torchrun each rank takes its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    id_images = as_images(cfg.id_data, "id", g)
    ood_images = {name: as_images(spec, name, g, labeled=False) for name, spec in cfg.ood_data.items()}
    for name, im in ood_images.items():
        if len(im) == 0:
            raise ValueError(f"evaluate: OOD set {name!r} is empty")
    if "id" in ood_images:
        raise ValueError("evaluate: 'id' is reserved for the ID set; rename that OOD set")
    _check_class_names(class_names, id_images, g)
    have_fit = cfg.fit_data is not None or cfg.fit_on_id
    scorers = _build_scorers(cfg.scores, g, have_fit)
    fit_images = as_images(cfg.fit_data, "fit", g) if cfg.fit_data is not None else None
    val_images, search_sets = _plan_search(cfg, g, id_images, ood_images, scorers)
    check_image_fit(scorers, fit_images, val_images.get("id"), class_names or id_images.class_names)

    model = model.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
    head = None
    try:
        head = S.linear_head(model)
    except ValueError:
        pass
    transform = cfg.transform
    if transform is None:
        transform = make_transform(cfg.image_size, cfg.resize, cfg.mean, cfg.std, in_chans=in_chans)
        transform_key = f"size={cfg.image_size},resize={cfg.resize},mean={tuple(cfg.mean)},std={tuple(cfg.std)}"
        if in_chans != 3:
            transform_key += f",in_chans={in_chans}"
    else:
        transform_key = repr(transform)
    if cfg.tensor_transform is not None:
        transform_key += f"|tensor:{cfg.tensor_transform!r}"
    # Output width against the grouping, before the pass: from the head, else one probe image.
    x0, _, ok0 = ImageDataset(id_images, transform, (in_chans, cfg.image_size, cfg.image_size), cfg.tensor_transform)[0]
    shape = tuple(x0.shape)
    width = head.weight.shape[0] if head is not None else None
    if width is None and ok0:
        with torch.no_grad():
            width = S.model_outputs(model, x0[None].to(dev))[0].shape[1]
    if g is not None and width is not None and width != g.num_logits:
        raise ValueError(
            f"evaluate: the model outputs {width} logits but the grouping needs {g.num_logits} "
            f"({g.num_classes} classes + {g.num_groups} others slots)"
        )
    if g is None and id_images.class_names is not None and width is not None and width != len(id_images.class_names):
        raise ValueError(
            f"evaluate: the model outputs {width} logits but the ID folder has {len(id_images.class_names)} classes"
        )
    classes = g.num_classes if g is not None else width
    if classes is not None:  # labels against the model before anything is sized by them
        for name, im in (("ID", id_images), ("fit", fit_images)):
            bad = [v for v in (im.labels if im is not None else ()) if v >= classes or v < -1]
            if bad:
                raise ValueError(
                    f"evaluate: {name} label {bad[0]} is not a class of the model ({classes} classes: "
                    f"labels are 0..{classes - 1}, or -1 for unknown); {len(bad)} such label(s)"
                )
    workers = cfg.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else min(4, max(0, (os.cpu_count() or 1) - 1))
    return _Plan(
        cfg,
        model,
        head,
        g,
        id_images,
        ood_images,
        fit_images,
        val_images,
        search_sets,
        scorers,
        (transform, cfg.tensor_transform),
        transform_key,
        shape,
        dev,
        precision,
        workers,
    )


def _check_class_names(class_names, id_images: ImageList, g: Groups | None) -> None:
    found = id_images.class_names
    if class_names is not None and found is not None and list(class_names) != list(found):
        diff = next(
            i
            for i, (a, b) in enumerate(zip(list(class_names) + [None] * len(found), found + [None] * len(class_names)))
            if a != b
        )
        raise ValueError(
            f"evaluate: the model's class list ({len(class_names)} classes) does not match the ID folder's "
            f"({len(found)}); first difference at index {diff}: "
            f"{(list(class_names) + [None])[min(diff, len(class_names))]!r} vs "
            f"{(found + [None])[min(diff, len(found))]!r}"
        )
    if g is not None and found is not None and len(found) != g.num_classes:
        raise ValueError(f"evaluate: the grouping has {g.num_classes} classes but the ID folder has {len(found)}")


def _build_scorers(scores, g: Groups | None, have_fit: bool) -> dict:
    """{name: Scorer} from specs or Scorer objects, each checked against the model and the data."""
    specs = list(scores) if scores is not None else default_scores(g is not None, have_fit)
    out = {}
    for spec in specs:
        s = spec if isinstance(spec, S.Scorer) else S.build_scorer(str(spec), groups=g)
        name = spec if isinstance(spec, str) else s.name
        if name in out:
            name = repr(s) if repr(s) not in out else f"{name} #{len(out)}"
        # (a scorer fitted on images through the model is checked in _plan: image_fit.py)
        if s.needs_fit and not have_fit and "inputs" not in s.fit_needs:
            raise ValueError(
                f"evaluate: scorer {name!r} is fitted on ID statistics: give fit_data "
                "(--fit-data) or fit_on_id=True (--fit-on-id)"
            )
        base = s.base if s.is_wrapper else s  # a feature-shaping wrapper scores through its base
        if g is not None and not isinstance(base, S.MOS) and (s.is_wrapper or "logits" in s.needs):
            raise ValueError(
                f"evaluate: scorer {name!r} reads flat class logits but the model is grouped "
                f"({g.num_logits} = classes + others slots); evaluate a flat model for it"
            )
        if isinstance(base, S.MOS) and g is None:
            raise ValueError("evaluate: the mos score needs the model's grouping (groups / --groups)")
        out[name] = s
    return out


def _plan_search(cfg: EvalConfig, g: Groups | None, id_images: ImageList, ood_images: dict, scorers: dict) -> tuple:
    """The validation sets of a search and their identities, checked before any work: an ID one and
    an OOD one at least, none of them a test set, every search space one the cache can serve.
    Returns ({name: ImageList}, (validation identities, test identities)); ({}, None) without a search."""
    if not cfg.search:
        return {}, None
    # An OOD validation set is needed by the scorers with a search space; the image-fitted ones
    # (mahalanobis_layers) tune on the ID validation set and its FGSM versions alone.
    image_fit = any(needs_image_fit(s) for s in scorers.values())
    need_ood = not image_fit or any(s.search_space() for s in scorers.values())
    if not isinstance(cfg.search, Mapping) or "id" not in cfg.search or (need_ood and len(cfg.search) < 2):
        raise ValueError(
            "evaluate: search (--search) needs the ID validation set as 'id' and at least one OOD "
            "validation set, e.g. {'id': 'val_id/', 'ood': 'val_ood/'} (--search id=val_id/ --search ood=val_ood/)"
        )
    if cfg.search_metric not in SEARCH_METRICS:
        raise ValueError(
            f"evaluate: search_metric must be one of {', '.join(SEARCH_METRICS)}, got {cfg.search_metric!r}"
        )
    clash = sorted(set(ood_images) & {f"val:{n}" for n in cfg.search})
    if clash:
        raise ValueError(f"evaluate: OOD set name {clash[0]!r} is the name of a validation set; rename it")
    for m, s in scorers.items():
        space = s.search_space()
        if space and ("eps" in space or "inputs" in s.needs):
            raise ValueError(
                f"evaluate: cannot search scorer {m!r} from the cache: it perturbs the input (eps), which "
                "needs the model and the validation images; fix eps, or tune it with mosx.scores.search "
                "(model=..., inputs in the validation data)"
            )
    val_images = {}
    for name, spec in cfg.search.items():
        val_images[name] = as_images(spec, f"val:{name}", g, labeled=name == "id" and image_fit)
        if len(val_images[name]) == 0:
            raise ValueError(f"evaluate: validation set {name!r} is empty")
    val_sets = {"id": _set_identity(cfg.search["id"], val_images["id"])}
    val_sets.update({n: _set_identity(cfg.search[n], im) for n, im in val_images.items() if n != "id"})
    test_sets = {"id": _set_identity(cfg.id_data, id_images)}
    test_sets.update({n: _set_identity(cfg.ood_data[n], im) for n, im in ood_images.items()})
    _check_disjoint(val_sets, test_sets)  # here, before the backbone runs; search() checks again
    return val_images, (val_sets, test_sets)


def _set_identity(spec, images: ImageList):
    """What mosx.scores.search compares to tell a validation set from a test set: the path given, an
    ImageList's image files, or the image tensor of an in-memory set."""
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    if images.paths is not None:
        return list(images.paths)
    ds = images.dataset
    held = ds.tensors[0] if isinstance(ds, torch.utils.data.TensorDataset) else getattr(ds, "images", None)
    if isinstance(held, torch.Tensor):
        return {"images": held}
    raise ValueError(
        f"evaluate: search cannot tell whether set {images.name!r} ({type(ds).__name__}) is a validation or a "
        "test set: give it as a folder, a list file or a dataset holding its images as a tensor"
    )


def _run(p: _Plan, rt: Runtime) -> EvalResult | None:
    cfg = p.cfg
    cache_root = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    if rt.main:
        os.makedirs(cache_root, exist_ok=True)
        if cfg.out_dir:
            os.makedirs(cfg.out_dir, exist_ok=True)
    rt.barrier()
    opts = dict(
        batch_size=cfg.batch_size,
        workers=p.workers,
        device=p.device,
        precision=p.precision,
        channels_last=cfg.channels_last,
        progress=cfg.progress and (rt.main or rt.world > 1),
    )
    sets = {"id": p.id_images, **p.ood_images}
    if p.fit_images is not None:
        sets["fit"] = p.fit_images
    sets.update({f"val:{n}": im for n, im in p.val_images.items()})
    caches, ips = _cache_sets(p, rt, sets, cache_root, opts)
    _check_readable(rt, caches)
    timings = {}
    _fit(p, rt, caches, timings)
    searched = _search(p, rt, caches)
    searched.update(fit_on_images(p, rt, timings))  # mahalanobis_layers: the reference's tuning
    perturbed = _perturbed(p, rt, sets, opts, timings)
    if not rt.main:
        return None
    score_sets = _score_sets(p, caches, perturbed, timings)
    metrics, averages = {}, {}
    for m, per in score_sets.items():
        metrics[m] = {
            o: M.ood_metrics(
                per["id"], per[o], tpr=cfg.tpr, positive=cfg.positive, fpr_rule=cfg.fpr_rule, aupr=cfg.aupr
            )
            for o in p.ood_images
        }
        vals = list(metrics[m].values())
        averages[m] = {
            k: float(np.mean([getattr(v, k) for v in vals]))
            for k in ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "detection_error")
        }
    unreadable = {n: c.meta["unreadable"] for n, c in caches.items()}
    counts = {n: int(c.ok.sum()) for n, c in caches.items()}
    res = EvalResult(
        metrics,
        averages,
        _id_accuracy(caches["id"], p.groups),
        p.groups is not None,
        ips,
        timings,
        unreadable,
        counts,
        scores={m: {s: v.numpy() for s, v in per.items()} for m, per in score_sets.items()},
        search=searched,
    )
    for n, bad in unreadable.items():
        if bad:
            warnings.warn(f"{n}: {len(bad)} unreadable image(s) skipped, e.g. {bad[0]}")
    if cfg.out_dir:
        fit = "fit_data" if p.fit_images is not None else ("id (optimistic)" if cfg.fit_on_id else None)
        res.files = write_outputs(
            res,
            cfg.out_dir,
            cfg.tpr,
            dict(positive=cfg.positive, fpr_rule=cfg.fpr_rule, aupr=cfg.aupr, fit=fit),
            cfg.plots,
            cfg.describe(),
        )
    if cfg.verbose:
        print(res.summary(cfg.tpr))
    return res


def _cache_sets(p: _Plan, rt: Runtime, sets: dict, cache_root: str, opts: dict) -> tuple:
    """The cache of every set (one backbone pass each where missing) and the backbone's images/s."""
    fp = model_fingerprint(p.model)
    caches, backbone_s, ran = {}, 0.0, 0
    for name, images in sets.items():
        c, sec, cnt = cache_set(
            p.model,
            images,
            p.transform[0],
            p.transform_key,
            p.shape,
            cache_root,
            fp,
            rt,
            opts,
            tensor_transform=p.transform[1],
        )
        caches[name] = c
        backbone_s += sec
        ran += cnt
    # images/s over all ranks: images run everywhere over the slowest rank's time
    if rt.world > 1:
        t = torch.tensor([float(ran), backbone_s], dtype=torch.float64, device=rt.collective_device)
        mx = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        ran, backbone_s = int(t[0]), float(mx[1])
    return caches, (ran / backbone_s if ran and backbone_s > 0 else None)


def _check_readable(rt: Runtime, caches: dict) -> None:
    """Stop, on every rank, when a set has no readable image (nothing to score)."""
    problem = None
    if rt.main:
        for name, c in caches.items():
            if len(c.ok) and not c.ok.any():
                bad = c.meta["unreadable"]
                problem = f"evaluate: none of the {len(bad)} images of set {name!r} could be read (e.g. {bad[0]})"
                break
    if rt.world > 1:
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise ValueError(problem)


def _data_of(c: Cached, head) -> dict:
    """A cached set as scorer inputs (rows of unreadable images dropped)."""
    keep = np.flatnonzero(c.ok)
    all_ok = len(keep) == len(c.ok)
    pick = (lambda a: a) if all_ok else (lambda a: a[keep])
    return {
        "logits": pick(c.logits),
        "features": pick(c.features),
        "labels": torch.from_numpy(np.asarray(pick(c.labels))),
        "head": head,
    }


def _fit_data(p: _Plan, caches: dict) -> dict | None:
    """The fit set's (or, with fit_on_id, the ID set's) cache as fit data; None when there is none."""
    fit_src = caches.get("fit") if p.fit_images is not None else (caches["id"] if p.cfg.fit_on_id else None)
    if fit_src is None:
        return None
    d = _data_of(fit_src, p.head)
    if (d["labels"] < 0).any():
        d.pop("labels")  # unlabelled fit data: Mahalanobis uses predicted classes
    return d


def _fit(p: _Plan, rt: Runtime, caches: dict, timings: dict) -> None:
    """Fit the scorers fitted on ID statistics, on rank 0, from the fit set's (or the ID set's) cache."""
    if not (rt.main and any(s.needs_fit for s in p.scorers.values())):
        return
    d = _fit_data(p, caches)
    if d is None:
        return
    for name, s in p.scorers.items():
        if s.needs_fit and "inputs" not in s.fit_needs:  # fitted on images: image_fit.fit_on_images
            t0 = time.perf_counter()
            S.fit_all({name: s}, d, device=p.device)
            timings[name] = time.perf_counter() - t0


def _search(p: _Plan, rt: Runtime, caches: dict) -> dict:
    """On rank 0, tune every scorer that has a search space on the validation sets' caches
    (:func:`mosx.scores.search`, refitting fitted scorers on the fit data at every point); the chosen,
    fitted scorer replaces the requested one. Returns {method: SearchResult.as_dict() plus
    "seconds", or None when the method has nothing to search}; {} without a search."""
    if not (p.val_images and rt.main):
        return {}
    cfg = p.cfg

    def val(name):
        d = _data_of(caches[f"val:{name}"], p.head)
        d.pop("labels")
        return d

    id_val = val("id")
    ood_val = {n: val(n) for n in p.val_images if n != "id"}
    fit_data = _fit_data(p, caches)
    val_sets, test_sets = p.search_sets
    out = {}
    for m, s in p.scorers.items():
        if not s.search_space():
            out[m] = None
            continue
        t0 = time.perf_counter()
        r = S.search(
            s,
            id_val,
            ood_val,
            cfg.search_metric,
            test_sets=test_sets,
            val_sets=val_sets,
            fit_data=fit_data,
            tpr=cfg.tpr,
            positive=cfg.positive,
            fpr_rule=cfg.fpr_rule,
            aupr=cfg.aupr,
            device=p.device,
        )
        p.scorers[m] = r.scorer
        out[m] = {**r.as_dict(), "seconds": time.perf_counter() - t0}
    return out


def _perturbed(p: _Plan, rt: Runtime, sets: dict, opts: dict, timings: dict) -> dict:
    """Scores of the scorers that perturb the input (ODIN / Mahalanobis with eps > 0): a gradient pass
    per set, sharded over ranks."""
    input_scorers = {k: v for k, v in p.scorers.items() if "inputs" in v.needs}
    out = {}
    if not input_scorers:
        return out
    if rt.world > 1:  # the statistics were fitted on rank 0
        box = [input_scorers if rt.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        input_scorers = box[0]
    for m, s in input_scorers.items():
        t0 = time.perf_counter()
        for set_name in ["id", *p.ood_images]:
            out.setdefault(m, {})[set_name] = perturbed_scores(
                p.model, sets[set_name], s, rt, opts, p.transform, p.shape, f"{m} {set_name}"
            )
        timings[m] = timings.get(m, 0.0) + time.perf_counter() - t0
    return out


def _score_sets(p: _Plan, caches: dict, perturbed: dict, timings: dict) -> dict:
    """{method: {set: scores}} for the ID set and every OOD set."""
    score_sets = {}
    cached_scorers = {k: v for k, v in p.scorers.items() if k not in perturbed}
    for set_name in ["id", *p.ood_images]:
        d = _data_of(caches[set_name], p.head)
        d.pop("labels")
        out = S.score_all(cached_scorers, d, device=p.device, timings=timings) if cached_scorers else {}
        keep = np.flatnonzero(caches[set_name].ok)
        for m in p.scorers:
            v = out[m] if m in out else torch.from_numpy(perturbed[m][set_name][keep])
            score_sets.setdefault(m, {})[set_name] = v
    return score_sets


def _id_accuracy(idc: Cached, g: Groups | None) -> float | None:
    """Top-1 accuracy on the ID set (None when it is unlabelled); group prediction for a grouped model."""
    keep = np.flatnonzero(idc.ok)
    labels = torch.from_numpy(np.asarray(idc.labels)[keep])
    if not (len(labels) and bool((labels >= 0).all())):
        return None
    z = torch.from_numpy(np.asarray(idc.logits)[keep]).float()
    pred = group_predict(z, g)[0] if g is not None else z.argmax(1)
    return float((pred == labels).double().mean())
