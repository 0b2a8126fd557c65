"""Training helpers over the model architectures of :mod:`mosx.models`: which backbone blocks train,
and train mode with frozen layers kept in eval mode. The architectures and model files moved to
:mod:`mosx.models`; their names are re-exported here for existing imports."""

from __future__ import annotations

from torch import nn

from ..models import (
    HEAD_INITS,
    MODEL_FORMAT,
    Classifier,
    PlainCNN,
    SmallCNN,
    backbone_blocks,
    build_backbone,
    build_model,
    load_backbone_weights,
    load_model,
    save_model,
)

__all__ = [
    "Classifier",
    "SmallCNN",
    "PlainCNN",
    "HEAD_INITS",
    "MODEL_FORMAT",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
    "set_trainable",
    "backbone_blocks",
    "train_mode",
    "save_model",
    "load_model",
]


def set_trainable(model: Classifier, train_blocks: int) -> list[nn.Parameter]:
    """Freeze the backbone except its last train_blocks blocks (-1: all); the head always trains."""
    for p in model.backbone.parameters():
        p.requires_grad_(train_blocks == -1)
    if train_blocks > 0:
        blocks = backbone_blocks(model.backbone)
        if train_blocks > len(blocks):
            raise ValueError(f"train_blocks={train_blocks} but the backbone has {len(blocks)} blocks")
        for block in blocks[len(blocks) - train_blocks :]:
            for p in block:
                p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: Classifier) -> None:
    """Training mode where parameters train; frozen layers stay in eval mode (BN statistics fixed)."""
    model.train()
    for m in model.backbone.modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            m.eval()
    if not any(p.requires_grad for p in model.backbone.parameters()):
        model.backbone.eval()
