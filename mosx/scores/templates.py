"""Fitted-template scores: KL matching, which compares a sample's softmax with per-class mean
softmaxes (templates) fitted on ID data."""

from __future__ import annotations

import math

import torch

from .base import Scorer
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks


class KLMatching(Scorer):
    """KL matching (Hendrycks et al., 2022): templates q_c = mean softmax of the ID samples
    predicted as class c; score = -min_c KL(p || q_c). All classes at once as one matrix product:
    KL(p || q_c) = sum p log p - p @ log(q_c). Classes never predicted in the fit data get no
    template. fit(logits=...) on ID (validation) data."""

    spec_name = "kl_matching"
    fit_needs = ("logits",)
    streaming_fit = True  # fit() reads its data in row blocks: arrays/memmaps need not fit in memory

    def _fit(self, logits=None, device=None, **_):
        _check_2d(logits, "logits", self.name)
        dev = _fit_device(logits, device)
        C = logits.shape[1]
        sums = torch.zeros(C, C, dtype=torch.float64, device=dev)
        counts = torch.zeros(C, dtype=torch.int64, device=dev)
        for _, z in _row_chunks(logits, dev):
            p = torch.softmax(z, dim=1)
            pred = p.argmax(dim=1)
            sums.index_add_(0, pred, p)
            counts += torch.bincount(pred, minlength=C)
        present = counts > 0
        q = sums[present] / counts[present, None].to(torch.float64)
        # log 0 -> a huge finite value so that 0 * log q stays 0 in the product.
        self._log_templates = torch.log(q).clamp_min(math.log(torch.finfo(torch.float64).tiny))
        self._classes = present.nonzero().squeeze(1)
        self._num_logits = C

    def _score(self, logits=None, **_):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        p = torch.softmax(z, dim=1)
        neg_entropy = torch.xlogy(p, p).sum(1, keepdim=True)
        kl = neg_entropy - p @ self._log_templates.to(z.device, z.dtype).T
        return -kl.amin(dim=1)
