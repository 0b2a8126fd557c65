"""mosx: fused MOS group-softmax kernels and OOD detection tools for PyTorch.

import mosx
groups = mosx.Groups.from_sizes([398, 521, 9, 7, 52, 8, 3, 2])
score = mosx.group_softmax_score(logits, groups)   # higher = more in-distribution
"""

# Before anything loads the op library: a torch other than the one mosx was built against gets a
# message naming both versions instead of an undefined-symbol error from mosx._C.
# isort: off
from ._build_check import check_torch_version

check_torch_version()
# isort: on


from . import metrics, reference, scores
from .gate import OODGate
from .groups import Groups, as_groups
from .masking import masked_weight
from .models import load_model
from .ops import (
    cuda_built,
    group_cross_entropy,
    group_log_softmax,
    group_predict,
    group_softmax,
    group_softmax_score,
)

__version__ = "0.1.0"

# The ImageNet-1k WordNet taxonomy grouping of the MOS paper (animal, artifact, geological
# formation, fungus, misc, natural object, person, plant): 1000 classes, 1008 logits.
IMAGENET_TAXONOMY_SIZES = (398, 521, 9, 7, 52, 8, 3, 2)

__all__ = [
    "Groups",
    "OODGate",
    "as_groups",
    "cuda_built",
    "group_cross_entropy",
    "group_log_softmax",
    "group_predict",
    "group_softmax",
    "group_softmax_score",
    "load_model",
    "masked_weight",
    "metrics",
    "reference",
    "scores",
    "IMAGENET_TAXONOMY_SIZES",
]
