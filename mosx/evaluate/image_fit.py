"""Scorers fitted on images through the model, not on the cache: the multi-layer Mahalanobis
detector (:class:`mosx.scores.MahalanobisLayers`), tuned as the MOS reference code tunes it.

Its class statistics come from the fit set (`--fit-data`, labelled ID training images); its logistic
regression and its eps from the ID validation set (`--search id=...`, labelled): the first m images
and their FGSM versions train the regression, the next m choose eps (m = min(500, half the set), the
reference's 500 when the set is large enough). The 2m images are drawn from the validation set in a
seeded random order (seed 0), so that a class-sorted folder gives both halves every class. On a
grouped model the FGSM step follows the group cross-entropy (its logits are not class logits). eps is chosen from the reference's grid, unless the
spec fixes one above 0 (``mahalanobis_layers:eps=0.001``: only the regression is fitted then). No
test set is read. Rank 0 does it; the evaluator then broadcasts the fitted scorer with the other
input-perturbing scorers.
"""

from __future__ import annotations

import time

import torch

from .. import scores as S
from .images import ImageDataset, ImageList

REFERENCE_M = 500  # the validation images per half in the MOS reference's tuning


def needs_image_fit(s: S.Scorer) -> bool:
    """A scorer whose fit reads images through the model and that is not ready to score yet."""
    return "inputs" in s.fit_needs and not (s.fitted and getattr(s, "ready", True))


def check_image_fit(scorers: dict, fit_images: ImageList | None, val_id: ImageList | None, class_names) -> None:
    """Before any work: the labelled sets the image-fitted scorers need are there, and their class
    folders are the model's classes in the model's order (`class_names`: the model file's list or
    the ID folder's; None when neither tells)."""
    names = [n for n, s in scorers.items() if needs_image_fit(s)]
    if not names:
        return
    for what, im, flag in (("fit", fit_images, "--fit-data"), ("ID validation", val_id, "--search id=...")):
        if im is None:
            raise ValueError(
                f"evaluate: scorer {names[0]!r} is fitted on images through the model: give the {what} set "
                f"({flag}, labelled ID images), as the MOS reference tunes it (class statistics on the fit "
                "set, the regression and eps on the ID validation set and its FGSM versions)"
            )
        unknown = sum(1 for v in im.labels if v < 0) if im.labels is not None else len(im)
        if unknown:
            raise ValueError(
                f"evaluate: scorer {names[0]!r} needs the labels of the {what} set, but {unknown} of its "
                f"{len(im)} images have none (class folders or a list file with labels)"
            )
        found = im.class_names
        if class_names is not None and found is not None and list(found) != list(class_names):
            raise ValueError(
                f"evaluate: the {what} set's class folders ({len(found)}) are not the model's classes "
                f"({len(class_names)}) in the same order, so its labels would mean other classes: give "
                "it every class folder of the ID set (or a list file with the model's class ids)"
            )
    if len(val_id) < 2:
        raise ValueError(f"evaluate: scorer {names[0]!r} needs 2 ID validation images at least, got {len(val_id)}")


def _labelled_batches(images: ImageList, transform, shape, batch_size: int, device, order=None):
    """(inputs, labels) batches of the readable images, in `order` (indices; default: all, in order)."""
    ds = ImageDataset(images, transform[0], shape, transform[1])
    order = range(len(images)) if order is None else [int(i) for i in order]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch_size)
    labels = torch.as_tensor(images.labels, dtype=torch.long)
    for x, idx, ok in loader:
        if ok.any():
            yield x[ok].to(device), labels[idx[ok]].to(device)


def validation_order(n: int) -> torch.Tensor:
    """The order in which the validation images are taken (seed 0): both halves see every class."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def _group_loss(g):
    """The FGSM loss: None (cross-entropy on class logits) for a flat model, the group cross-entropy
    of the class ids for a grouped one."""
    if g is None:
        return None
    from ..ops import group_cross_entropy

    return lambda z, y: group_cross_entropy(z, y, g, reduction="sum")


def fit_on_images(p, rt, timings: dict) -> dict:
    """Tune every image-fitted scorer of the plan on rank 0 (the reference protocol); the tuned scorer
    replaces the requested one. Returns {method: the tuning record (grid of eps, chosen eps, FPR95
    on the FGSM half), with "seconds", "m" and "protocol"}."""
    todo = {n: s for n, s in p.scorers.items() if needs_image_fit(s)}
    if not (todo and rt.main):
        return {}
    val_id = p.val_images["id"]
    m = min(REFERENCE_M, len(val_id) // 2)
    out = {}
    for name, s in todo.items():
        t0 = time.perf_counter()
        bs = p.cfg.batch_size
        r = S.tune_mahalanobis_layers(
            p.model,
            _labelled_batches(p.fit_images, p.transform, p.shape, bs, p.device),
            _labelled_batches(val_id, p.transform, p.shape, bs, p.device, order=validation_order(len(val_id))),
            eps_grid=(s.eps,) if s.eps > 0 else S.MAHALANOBIS_LAYERS_EPS_GRID,
            m=m,
            layers=s.layers,
            regularization=s.regularization,
            dtype=s.dtype,
            loss=_group_loss(p.groups),
            batch_size=bs,
            device=p.device,
        )
        p.scorers[name] = r.scorer
        seconds = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + seconds
        out[name] = {
            **r.as_dict(),
            "seconds": seconds,
            "m": m,
            "protocol": "MOS reference: class statistics on the fit set; logistic regression on m ID "
            "validation images against their FGSM versions (noise 0.05), eps by FPR95 on the next m; the 2m "
            "images in a seeded random order (seed 0)",
        }
    return out
