"""Scorers fitted on images through the model, not on the cache: the multi-layer Mahalanobis
detector (:class:`mosx.scores.MahalanobisLayers`), tuned as the MOS reference code tunes it.

Its class statistics come from the fit set (`--fit-data`, labelled ID training images); its logistic
regression and its eps from the ID validation set (`--search id=...`, labelled): the first m images
and their FGSM versions train the regression, the next m choose eps (m = min(500, half the set), the
reference's 500 when the set is large enough). eps is chosen from the reference's grid, unless the
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


def check_image_fit(scorers: dict, fit_images: ImageList | None, val_id: ImageList | None) -> None:
    """Before any work: the labelled sets the image-fitted scorers need are there."""
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
    if len(val_id) < 2:
        raise ValueError(f"evaluate: scorer {names[0]!r} needs 2 ID validation images at least, got {len(val_id)}")


def _labelled_batches(images: ImageList, transform, shape, batch_size: int, device, limit: int | None = None):
    """(inputs, labels) batches of the readable images, in order (at most `limit` of them)."""
    ds = ImageDataset(images, transform[0], shape, transform[1])
    n = len(images) if limit is None else min(limit, len(images))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size)
    labels = torch.as_tensor(images.labels, dtype=torch.long)
    for x, idx, ok in loader:
        if ok.any():
            yield x[ok].to(device), labels[idx[ok]].to(device)


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
            _labelled_batches(val_id, p.transform, p.shape, bs, p.device, limit=2 * m),
            eps_grid=(s.eps,) if s.eps > 0 else S.MAHALANOBIS_LAYERS_EPS_GRID,
            m=m,
            layers=s.layers,
            regularization=s.regularization,
            dtype=s.dtype,
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
            "protocol": "MOS reference: class statistics on the fit set; logistic regression on the first m "
            "ID validation images against their FGSM versions (noise 0.05), eps by FPR95 on the next m",
        }
    return out
