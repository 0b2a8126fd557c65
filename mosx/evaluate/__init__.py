"""The evaluator: `mosx eval` and :func:`evaluate`.

One backbone pass per image: logits and features (the input of the final linear layer) are cached to
disk in fp16, keyed by the model's weights, the image list and the transform. Every score is then
computed from the cache, so asking for other scores or hyperparameters never reruns the backbone.

    from mosx.evaluate import EvalConfig, evaluate
    res = evaluate(EvalConfig(model, "val/", {"inat": "inat/", "textures": "dtd.txt"}, groups=groups,
                              scores=["mos"], out_dir="runs/eval"))
    res = evaluate(model, "val/", {"inat": "inat/"}, groups=groups, out_dir="runs/eval")  # the same, as keywords
    res.metrics["mos"]["inat"].auroc

The model is any torch module that returns logits (features are read with
:func:`mosx.scores.model_outputs`: timm's forward_features/forward_head, a (logits, features) tuple,
or a hook on the final linear layer). Under torchrun every rank runs the backbone on its shard;
rank 0 gathers the shards, so the metrics are exact over all images.

Conventions: ID is the positive class; FPR is at 95% TPR on ID, nearest-TPR rule, AUPR as average
precision (see :mod:`mosx.metrics`; all selectable).

Layout: `config` (EvalConfig), `images` (image sets, dataset, transform), `backbone` (the passes
through the model), `cache` (the on-disk logits/features cache), `run` (the evaluation: plan,
cache, fit, score, metrics), `report` (EvalResult, table/JSON/CSV/plots), `cli` (`mosx eval`).
"""

from ..models import load_model
from .cache import model_fingerprint
from .cli import build_parser, config_from_args, main, split_scores
from .config import EvalConfig
from .images import ImageList, image_list, make_transform
from .report import EvalResult, combine
from .run import evaluate

_split_scores = split_scores  # the name before mosx.evaluate became a package

__all__ = [
    "evaluate",
    "EvalConfig",
    "combine",
    "EvalResult",
    "ImageList",
    "image_list",
    "load_model",
    "make_transform",
    "model_fingerprint",
    "build_parser",
    "config_from_args",
    "main",
]
