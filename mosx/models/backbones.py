"""Model architectures: a backbone that yields pooled features plus a linear head.

Backbones: any timm model by name (created without pretrained weights: nothing is downloaded), two
small CNNs for CPU demos ("small-cnn": global-average-pooled, "plain-cnn": max-pooled stages, BatchNorm
and a fully connected feature layer), or "identity" when the data already are feature vectors. Weights come from
local files: BiT's `.npz` (through timm's ResNetV2 loader; BiT-S-R101x1 = timm 'resnetv2_101x1_bit'),
a PyTorch state dict (.pth / .pt / .bin) or a .safetensors file.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

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
]

MODEL_FORMAT = "mosx.model/1"  # the format tag of mosx model files (mosx.models.files)


class SmallCNN(nn.Module):
    """Four conv stages (GroupNorm, ReLU), global average pool: a few-ms-per-batch CPU backbone."""

    def __init__(self, width: int = 32, in_chans: int = 3):
        super().__init__()
        w = [width, width * 2, width * 4, width * 4]
        layers, c = [], in_chans
        for i, o in enumerate(w):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c, o, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                    nn.GroupNorm(min(8, o), o),
                    nn.ReLU(inplace=True),
                )
            )
            c = o
        self.stages = nn.Sequential(*layers)
        self.num_features = c

    def forward(self, x):
        return self.stages(x).mean((2, 3))


class PlainCNN(nn.Module):
    """Three conv stages (conv 3x3, BatchNorm, ReLU, 2x2 max pool) of widths W, 2W, 4W, the 4x4 map
    flattened, then a fully connected layer (BatchNorm, ReLU) to 16W features.

    Why this shape for small images of letters: keeping the 4x4 layout in a flattened map (instead of a
    global average) keeps where strokes are, and BatchNorm trains faster from scratch than GroupNorm.
    At 32x32 px and W = 16 it reached a much higher held-out-font accuracy than SmallCNN in the same
    CPU time (docs/demo_results.md, how the demo's recipe was chosen). Inputs of any size work: the
    last map is average-pooled to 4x4 (a no-op at 32x32)."""

    def __init__(self, width: int = 16, in_chans: int = 3):
        super().__init__()
        w = [width, width * 2, width * 4]
        layers, c = [], in_chans
        for o in w:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True), nn.MaxPool2d(2)
                )
            )
            c = o
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.num_features = width * 16
        self.fc = nn.Sequential(
            nn.Linear(c * 16, self.num_features, bias=False), nn.BatchNorm1d(self.num_features), nn.ReLU(inplace=True)
        )

    def forward(self, x):
        return self.fc(self.pool(self.stages(x)).flatten(1))


HEAD_INITS = ("zero", "random")


class Classifier(nn.Module):
    """backbone -> [N, D] features -> head (Linear D -> num_outputs).

    head_init "zero" (the MOS recipe, for a pretrained backbone) or "random" (PyTorch's Linear
    default): a backbone trained from scratch gets no gradient through a zero head at the first step,
    and a group-softmax loss then settles on the constant "others" prior and stays there."""

    def __init__(self, backbone: nn.Module, num_features: int, num_outputs: int, head_init: str = "zero"):
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_outputs)  # PyTorch's default (random) initialisation
        if head_init == "zero":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def features(self, x):
        return self.backbone(x).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def build_backbone(name: str, num_features: int | None = None, in_chans: int = 3):
    """(backbone, feature dim). name: timm name, 'small-cnn[-W]', 'plain-cnn[-W]' or 'identity' (needs
    num_features)."""
    if name == "identity":
        if not num_features:
            raise ValueError("model 'identity' takes feature vectors: the data must be [N, D] tensors")
        return nn.Identity(), int(num_features)
    m = re.fullmatch(r"small-cnn(?:-(\d+))?", name)
    if m:
        net = SmallCNN(width=int(m.group(1) or 32), in_chans=in_chans)
        return net, net.num_features
    m = re.fullmatch(r"plain-cnn(?:-(\d+))?", name)
    if m:
        net = PlainCNN(width=int(m.group(1) or 16), in_chans=in_chans)
        return net, net.num_features
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is an optional dependency
        raise ImportError("timm is needed for timm backbones: pip install timm") from e
    if not timm.list_models(name) and name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}: not a timm model, 'small-cnn', 'plain-cnn' or 'identity'")
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)  # num_classes=0: pooled features
    if "_bit" in name:
        # BiT (and the MOS models fine-tuned from it) standardise conv weights with eps 1e-10, timm with
        # 1e-8: use the reference's, so that training from BiT weights and evaluating agree with it
        from .bit import use_reference_eps

        use_reference_eps(net)
    return net, int(net.num_features)


def load_backbone_weights(backbone: nn.Module, path: str) -> dict:
    """Load local weights into a backbone; classifier weights in the file are ignored.

    Returns {"loaded": n, "missing": [...], "ignored": [...]}. Raises when nothing matches.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".npz"):
        if not hasattr(backbone, "load_pretrained"):
            raise ValueError(
                f"{path}: .npz weights are BiT checkpoints; they need a timm ResNetV2 backbone "
                f"(e.g. resnetv2_101x1_bit), not {type(backbone).__name__}"
            )
        backbone.load_pretrained(path)
        return {"loaded": sum(1 for _ in backbone.state_dict()), "missing": [], "ignored": []}
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        state = {k[len("backbone.") :]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    own = backbone.state_dict()
    use = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not use:
        raise ValueError(
            f"{path}: no tensor matches the backbone {type(backbone).__name__} "
            f"(first keys in the file: {list(state)[:5]})"
        )
    backbone.load_state_dict(use, strict=False)
    return {"loaded": len(use), "missing": sorted(set(own) - set(use)), "ignored": sorted(set(state) - set(use))}


def backbone_blocks(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in blocks, input to output (timm's coarse grouping where it has one)."""
    if hasattr(backbone, "group_matcher"):
        from timm.models import group_parameters

        named = dict(backbone.named_parameters())
        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [[named[n] for n in names] for _, names in sorted(groups.items())]
    if isinstance(backbone, SmallCNN):
        return [list(s.parameters()) for s in backbone.stages]
    if isinstance(backbone, PlainCNN):
        return [list(s.parameters()) for s in backbone.stages] + [list(backbone.fc.parameters())]
    return [list(c.parameters()) for c in backbone.children() if any(True for _ in c.parameters())]


def build_model(
    name: str,
    num_outputs: int,
    weights: str | None = None,
    num_features: int | None = None,
    in_chans: int = 3,
    head_init: str = "zero",
):
    backbone, dim = build_backbone(name, num_features, in_chans)
    info = load_backbone_weights(backbone, weights) if weights else None
    return Classifier(backbone, dim, num_outputs, head_init=head_init), info
