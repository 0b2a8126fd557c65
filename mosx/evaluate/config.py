"""EvalConfig: every setting of one evaluation, built by :func:`mosx.evaluate.evaluate`'s keyword
arguments and by `mosx eval` alike (as TrainConfig is for the trainer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    """What to evaluate and how.

    model: a torch module that returns logits, or a path / timm name for :func:`mosx.load_model`
    (then `arch`, `weights`, `num_classes` and `trust_pickle` are its loading options, and the
    grouping and class list stored in a mosx model file are used unless given here).
    id_data / ood_data values: folders, list files, :class:`ImageList` or map-style Datasets
    (e.g. mosx.data's ImageSet; tensor items pass through `tensor_transform`, default none).
    groups: the model's grouping (a Groups, sizes or a group spec); None for a flat model.
    scores: scorer specs (see :func:`mosx.scores.build_scorer`) or Scorer objects; default: "mos"
    for a grouped model, the logit/feature baselines for a flat one.
    fit_data: ID images for the scorers fitted on ID statistics (KL matching, Mahalanobis, ReAct);
    fit_on_id=True fits them on the ID test set instead (optimistic; says so in the report).
    class_names: expected class list; a mismatch with the ID folder's classes stops the run.
    precision: "bf16" / "fp16" autocast or "fp32"; "auto" = bf16 on a GPU, fp32 on a CPU (where
    bf16 convolutions are slow without native support). Output files go to out_dir (table.txt,
    results.json, results.csv, roc_<method>.png, hist_<method>.png) and the cache to cache_dir
    (default out_dir/cache).
    search: {name: set} of validation image sets (any form id_data takes), "id" for the ID one and
    at least one OOD one: every scorer with a search space is tuned on them (search_metric, see
    :func:`mosx.scores.search`) before the test sets are scored; a validation set that is also a
    test set is refused.
    """

    model: torch.nn.Module | str
    id_data: Any
    ood_data: Mapping[str, Any]
    groups: Any = None
    scores: Sequence | None = None
    fit_data: Any = None
    fit_on_id: bool = False
    class_names: Sequence[str] | None = None
    out_dir: str | None = None
    cache_dir: str | None = None
    transform: Any = None
    tensor_transform: Any = None
    image_size: int = 224
    resize: str = "squash"
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    batch_size: int = 128
    workers: int | None = None
    device: Any = None
    precision: str = "auto"
    channels_last: bool = True
    tpr: float = 0.95
    positive: str = "id"
    fpr_rule: str = "nearest"
    aupr: str = "ap"
    search: Mapping[str, Any] | None = None
    search_metric: str = "fpr95"
    plots: bool = True
    progress: bool = True
    verbose: bool = True
    # loading options, used when `model` is a path or a timm name
    arch: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    in_chans: int | None = None  # image channels (1: grey); None: the model file's, else 3

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def describe(self) -> dict:
        """The settings as short strings, for reports (objects by their type, data by their path)."""

        def short(v):
            if v is None or isinstance(v, (str, int, float, bool)):
                return v
            if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
                return ", ".join(map(str, v))
            if isinstance(v, dict):
                return ", ".join(f"{k}={short(x)}" for k, x in v.items())
            return type(v).__name__

        skip = {"progress", "verbose", "plots"}
        return {f.name: short(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
