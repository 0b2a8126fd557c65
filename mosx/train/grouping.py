"""The groupings of the MOS paper, built for a data set: taxonomy (class -> group name), K-means over
class-mean features of the pretrained backbone, and random; plus a Groups JSON, a sizes list, or the
grouping a reference list file defines.

Spec strings (the --groups option) are read by mosx.Groups.parse, the same reader as mosx eval's:
groups.json | sizes:4,3,3 or 4,3,3 | a reference list file | a .npy of group sizes | taxonomy:FILE |
kmeans:K | random:K | list. The last four need the data and are built here (resolve_request).
"""

from __future__ import annotations

import json

import torch

from ..groups import GroupRequest, Groups

__all__ = ["resolve_groups", "resolve_request", "taxonomy_groups", "kmeans_groups", "random_groups", "kmeans"]


def taxonomy_groups(path: str, class_names) -> Groups:
    """From a taxonomy file: JSON {class name: group name}, or lines `<class name> <group name>`
    (group names may contain spaces; '#' starts a comment). Groups are numbered in the order their
    names first appear in the file."""
    with open(path) as f:
        text = f.read()
    mapping: dict[str, str] = {}
    if path.endswith(".json"):
        mapping = {str(k): str(v) for k, v in json.loads(text).items()}
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<class> <group>', got {line!r}")
            if parts[0] in mapping and mapping[parts[0]] != parts[1].strip():
                raise ValueError(f"{path}:{lineno}: class {parts[0]!r} given two groups")
            mapping[parts[0]] = parts[1].strip()
    missing = [c for c in class_names if c not in mapping]
    if missing:
        raise ValueError(f"{path}: no group for class(es) {missing[:5]} ({len(missing)} in all)")
    order: dict[str, int] = {}
    for g in mapping.values():
        order.setdefault(g, len(order))
    used = {mapping[c] for c in class_names}
    order = {g: i for i, g in enumerate(g for g in order if g in used)}
    return Groups.from_assignment([order[mapping[c]] for c in class_names], len(order))


def random_groups(num_classes: int, k: int, seed: int = 0) -> Groups:
    """Classes shuffled and dealt into k groups of near-equal size."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"random grouping: need 1 <= K <= {num_classes} classes, got K={k}")
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    assign = [0] * num_classes
    for pos, c in enumerate(perm):
        assign[c] = pos % k
    return Groups.from_assignment(assign, k)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Lloyd's K-means with k-means++ seeding on the rows of x; no cluster is left empty (an empty
    cluster takes the point farthest from its centre). Returns [N] cluster ids."""
    x = x.double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= K <= {n} points, got K={k}")
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        c = x[torch.multinomial(p, 1, generator=g)].squeeze(0)
        centres.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c = torch.stack(centres)
    assign = None
    for _ in range(iters):
        dist = torch.cdist(x, c)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for e in (counts == 0).nonzero().flatten().tolist():
            far = dist.gather(1, new[:, None]).squeeze(1)
            far[counts[new] <= 1] = -1  # do not empty another cluster
            j = int(far.argmax())
            counts[new[j]] -= 1
            new[j] = e
            counts[e] = 1
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        c = torch.zeros_like(c).index_add_(0, assign, x) / torch.bincount(assign, minlength=k)[:, None].to(x.dtype)
    return assign


def kmeans_groups(class_means: torch.Tensor, k: int, seed: int = 0) -> Groups:
    """Group classes by K-means over their mean feature vectors ([C, D])."""
    return Groups.from_assignment(kmeans(class_means, k, seed).tolist(), k)


@torch.no_grad()
def class_means(features_fn, data, per_class: int = 100, seed: int = 0) -> torch.Tensor:
    """[C, D] mean features of up to per_class samples of every class. features_fn(list of indices)
    returns their [n, D] features."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(data.targets)
    chosen = []
    for c in range(data.num_classes):
        idx = (targets == c).nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"kmeans grouping: class {c} ({data.class_names[c]}) has no sample")
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    order = torch.cat(chosen)
    feats = features_fn(order.tolist()).double()
    means = torch.zeros(data.num_classes, feats.shape[1], dtype=torch.float64)
    means.index_add_(0, targets[order], feats)
    return means / torch.bincount(targets[order], minlength=data.num_classes)[:, None]


def resolve_groups(spec, data, features_fn=None, seed: int = 0) -> Groups:
    """A Groups for `data` (needs .num_classes, .class_names, .list_groups, .targets) from a spec.

    The spec is read by :meth:`mosx.Groups.parse` (every form mosx eval takes too: a Groups, sizes
    `398,521,...` or `sizes:398,...`, a groups JSON, a reference list file, a `.npy` of group sizes);
    the forms that need the data (`kmeans:K`, `random:K`, `taxonomy:FILE`, `list`, and None = `list`)
    come back as a GroupRequest and are built here.
    """
    g = Groups.parse("list" if spec is None else spec)
    if isinstance(g, GroupRequest):
        g = resolve_request(g, data, features_fn, seed)
    if g.num_classes != data.num_classes:
        raise ValueError(f"the grouping has {g.num_classes} classes but the data have {data.num_classes}")
    return g


def resolve_request(req: GroupRequest, data, features_fn=None, seed: int = 0) -> Groups:
    """Build the grouping a GroupRequest asks for from the training data."""
    if req.kind == "list":
        if data.list_groups is None:
            raise ValueError(
                "the group loss needs a grouping: --groups groups.json | sizes:... | taxonomy:FILE | "
                "kmeans:K | random:K | a list file or a .npy of group sizes (or a list-file data set)"
            )
        return data.list_groups
    if req.kind == "taxonomy":
        return taxonomy_groups(req.path, data.class_names)
    if req.kind == "random":
        return random_groups(data.num_classes, req.k, seed)
    if req.kind == "kmeans":
        if features_fn is None:
            raise ValueError("kmeans grouping needs the backbone's features")
        return kmeans_groups(class_means(features_fn, data, seed=seed), req.k, seed)
    raise ValueError(f"unknown grouping request {req!r}")
