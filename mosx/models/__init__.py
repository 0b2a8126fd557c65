"""Models: the architectures mosx builds (`backbones`) and the model files it reads and writes
(`files`, with the one public loader :func:`load_model` that train, eval and demo share)."""

from .backbones import (
    HEAD_INITS,
    MODEL_FORMAT,
    Classifier,
    PlainCNN,
    SmallCNN,
    backbone_blocks,
    build_backbone,
    build_model,
    load_backbone_weights,
)
from .files import load_model, read_file, save_model

__all__ = [
    "Classifier",
    "SmallCNN",
    "PlainCNN",
    "HEAD_INITS",
    "MODEL_FORMAT",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
    "backbone_blocks",
    "save_model",
    "load_model",
    "read_file",
]
