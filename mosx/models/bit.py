"""BiT-PyTorch / MOS checkpoints onto timm's ResNetV2.

The MOS reference code (``finetune.py``) saves ``torch.save({"step": ..., "model":
model.state_dict(), "optim": optim.state_dict()})`` where ``model`` is a BiT-PyTorch ``ResNetV2``
wrapped in ``DataParallel`` (keys prefixed ``module.``), its tensors on the GPU. A BiT ResNetV2 state
dict names its modules::

    root.conv.weight                                          -> stem.conv.weight
    body.block{B}.unit{UU}.gn{1,2,3}.{weight,bias}            -> stages.{B-1}.blocks.{UU-1}.norm{1,2,3}.*
    body.block{B}.unit{UU}.conv{1,2,3}.weight                 -> stages.{B-1}.blocks.{UU-1}.conv{1,2,3}.weight
    body.block{B}.unit01.downsample.weight                    -> stages.{B-1}.blocks.0.downsample.conv.weight
    before_head.gn.{weight,bias}  (MOS) | head.gn.* (BiT)     -> norm.*
    head.conv.{weight,bias}                                   -> head.fc.{weight,bias}

The file tells everything the model needs: the units per block give the depth (3,4,6,3 = R50,
3,4,23,3 = R101, 3,8,36,3 = R152), the root conv the width factor (64 x wf channels) and the input
channels, the head conv the number of outputs. ``arch`` is therefore optional; when given it is
checked against the file.

Weight standardisation: BiT's own code divides by ``sqrt(var + 1e-10)``; timm's BiT models use
1e-8. The models built here use 1e-10 (:func:`use_reference_eps`) so that they give the logits the
reference code gives.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = [
    "REFERENCE_WS_EPS",
    "is_bit_checkpoint",
    "bit_state_dict",
    "infer_layout",
    "parse_arch",
    "timm_name",
    "convert_state_dict",
    "build_model",
    "use_reference_eps",
    "load_bit",
]

REFERENCE_WS_EPS = 1e-10
DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_LAYERS = {v: k for k, v in DEPTHS.items()}
_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")
_UNIT = re.compile(r"^body\.block(\d+)\.unit(\d+)\.(gn[123]\.(?:weight|bias)|conv[123]\.weight|downsample\.weight)$")
_FIXED = {
    "root.conv.weight": "stem.conv.weight",
    "before_head.gn.weight": "norm.weight",
    "before_head.gn.bias": "norm.bias",
    "head.gn.weight": "norm.weight",
    "head.gn.bias": "norm.bias",
    "head.conv.weight": "head.fc.weight",
    "head.conv.bias": "head.fc.bias",
}


def _strip(sd: dict) -> dict:
    return {_PREFIX.sub("", k): v for k, v in sd.items()}


def _looks_bit(sd) -> bool:
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        return False
    keys = [_PREFIX.sub("", k) for k in sd]
    return any(k.startswith("root.conv.") for k in keys) and any(k.startswith("body.block") for k in keys)


def bit_state_dict(obj) -> dict | None:
    """The BiT ResNetV2 state dict (prefixes stripped) in `obj`, or None when `obj` is not one.

    Recognised: the MOS ``finetune.py`` checkpoint (``{"step", "model", "optim"}``, the state dict
    under ``model``), a ``{"state_dict": ...}`` wrapper, and a flat state dict; each with or without
    ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) prefixes."""
    if not isinstance(obj, dict):
        return None
    for key in ("model", "state_dict"):
        if _looks_bit(obj.get(key)):
            return _strip(obj[key])
    return _strip(obj) if _looks_bit(obj) else None


def is_bit_checkpoint(obj) -> bool:
    return bit_state_dict(obj) is not None


def _unit_index(sd: dict) -> dict:
    """{block: sorted unit numbers} from the body keys."""
    units: dict = {}
    for k in sd:
        m = re.match(r"^body\.block(\d+)\.unit(\d+)\.", k)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {b: sorted(u) for b, u in units.items()}


def infer_layout(sd: dict, path: str = "checkpoint") -> dict:
    """layers (units per block), width factor, input channels and output width of a BiT state dict
    (prefixes stripped)."""
    units = _unit_index(sd)
    if sorted(units) != [1, 2, 3, 4]:
        raise ValueError(
            f"{path}: a BiT ResNetV2 has body.block1..block4; this file has "
            f"{', '.join(f'block{b}' for b in sorted(units)) or 'none'}"
        )
    for b, u in units.items():
        if u != list(range(1, len(u) + 1)):
            raise ValueError(f"{path}: body.block{b} has units {u}; expected unit01..unit{len(u):02d} without gaps")
    root = sd.get("root.conv.weight")
    if root is None or root.dim() != 4:
        raise ValueError(f"{path}: no 4-d root.conv.weight in this BiT checkpoint")
    if root.shape[0] % 64:
        raise ValueError(f"{path}: root.conv has {root.shape[0]} channels, not a multiple of 64 (64 x width factor)")
    head = sd.get("head.conv.weight")
    if head is None:
        raise ValueError(f"{path}: no head.conv.weight (the classifier) in this BiT checkpoint")
    return {
        "layers": tuple(len(units[b]) for b in (1, 2, 3, 4)),
        "width_factor": root.shape[0] // 64,
        "in_chans": int(root.shape[1]),
        "num_outputs": int(head.shape[0]),
    }


def parse_arch(arch: str) -> tuple | None:
    """(depth, width factor) of a BiT arch name: ``BiT-S-R101x1``, ``BiT-M-R50x3``, ``R101x1``, or the
    timm name ``resnetv2_101x1_bit`` (a ``.tag`` suffix allowed); None for any other name."""
    s = arch.strip()
    m = re.fullmatch(r"(?:bit-[sml]-)?r(\d+)x(\d+)", s, re.IGNORECASE) or re.fullmatch(
        r"resnetv2_(\d+)x(\d+)_bitm?(?:\.[\w-]+)?", s
    )
    return (int(m.group(1)), int(m.group(2))) if m else None


def timm_name(layers: tuple, width_factor: int) -> str | None:
    """timm's registered name for this BiT model, or None where timm registers none."""
    import timm

    depth = DEPTHS.get(tuple(layers))
    name = f"resnetv2_{depth}x{width_factor}_bit" if depth else None
    return name if name and name in timm.list_models() else None


def use_reference_eps(model: nn.Module, eps: float = REFERENCE_WS_EPS) -> int:
    """Set the weight-standardisation epsilon of every StdConv2d of a timm model; returns how many."""
    from timm.layers import StdConv2d, StdConv2dSame

    n = 0
    for m in model.modules():
        if isinstance(m, (StdConv2d, StdConv2dSame)):
            m.eps = eps
            n += 1
    return n


def build_model(layers: tuple, width_factor: int, num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm's ResNetV2 for a BiT layout (the registered model where timm has one, else the same
    class with these layers), with the reference's standardisation epsilon."""
    import timm

    name = timm_name(layers, width_factor)
    if name is not None:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    else:  # any other depth: the configuration timm's BiT models use
        from functools import partial

        from timm.layers import StdConv2d
        from timm.models.resnetv2 import ResNetV2

        model = ResNetV2(
            layers=list(layers),
            width_factor=width_factor,
            num_classes=num_classes,
            in_chans=in_chans,
            stem_type="fixed",
            conv_layer=partial(StdConv2d, eps=REFERENCE_WS_EPS),
        )
    if use_reference_eps(model) == 0:  # pragma: no cover - a timm whose ResNetV2 changed
        raise RuntimeError("timm's ResNetV2 has no StdConv2d layers: cannot set the BiT standardisation epsilon")
    return model


def convert_state_dict(sd: dict, path: str = "checkpoint") -> dict:
    """BiT ResNetV2 keys (prefixes stripped) -> timm ResNetV2 keys; an unknown key is an error."""
    out, unmatched = {}, []
    for k, v in sd.items():
        new = _FIXED.get(k)
        if new is None:
            m = _UNIT.match(k)
            if m:
                b, u, rest = int(m.group(1)), int(m.group(2)), m.group(3)
                rest = "downsample.conv.weight" if rest == "downsample.weight" else rest.replace("gn", "norm")
                new = f"stages.{b - 1}.blocks.{u - 1}.{rest}"
        if new is None:
            unmatched.append(k)
        elif new in out:
            raise ValueError(
                f"{path}: {k!r} maps onto {new!r}, which another key already filled (both before_head.gn and head.gn?)"
            )
        else:
            out[new] = v
    if unmatched:
        raise ValueError(
            f"{path}: {len(unmatched)} key(s) of this BiT ResNetV2 checkpoint match no layer of the "
            f"model: {', '.join(unmatched[:5])}" + (", ..." if len(unmatched) > 5 else "")
        )
    return out


def _bit_key(timm_key: str) -> str:
    """The BiT name of a timm ResNetV2 key (for messages)."""
    inverse = {
        "stem.conv.weight": "root.conv.weight",
        "norm.weight": "before_head.gn.weight",
        "norm.bias": "before_head.gn.bias",
        "head.fc.weight": "head.conv.weight",
        "head.fc.bias": "head.conv.bias",
    }
    if timm_key in inverse:
        return inverse[timm_key]
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", timm_key)
    if not m:
        return timm_key
    rest = "downsample.weight" if m.group(3) == "downsample.conv.weight" else m.group(3).replace("norm", "gn")
    return f"body.block{int(m.group(1)) + 1}.unit{int(m.group(2)) + 1:02d}.{rest}"


def load_bit(obj, path: str, *, arch: str | None = None, num_classes: int | None = None):
    """(model, info) from a BiT ResNetV2 checkpoint already read by :func:`mosx.models.read_file`."""
    sd = bit_state_dict(obj)
    if sd is None:
        raise ValueError(f"{path}: not a BiT ResNetV2 checkpoint")
    lay = infer_layout(sd, path)
    depth = DEPTHS.get(lay["layers"])
    what = f"R{depth}x{lay['width_factor']}" if depth else f"units {lay['layers']} x{lay['width_factor']}"
    if arch is not None:
        want = parse_arch(arch)
        if want is None:
            raise ValueError(
                f"{path}: holds a BiT ResNetV2 ({what}); --arch {arch!r} is not a BiT architecture "
                f"(give e.g. BiT-S-R101x1 or resnetv2_101x1_bit, or leave it out)"
            )
        if want != (depth, lay["width_factor"]):
            raise ValueError(f"{path}: --arch {arch!r} is R{want[0]}x{want[1]} but the file holds a BiT {what}")
    if num_classes is not None and num_classes != lay["num_outputs"]:
        raise ValueError(
            f"{path}: num_classes={num_classes} but the checkpoint's head has {lay['num_outputs']} outputs"
        )
    state = convert_state_dict(sd, path)
    model = build_model(lay["layers"], lay["width_factor"], lay["num_outputs"], lay["in_chans"])
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ValueError(
            f"{path}: this BiT {what} checkpoint lacks {len(missing)} tensor(s) the model needs: "
            f"{', '.join(_bit_key(k) for k in missing[:5])}" + (", ..." if len(missing) > 5 else "")
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the BiT {what} checkpoint does not fit timm's ResNetV2: {e}") from None
    name = timm_name(lay["layers"], lay["width_factor"])
    step = obj.get("step") if isinstance(obj, dict) else None
    info = {
        "groups": None,
        "class_names": None,
        "arch": name or f"bit-resnetv2{list(lay['layers'])}x{lay['width_factor']}",
        "in_chans": lay["in_chans"],
        "num_outputs": lay["num_outputs"],
        "step": int(step) if isinstance(step, (int, float, torch.Tensor)) else None,
    }
    return model, info
