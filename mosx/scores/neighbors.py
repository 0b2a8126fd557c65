"""Nearest-neighbour scores over a bank of ID features: KNN (k-th neighbour distance among
L2-normalised features) and NNGuide (energy guided by the similarity to an energy-scaled bank).

Both search exactly, with blocked matrix products: the queries and the bank are cut into blocks
whose product fits a fixed budget of memory, and a running top-k per query block is merged after
each bank block, so a 1.28M x 2048 bank is searched without an [N, M] matrix. The search runs on the
device of the queries (the bank moves there once and stays).
"""

from __future__ import annotations

import torch

from .base import Scorer
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks, _same_rows

# Elements of one [query block, bank block] similarity matrix: 2^24 floats = 64 MiB on a CPU,
# 2^28 = 1 GiB on a GPU.
_BLOCK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 28}


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def topk_similarities(
    queries: torch.Tensor, bank: torch.Tensor, k: int, *, block_elems: int | None = None
) -> torch.Tensor:
    """[N, k] largest inner products of each query with the bank rows, in descending order, exact.

    Blocked over both the queries and the bank (each similarity block holds at most `block_elems`
    numbers); a running top-k per query block is merged with each bank block's top-k."""
    n, M = queries.shape[0], bank.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] (the bank size), got {k}")
    budget = block_elems or _BLOCK_ELEMS.get(queries.device.type, _BLOCK_ELEMS["cpu"])
    qb = max(1, min(n, 4096 if queries.is_cuda else 1024))
    bb = max(k, min(M, budget // qb))
    out = torch.empty(n, k, dtype=queries.dtype, device=queries.device)
    for qs in range(0, n, qb):
        q = queries[qs : qs + qb]
        best = None
        for bs in range(0, M, bb):
            sims = q @ bank[bs : bs + bb].T
            top = sims.topk(min(k, sims.shape[1]), dim=1).values
            best = (
                top
                if best is None
                else torch.cat([best, top], dim=1).topk(min(k, best.shape[1] + top.shape[1]), dim=1).values
            )
        out[qs : qs + qb] = best
    return out


def _bank_dtype(x) -> torch.dtype:
    """float64 for float64 fit data, float32 otherwise (half caches are widened)."""
    return torch.float64 if str(getattr(x, "dtype", "")).endswith("float64") else torch.float32


def _bank_on(scorer, device) -> torch.Tensor:
    if scorer._bank.device != device:
        scorer._bank = scorer._bank.to(device)
    return scorer._bank


class KNN(Scorer):
    """KNN (Sun et al., ICML 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"):
    score = -||z - z_(k)||_2, z = f / ||f|| the L2-normalised features and z_(k) the k-th nearest
    of the normalised ID fit features (the bank: every fit row; subsample by fitting on a subset,
    as the paper's alpha). For unit vectors ||z - z'||^2 = 2 - 2 z.z', so the search is a top-k of
    inner products (exact, blocked, see the module docstring).

    fit(features=...) on ID training features. k: the paper uses 50 on CIFAR-10 and 1000 on
    ImageNet (full bank).

    Conventions: OpenOOD's KNN is the same number (negative k-th distance of normalised features).
    pytorch-ood's ``KNN`` returns the distance itself (higher = more OOD) and normalises the features
    only with ``norm_features=True`` (default False).
    """

    spec_name = "knn"
    needs = ("features",)
    fit_needs = ("features",)
    fit_optional = ()
    streaming_fit = True  # the bank is built in row blocks (memmaps need not fit in memory twice)

    def __init__(self, k: int = 50):
        super().__init__()
        if int(k) != k or k < 1:
            raise ValueError(f"knn: k must be a positive integer, got {k}")
        self.k = int(k)

    def search_space(self) -> dict:
        """The paper's k values (its ablation over k) and OpenOOD's sweep."""
        return {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}

    def _fit(self, features=None, device=None):
        _check_2d(features, "features", self.name)
        dev = _fit_device(features, device)
        n, D = features.shape
        if n < self.k:
            raise ValueError(f"knn: k = {self.k} is larger than the fit set ({n} rows)")
        dt = _bank_dtype(features)
        bank = torch.empty(n, D, dtype=dt, device=dev)
        for lo, f in _row_chunks(features, dev, dtype=dt):
            bank[lo : lo + f.shape[0]] = _normalised(f)
        self._bank, self._dim = bank, D

    def _score(self, features=None):
        f = _matrix(features, "features", self.name, self._dim)
        if self.k > self._bank.shape[0]:
            raise ValueError(f"knn: k = {self.k} is larger than the fit set ({self._bank.shape[0]} rows)")
        bank = _bank_on(self, f.device)
        s_k = topk_similarities(_normalised(f.to(bank.dtype)), bank, self.k)[:, -1]
        return -(2 - 2 * s_k).clamp_min(0).sqrt()


class NNGuide(Scorer):
    """NNGuide (Park et al., ICCV 2023, "Nearest Neighbor Guidance for Out-of-Distribution
    Detection"): the bank holds every fit row's normalised features scaled by its confidence,
    b_i = E(x_i) f_i / ||f_i||, E = logsumexp(logits) (the energy score); a query's guidance is the
    mean of its k largest inner products with the bank, G(x) = mean_topk_i (f / ||f||) . b_i, and
    score = E(x) * G(x). fit(features=..., logits=...) on ID training data (subsample by fitting on a
    subset, as the paper's bank ratio). The search is exact and blocked (module docstring).

    Conventions: OpenOOD's NNGuide is the same number. pytorch-ood's ``NNGuide`` divides the bank
    energies by their mean (a positive constant factor: same ranking) and returns the negative
    (higher = more OOD).
    """

    spec_name = "nnguide"
    needs = ("features", "logits")
    fit_needs = ("features", "logits")
    fit_optional = ()
    streaming_fit = True

    def __init__(self, k: int = 10):
        super().__init__()
        if int(k) != k or k < 1:
            raise ValueError(f"nnguide: k must be a positive integer, got {k}")
        self.k = int(k)

    def search_space(self) -> dict:
        """k around the paper's default (10); the paper's ablation range."""
        return {"k": [1, 5, 10, 20, 50, 100]}

    def _fit(self, features=None, logits=None, device=None):
        _check_2d(features, "features", self.name)
        _check_2d(logits, "logits", self.name)
        if features.shape[0] != logits.shape[0]:
            raise ValueError(f"nnguide: features have {features.shape[0]} rows, logits {logits.shape[0]}")
        dev = _fit_device(features, device)
        n, D = features.shape
        if n < self.k:
            raise ValueError(f"nnguide: k = {self.k} is larger than the fit set ({n} rows)")
        dt = _bank_dtype(features)
        bank = torch.empty(n, D, dtype=dt, device=dev)
        for (lo, f), (_, z) in zip(_row_chunks(features, dev, dtype=dt), _row_chunks(logits, dev, dtype=dt)):
            bank[lo : lo + f.shape[0]] = _normalised(f) * torch.logsumexp(z, dim=1, keepdim=True)
        self._bank, self._dim, self._num_logits = bank, D, logits.shape[1]

    def _score(self, features=None, logits=None):
        f = _matrix(features, "features", self.name, self._dim)
        z = _matrix(logits, "logits", self.name, self._num_logits).to(f.dtype)
        _same_rows(self.name, features=f, logits=z)
        if self.k > self._bank.shape[0]:
            raise ValueError(f"nnguide: k = {self.k} is larger than the fit set ({self._bank.shape[0]} rows)")
        bank = _bank_on(self, f.device)
        guidance = topk_similarities(_normalised(f.to(bank.dtype)), bank, self.k).mean(1)
        return torch.logsumexp(z.to(bank.dtype), dim=1) * guidance
