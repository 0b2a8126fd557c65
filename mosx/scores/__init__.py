"""OOD scores behind one interface. Every score: higher = more in-distribution.

A scorer is built from its hyperparameters, fitted on ID data when the method needs statistics of it,
then maps a batch to one score per sample::

    from mosx import scores
    maha = scores.Mahalanobis().fit(features=id_train_features, labels=id_train_labels)
    s = maha.score(features=batch_features)                # [N]

    scorers = {"msp": scores.MSP(), "energy": scores.Energy(), "mos": scores.MOS(groups)}
    out = scores.score_all(scorers, {"logits": cached_logits})   # every score from one read

The data a scorer reads is named by keyword: ``logits`` [N, L], ``features`` [N, D] (the input of
the final linear layer), ``inputs`` (images) with ``model`` for the methods that perturb the input,
``labels`` [N] for fitting. ``Scorer.needs`` / ``Scorer.fit_needs`` list what each one reads.

Computation runs in float32 (float64 when given float64), on the device of the data.

Where things live (imports go down this list, never up; families never import each other):

- ``model.py``      reading a model: LinearHead, linear_head, model_outputs
- ``tensors.py``    input checks, row-block reading, exact percentiles
- ``base.py``       the Scorer interface, the registry (scorer_names) and the spec parser (build_scorer)
- family modules, one class per scorer, each registered by its ``spec_name``:
  ``logit.py`` (MOS, MSP, MaxLogit, Energy, ODIN), ``templates.py`` (KLMatching),
  ``distance.py`` (Mahalanobis), ``gradient.py`` (GradNorm), ``layers.py`` (MahalanobisLayers,
  the multi-layer Mahalanobis detector built on distance.py's per-layer statistics, and its tuning
  protocol tune_mahalanobis_layers), ``entropy.py`` (Entropy, GEN),
  ``subspace.py`` (ViM), ``neighbors.py`` (KNN, NNGuide), ``classmeans.py`` (RMD, SHE),
  ``boundary.py`` (fDBD, NCI); the feature-shaping wrappers ``shaping.py`` (ReAct, DICE) and
  ``shaping_ash.py`` (ASH, SCALE), spelled ``<wrapper>-<score>``
- ``search.py``     search: hyperparameters chosen on validation data, never on a test set
- ``batching.py``   fit_all / score_all: many scorers over the same data in one read
- ``eps_search.py`` select_eps and ODIN_EPS_GRID

A new scorer is one class with a ``spec_name`` in a family module (plus its test): importing the
family modules below fills the registry.
"""

from __future__ import annotations

from .base import SCORERS, WRAPPERS, Scorer, build_scorer, scorer_names, wrapper_names
from .batching import fit_all, score_all
from .eps_search import ODIN_EPS_GRID, select_eps
from .model import LinearHead, linear_head, model_outputs
from .search import SearchResult, fingerprint, search

# The scorer families, imported in the order the registry (scorer_names(), build_scorer's "known:"
# list) shows them; tests/test_scores.py checks that order, so keep isort away from it.
# isort: off
from .logit import MOS, MSP, ODIN, Energy, MaxLogit
from .templates import KLMatching
from .distance import Mahalanobis
from .gradient import GradNorm
from .layers import (
    MAHALANOBIS_LAYERS_EPS_GRID,
    MahalanobisLayers,
    adversarial_inputs,
    default_layers,
    layer_features,
    tune_mahalanobis_layers,
)
from .shaping import DICE, ReAct
from .shaping_ash import ASH, SCALE
from .entropy import GEN, Entropy
from .subspace import ViM
from .neighbors import KNN, NNGuide
from .classmeans import RMD, SHE
from .boundary import FDBD, NCI
# isort: on

# Private helpers, re-exported because other modules and tests reach them as mosx.scores._name.
from .base import _parse_value  # noqa: F401
from .batching import _ROW_KEYS, _chunk, _rows  # noqa: F401
from .eps_search import _iter_inputs  # noqa: F401
from .model import _head_module, _model_logits  # noqa: F401
from .tensors import (  # noqa: F401
    _check_2d,
    _fit_device,
    _is_half,
    _matrix,
    _percentile,
    _percentile_fp16,
    _row_chunks,
    _same_rows,
)

__all__ = [
    "Scorer",
    "MOS",
    "MSP",
    "MaxLogit",
    "Energy",
    "ODIN",
    "KLMatching",
    "Mahalanobis",
    "GradNorm",
    "MahalanobisLayers",
    "layer_features",
    "default_layers",
    "adversarial_inputs",
    "tune_mahalanobis_layers",
    "MAHALANOBIS_LAYERS_EPS_GRID",
    "ReAct",
    "DICE",
    "ASH",
    "SCALE",
    "Entropy",
    "GEN",
    "ViM",
    "KNN",
    "NNGuide",
    "RMD",
    "SHE",
    "FDBD",
    "NCI",
    "LinearHead",
    "linear_head",
    "model_outputs",
    "SCORERS",
    "WRAPPERS",
    "build_scorer",
    "scorer_names",
    "wrapper_names",
    "fit_all",
    "score_all",
    "select_eps",
    "ODIN_EPS_GRID",
    "search",
    "SearchResult",
    "fingerprint",
]
