"""Hyperparameter search on validation data only: :func:`search` grid-searches a scorer's
:meth:`~mosx.scores.Scorer.search_space` (or a given grid) from cached validation logits / features
(the dicts :func:`~mosx.scores.score_all` takes; no backbone rerun), and refuses to run when a
validation set is also one of the test sets.

Input-perturbation magnitudes (``eps`` of ODIN / Mahalanobis) are searched by
:func:`~mosx.scores.select_eps`, which needs the model and the validation inputs.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .base import Scorer
from .batching import fit_all, score_all
from .eps_search import select_eps

# metric name -> (OODMetrics field, True when lower is better)
METRICS = {
    "fpr95": ("fpr_at_tpr", True),
    "fpr_at_tpr": ("fpr_at_tpr", True),
    "auroc": ("auroc", False),
    "aupr_in": ("aupr_in", False),
    "aupr_out": ("aupr_out", False),
    "detection_error": ("detection_error", True),
}


@dataclass
class SearchResult:
    """What :func:`search` chose and saw. `grid`: one entry per evaluated point, in grid order:
    ``{"params": {...}, "value": mean metric over the OOD validation sets, "metrics": {ood set:
    OODMetrics.as_dict()}}``, or ``{"params", "value": None, "skipped": reason}`` for a point the fit
    data cannot support (e.g. knn's k above the number of fit rows)."""

    scorer: Scorer  # the scorer with the chosen values (fitted)
    params: dict  # the chosen values
    metric: str
    value: float  # its metric (mean over the OOD validation sets)
    grid: list = field(default_factory=list)
    val_sets: dict = field(default_factory=dict)  # name -> identity fingerprint of each validation set

    def as_dict(self) -> dict:
        """JSON-ready record of the search (for the results file)."""
        return {
            "scorer": self.scorer.name,
            "metric": self.metric,
            "params": dict(self.params),
            "value": self.value,
            "grid": [dict(g) for g in self.grid],
            "val_sets": dict(self.val_sets),
        }


# ------------------------------------------------------------------------------ set identities
class _Files:
    """A set given by a path (folder, list file, single file) or a list of paths: its files."""

    def __init__(self, spec):
        items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        self.roots = {os.path.realpath(os.fspath(p)) for p in items}
        files = []
        for p in items:
            files.extend(_files_of(os.fspath(p)))
        self.files = {os.path.realpath(f): os.path.getsize(f) for f in files}
        common = os.path.commonpath(list(self.files)) if self.files else ""
        self.listing = sorted((os.path.relpath(f, common) if common else f, s) for f, s in self.files.items())

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.listing).encode())
        return "files:" + h.hexdigest()

    def clash(self, other: _Files):
        shared = set(self.files) & set(other.files)
        if shared:
            return f"they share {len(shared)} file(s), e.g. {sorted(shared)[0]}"
        for a in self.roots:
            for b in other.roots:
                if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
                    return f"the paths overlap ({a} and {b})"
        if self.listing and self.listing == other.listing:
            return f"they hold identical file lists ({len(self.listing)} files)"
        same = _same_content(self.files, other.files)
        if same:
            return f"{same[0]} file(s) have identical content, e.g. {same[1]} and {same[2]}"
        return None


def _files_of(path: str) -> list:
    if not os.path.exists(path):
        raise ValueError(f"search: the set path {path!r} does not exist")
    try:  # the evaluator's reader: the images a folder or a list file names
        from ..evaluate.images import image_list

        il = image_list(path, "set", labeled=False)
        if il.paths:
            return [p for p in il.paths if os.path.isfile(p)]
    except Exception:  # not an image set: take the files as they are
        pass
    if os.path.isfile(path):
        return [path]
    out = []
    for dirpath, _, names in sorted(os.walk(path)):
        out.extend(os.path.join(dirpath, n) for n in sorted(names))
    return out


def _same_content(a: dict, b: dict):
    """(count, file in a, file in b) of files with byte-identical content (hashed only where sizes meet)."""
    by_size = {}
    for f, s in b.items():
        by_size.setdefault(s, []).append(f)
    hashes = {}

    def digest(f):
        if f not in hashes:
            with open(f, "rb") as fh:
                hashes[f] = hashlib.sha256(fh.read()).digest()
        return hashes[f]

    found = []
    for f, s in a.items():
        for g in by_size.get(s, ()):
            if digest(f) == digest(g):
                found.append((f, g))
                break
    return (len(found), *found[0]) if found else None


class _Data:
    """A set given by its data (tensors / arrays, or a dict of them): one sha256 per array."""

    def __init__(self, x):
        import numpy as np

        self.hashes = set()
        for v in x.values() if isinstance(x, Mapping) else [x]:
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().contiguous().numpy()
            if isinstance(v, np.ndarray) or hasattr(v, "__array__"):
                a = np.ascontiguousarray(np.asarray(v))
                h = hashlib.sha256(f"{a.dtype}:{a.shape}".encode())
                h.update(a.tobytes())
                self.hashes.add(h.hexdigest())
        if not self.hashes:
            raise ValueError("search: a set given as data holds no tensor or array")

    def fingerprint(self) -> str:
        return "data:" + hashlib.sha256(" ".join(sorted(self.hashes)).encode()).hexdigest()

    def clash(self, other: _Data):
        return "they hold an identical array" if self.hashes & other.hashes else None


def _identity(x):
    """(kind, object): "files" for paths, "data" for tensors / arrays / dicts of them, "id" for any
    other string (an opaque fingerprint, e.g. from :func:`fingerprint`)."""
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, os.PathLike)) for p in x):
        return "files", _Files(x)
    if isinstance(x, os.PathLike) or (isinstance(x, str) and os.path.exists(x)):
        return "files", _Files(x)
    if isinstance(x, str):
        return "id", x
    if isinstance(x, (torch.Tensor, Mapping)) or hasattr(x, "__array__"):
        return "data", _Data(x)
    raise TypeError(
        f"search: a set identity is a path, a list of paths, a fingerprint string or the set's "
        f"data, got {type(x).__name__}"
    )


def fingerprint(x) -> str:
    """A string that identifies a set: for paths, a hash of its sorted (relative path, size) file list;
    for data (tensors, arrays, dicts of them), a hash of the bytes. Pass it in `test_sets` /
    `val_sets` of :func:`search` when the set itself is not at hand."""
    kind, obj = _identity(x)
    return obj if kind == "id" else obj.fingerprint()


def _check_disjoint(val: dict, test: dict) -> dict:
    """Raise ValueError when a validation set is one of the test sets; returns the val fingerprints."""
    vals = {n: _identity(v) for n, v in val.items()}
    tests = {n: _identity(v) for n, v in test.items()}
    for vn, (vk, vo) in vals.items():
        for tn, (tk, to) in tests.items():
            v_fp = vo if vk == "id" else vo.fingerprint()
            t_fp = to if tk == "id" else to.fingerprint()
            why = None
            if vk == tk and vk != "id":
                why = vo.clash(to)
            elif v_fp == t_fp:
                why = "they have the same fingerprint"
            elif {vk, tk} == {"files", "data"}:
                raise ValueError(
                    f"search: cannot compare validation set {vn!r} (given as {vk}) with test set "
                    f"{tn!r} (given as {tk}): identify both by path or both by data"
                )
            if why:
                raise ValueError(
                    f"search: validation set {vn!r} is also test set {tn!r}: {why}. "
                    "Hyperparameters chosen on a test set overstate its results; "
                    "search on held-out validation data"
                )
    return {n: (o if k == "id" else o.fingerprint()) for n, (k, o) in vals.items()}


# ------------------------------------------------------------------------------ the search
def _points(space: dict):
    keys = list(space)
    for k in keys:
        vals = list(space[k])
        if not vals:
            raise ValueError(f"search: no candidate values for {k!r}")
    for combo in itertools.product(*(list(space[k]) for k in keys)):
        yield dict(zip(keys, combo))


def search(
    scorer: Scorer,
    id_val: Mapping,
    ood_val: Mapping,
    metric: str = "fpr95",
    *,
    test_sets: Mapping,
    val_sets: Mapping | None = None,
    grid: Mapping | None = None,
    fit_data: Mapping | None = None,
    model: torch.nn.Module | None = None,
    tpr: float = 0.95,
    positive: str = "id",
    fpr_rule: str = "nearest",
    aupr: str = "ap",
    device=None,
    batch_size: int = 65536,
) -> SearchResult:
    """Grid-search `scorer`'s hyperparameters on validation data and return the best point.

    Args:
        scorer: the scorer to tune (a wrapper's ``base.<name>`` keys reach the wrapped scorer).
        id_val: the ID validation set's cached data, as :func:`score_all` takes it (``logits``,
            ``features``, ``head``; ``inputs`` for an eps search).
        ood_val: one OOD validation set's data, or {name: data} for several (the metric is averaged).
        metric: "fpr95" (= "fpr_at_tpr" at `tpr`, lowest wins), "auroc", "aupr_in", "aupr_out"
            (highest wins) or "detection_error" (lowest wins). Ties go to the earlier grid point.
        test_sets: {name: identity} of every test set the results will be reported on (required;
            ``{}`` only when there is none). An identity is a path (folder or list file), a list of
            paths, the set's data (a tensor / array / dict of them) or a :func:`fingerprint` string.
        val_sets: {name: identity} of the validation sets (one per set: the ID set first, then the
            OOD sets). Default: the fingerprints of the validation data themselves.
        grid: {parameter: candidate values} instead of ``scorer.search_space()``; ``eps`` is
            searched by :func:`select_eps` (needs `model` and ``inputs`` in the validation data).
        fit_data: ID fit data (as :func:`fit_all` takes it). Scorers with fitted statistics are
            refitted on it at every grid point, so that no statistic fitted under another value is kept.
        model: the model, for an eps search.
        tpr, positive, fpr_rule, aupr: as :func:`mosx.metrics.ood_metrics`.

    Raises ValueError when a validation set is also a test set (same path, overlapping paths, a
    shared file, identical file lists, a file of identical content, or the same data).
    Returns a :class:`SearchResult`.
    """
    from ..metrics import ood_metrics

    if metric not in METRICS:
        raise ValueError(f"search: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    field_name, lower = METRICS[metric]
    if not isinstance(ood_val, Mapping) or not ood_val:
        raise ValueError("search: ood_val must be a data dict or {name: data dict}")
    multi = all(isinstance(v, Mapping) for v in ood_val.values())
    oods = dict(ood_val) if multi else {"ood": ood_val}
    if not isinstance(test_sets, Mapping):
        raise TypeError("search: test_sets must be a mapping {name: path / data / fingerprint}")
    if val_sets is None:
        val_sets = {"id": id_val, **oods}
    elif not isinstance(val_sets, Mapping) or len(val_sets) != 1 + len(oods):
        raise ValueError(f"search: val_sets must name {1 + len(oods)} sets (the ID validation set and each OOD one)")
    val_ids = _check_disjoint(dict(val_sets), dict(test_sets))

    space = dict(grid) if grid is not None else dict(getattr(scorer, "search_space", lambda: {})())
    eps_grid = [float(e) for e in space.pop("eps")] if "eps" in space else None
    if eps_grid is not None:
        if not eps_grid:
            raise ValueError("search: no candidate values for 'eps'")
        if (tpr, positive, fpr_rule, aupr) != (0.95, "id", "nearest", "ap"):
            raise ValueError("search: an eps search (select_eps) uses the default metric options")
        if model is None or id_val.get("inputs") is None or any(d.get("inputs") is None for d in oods.values()):
            raise ValueError("search: an eps grid needs `model` and `inputs` in every validation set")

    def metrics_of(s):
        ids = score_all({"s": s}, id_val, batch_size=batch_size, device=device)["s"]
        return {
            o: ood_metrics(
                ids,
                score_all({"s": s}, d, batch_size=batch_size, device=device)["s"],
                tpr=tpr,
                positive=positive,
                fpr_rule=fpr_rule,
                aupr=aupr,
            )
            for o, d in oods.items()
        }

    rows, best = [], None
    for point in _points(space):
        s = scorer.replace(**point)
        if s.needs_fit:
            if fit_data is None:
                raise ValueError(
                    f"search: {scorer.name} is fitted on ID statistics: give fit_data to refit it at every grid point"
                )
            try:
                fit_all({"s": s}, fit_data, device=device)
            except ValueError as e:
                # a point the data cannot support (k larger than the fit set, dim past the feature
                # width): recorded with its reason in the grid, never chosen
                rows.append({"params": point, "value": None, "skipped": str(e)})
                continue
        if eps_grid is None:
            candidates = [(point, s, metrics_of(s))]
        else:
            per_eps = {}
            for o, d in oods.items():
                _, res = select_eps(
                    lambda e, s=s: s.replace(eps=e), model, id_val["inputs"], d["inputs"], eps_grid, device=device
                )
                for e, m in res:
                    per_eps.setdefault(e, {})[o] = m
            candidates = [({**point, "eps": e}, s.replace(eps=e), ms) for e, ms in per_eps.items()]
        for p, sc, ms in candidates:
            value = sum(getattr(m, field_name) for m in ms.values()) / len(ms)
            rows.append({"params": p, "value": value, "metrics": {o: m.as_dict() for o, m in ms.items()}})
            if best is None or (value < best[0] if lower else value > best[0]):
                best = (value, p, sc)
    if best is None:
        reasons = sorted({r["skipped"] for r in rows if "skipped" in r})
        raise ValueError(f"search: no grid point of {scorer.name} could be fitted on this data: {'; '.join(reasons)}")
    value, params, chosen = best
    return SearchResult(chosen, dict(params), metric, float(value), rows, val_ids)
