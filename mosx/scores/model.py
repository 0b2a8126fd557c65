"""What the scorers read from a model: its final linear layer, its logits and its features.

:class:`LinearHead` holds that layer's weight and bias (ReAct recomputes logits with it);
:func:`linear_head` finds it in a model; :func:`model_outputs` returns (logits, features) of a batch,
features being the input of that layer. Imports nothing else from :mod:`mosx.scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearHead:
    """The final linear layer: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor | None = None  # [C]

    def __post_init__(self):
        w = self.weight.detach()
        if w.dim() == 4 and w.shape[2:] == (1, 1):  # a 1x1 conv head (BiT)
            w = w.flatten(1)
        if w.dim() != 2:
            raise ValueError(f"LinearHead: weight must be [C, D] (or a 1x1 conv [C, D, 1, 1]), got {tuple(w.shape)}")
        self.weight = w
        if self.bias is not None:
            self.bias = self.bias.detach()
            if self.bias.shape != (w.shape[0],):
                raise ValueError(f"LinearHead: bias must be [{w.shape[0]}], got {tuple(self.bias.shape)}")

    @classmethod
    def from_module(cls, m: torch.nn.Module) -> LinearHead:
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return cls(m.weight, m.bias)
        raise TypeError(f"LinearHead: expected nn.Linear or a 1x1 nn.Conv2d, got {type(m).__name__}")

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(features.device, features.dtype)
        b = None if self.bias is None else self.bias.to(features.device, features.dtype)
        return F.linear(features, w, b)


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "get_classifier", None)  # timm
    if callable(getter):
        m = getter()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return m
    for name in ("fc", "head", "classifier"):
        m = getattr(model, name, None)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return m
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"no linear head found in {type(model).__name__}: give a LinearHead explicitly")
    return last


def linear_head(model: torch.nn.Module) -> LinearHead:
    """The model's final linear layer (timm's get_classifier(), .fc/.head/.classifier, or the last
    nn.Linear), as a :class:`LinearHead`."""
    return LinearHead.from_module(_head_module(model))


def model_outputs(model: torch.nn.Module, inputs: torch.Tensor):
    """(logits, features) of a batch: features are the input of the final linear layer.

    Works with models that return (logits, features), timm-style models (forward_features +
    forward_head(pre_logits=True)), and any other model through a hook on its linear head.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        f = model.forward_features(inputs)
        feats = model.forward_head(f, pre_logits=True)
        return model.forward_head(f), feats.flatten(1)
    captured = []
    handle = _head_module(model).register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        out = model(inputs)
    finally:
        handle.remove()
    if isinstance(out, (tuple, list)):
        return out[0], out[1].flatten(1)
    if not captured:
        raise RuntimeError(f"model_outputs: the head of {type(model).__name__} was not called in forward")
    return out, captured[-1].flatten(1)


def _model_logits(model, inputs):
    """The logits of a batch (the first element when the model returns a tuple)."""
    out = model(inputs)
    return out[0] if isinstance(out, (tuple, list)) else out
