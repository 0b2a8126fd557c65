"""Model files: mosx's own self-describing model file, and the one loader every command uses.

`load_model` reads, without running code from the file (``torch.load(..., weights_only=True)``):
a mosx model file (`mosx train` output, :func:`save_model`), a MOS ``finetune.py`` checkpoint or any
BiT-PyTorch ResNetV2 state dict (recognised from its keys, :mod:`mosx.models.bit`), a plain state
dict (with `arch`, a timm model name), a BiT ``.npz`` (with `arch`, e.g. ``resnetv2_101x1_bit``),
or a timm model name with local `weights` (nothing is downloaded). A file that needs pickle (a
whole pickled ``nn.Module``, say) is refused unless the caller trusts it: ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import os
import pickle
import re

import torch
from torch import nn

from .._io import atomic_save
from ..groups import Groups
from . import bit
from .backbones import MODEL_FORMAT, Classifier, build_backbone

__all__ = ["save_model", "load_model", "read_file"]


def save_model(
    path: str,
    model: Classifier,
    *,
    arch: str,
    num_features: int,
    groups=None,
    loss: str,
    class_names=None,
    in_chans: int = 3,
    extra: dict | None = None,
) -> None:
    """A self-describing deployable model file, written atomically; plain types and tensors only, so
    it loads with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "arch": arch,
            "num_features": num_features,
            "in_chans": in_chans,
            "num_outputs": model.head.out_features,
            "loss": loss,
            "groups": None
            if groups is None
            else {"num_groups": groups.num_groups, "class_to_group": list(groups.class_to_group)},
            "class_names": list(class_names) if class_names is not None else None,
            "state_dict": state,
            **(extra or {}),
        },
        path,
    )


def read_file(path: str, *, map_location="cpu", trust_pickle: bool = False):
    """torch.load of a file a user named: tensors and plain types only, unless `trust_pickle`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        if trust_pickle:
            raise
        raise ValueError(
            f"{path}: this file needs pickle to load, which can run code stored in it, so it is refused. "
            f"If you trust the file, pass trust_pickle=True (--trust-pickle on the command line)."
        ) from None
    except EOFError:
        raise ValueError(f"{path}: the file is empty or truncated") from None


def _from_mosx_file(d: dict, path: str):
    try:
        backbone, dim = build_backbone(d["arch"], d["num_features"], d.get("in_chans", 3))
        model = Classifier(backbone, dim, d["num_outputs"])
        model.load_state_dict(d["state_dict"])
    except KeyError as e:
        raise ValueError(f"{path}: mosx model file lacks the entry {e.args[0]!r}") from None
    g = d.get("groups")
    try:
        groups = Groups.from_assignment(g["class_to_group"], g["num_groups"]) if g else None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: the grouping stored in the model file is invalid ({e})") from None
    return model, {
        "groups": groups,
        "class_names": d.get("class_names"),
        "loss": d.get("loss"),
        "arch": d["arch"],
        "in_chans": d.get("in_chans", 3),
    }


def _plain_info(**extra) -> dict:
    return {"groups": None, "class_names": None, **extra}


def _timm_model(name: str, num_classes: int | None) -> nn.Module:
    import timm

    if not timm.list_models(name) and name not in timm.list_models():
        raise ValueError(f"--model {name!r}: not a file and not a timm model name")
    return timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))


def _state_dict_of(state, path: str) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def load_model(
    path_or_name: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    num_classes: int | None = None,
    map_location="cpu",
    trust_pickle: bool = False,
):
    """(model, info) from a model file or a timm model name; see the module docstring.

    info: ``groups`` (a :class:`mosx.Groups` or None) and ``class_names`` (or None) where the file
    knows them; mosx model files add ``loss``, ``arch`` and ``in_chans``.
    """
    spec = os.fspath(path_or_name)
    if os.path.isfile(spec) and spec.endswith(".npz"):
        if arch is None:
            raise ValueError(f"{spec}: a BiT .npz needs --arch (e.g. resnetv2_101x1_bit)")
        model = _timm_model(arch, num_classes or 1000)
        model.load_pretrained(spec)
        bit.use_reference_eps(model)  # BiT's own code standardises with eps 1e-10 (timm: 1e-8)
        return model, _plain_info()
    if os.path.isfile(spec):
        d = read_file(spec, map_location=map_location, trust_pickle=trust_pickle)
        if isinstance(d, dict) and str(d.get("format", "")).startswith("mosx.model/"):
            if d.get("format") != MODEL_FORMAT:
                raise ValueError(
                    f"{spec}: mosx model file of format {d.get('format')!r}; this mosx reads {MODEL_FORMAT!r}"
                )
            return _from_mosx_file(d, spec)
        if isinstance(d, dict) and str(d.get("format", "")).startswith("mosx.gate/"):
            from ..gate import gate_from_file  # an OOD gate (mosx.OODGate.save): model + scorer + threshold

            return gate_from_file(d, spec)
        if isinstance(d, nn.Module):
            return d, _plain_info()
        if bit.is_bit_checkpoint(d):  # MOS finetune.py {"step", "model", "optim"} or a BiT ResNetV2 state dict
            return bit.load_bit(d, spec, arch=arch, num_classes=num_classes)
        if arch is None:
            raise ValueError(f"{spec}: a plain state dict needs --arch (a timm model name)")
        model = _timm_model(arch, num_classes)
        model.load_state_dict(_state_dict_of(d, spec))
        return model, _plain_info()
    w = None if weights is None else read_file(weights, map_location=map_location, trust_pickle=trust_pickle)
    if bit.is_bit_checkpoint(w):  # --model BiT-S-R101x1 (or resnetv2_101x1_bit) --weights bit.pth.tar
        return bit.load_bit(w, weights, arch=spec, num_classes=num_classes)
    model = _timm_model(spec, num_classes)
    if weights is None:
        raise ValueError(f"--model {spec!r}: timm weights are not downloaded here; give --weights PATH")
    model.load_state_dict(_state_dict_of(w, weights))
    return model, _plain_info()
