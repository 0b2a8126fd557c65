"""Fitted-template scores: KL matching, which compares a sample's softmax with per-class mean
softmaxes (templates) fitted on ID data."""

from __future__ import annotations

import math

import torch

from .base import Scorer
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks

_TEMPLATES = ("predictions", "labels")


class KLMatching(Scorer):
    """KL matching (Hendrycks et al., 2022, "Scaling Out-of-Distribution Detection for Real-World
    Settings"): templates q_c = mean softmax of the ID samples of class c; score = -min_c KL(p || q_c).

    ``templates="predictions"`` (default): class c = the samples *predicted* as c (the paper's and
    OpenOOD's rule, fit(logits=...) on ID validation data); ``templates="labels"``: class c = the
    samples *labelled* c, as the MOS reference code builds them (fit(logits=..., labels=...)).
    All classes at once as one matrix product: KL(p || q_c) = sum p log p - p @ log(q_c). Classes
    without fit samples get no template.
    """

    spec_name = "kl_matching"
    fit_optional = ()  # labels are read only with templates="labels" (then they are in fit_needs)
    fit_params = ("templates",)
    streaming_fit = True  # fit() reads its data in row blocks: arrays/memmaps need not fit in memory

    def __init__(self, templates: str = "predictions"):
        super().__init__()
        if templates not in _TEMPLATES:
            raise ValueError(f"kl_matching: templates must be one of {', '.join(_TEMPLATES)}, got {templates!r}")
        self.templates = templates

    @property
    def fit_needs(self):
        return ("logits", "labels") if self.templates == "labels" else ("logits",)

    def _fit(self, logits=None, labels=None, device=None):
        _check_2d(logits, "logits", self.name)
        dev = _fit_device(logits, device)
        n, C = logits.shape
        if self.templates == "labels":
            if labels is None:
                raise ValueError("kl_matching: templates=labels needs `labels` to fit")
            if not isinstance(labels, torch.Tensor):
                import numpy as np

                labels = torch.from_numpy(np.array(labels))
            labels = labels.to(dev)
            if labels.shape != (n,) or labels.is_floating_point():
                raise ValueError(
                    f"kl_matching: labels must be [N] = [{n}] class ids, got {tuple(labels.shape)} {labels.dtype}"
                )
            labels = labels.long()
            if n and (labels.min() < 0 or labels.max() >= C):
                raise ValueError(
                    f"kl_matching: labels must be class ids in [0, {C}), got [{int(labels.min())}, {int(labels.max())}]"
                )
        sums = torch.zeros(C, C, dtype=torch.float64, device=dev)
        counts = torch.zeros(C, dtype=torch.int64, device=dev)
        for lo, z in _row_chunks(logits, dev):
            p = torch.softmax(z, dim=1)
            cls = labels[lo : lo + z.shape[0]] if self.templates == "labels" else p.argmax(dim=1)
            sums.index_add_(0, cls, p)
            counts += torch.bincount(cls, minlength=C)
        present = counts > 0
        if not bool(present.any()):
            raise ValueError("kl_matching: no fit samples")
        q = sums[present] / counts[present, None].to(torch.float64)
        # log 0 -> a huge finite value so that 0 * log q stays 0 in the product.
        self._log_templates = torch.log(q).clamp_min(math.log(torch.finfo(torch.float64).tiny))
        self._classes = present.nonzero().squeeze(1)
        self._num_logits = C

    def _score(self, logits=None):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        p = torch.softmax(z, dim=1)
        neg_entropy = torch.xlogy(p, p).sum(1, keepdim=True)
        kl = neg_entropy - p @ self._log_templates.to(z.device, z.dtype).T
        return -kl.amin(dim=1)
