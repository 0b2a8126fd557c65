"""A deployable OOD gate: a trained model, a logit scorer and a threshold calibrated on ID data.

    gate = mosx.OODGate.calibrate("model.pt", id_val_loader, scorer="mos", tpr=0.95)
    pred, conf, score, is_ood = gate(images)
    gate.save("gate.pt")                      # mosx.load_model("gate.pt") returns the gate
    mosx.export.export_onnx(gate, "gate.onnx", image_size=32)

The threshold comes from :func:`mosx.metrics.threshold_at_tpr` on the gate's own scores of the
calibration images, so on those images the gate keeps exactly the ID fraction of the operating
point that :func:`mosx.metrics.ood_metrics` reports for the same TPR level and rule, and on any
OOD set it keeps exactly the fraction ``ood_metrics(...).fpr_at_tpr`` reports. A sample is OOD
when ``score < threshold`` (the comparison runs in float64, where the float32 threshold is exact).

Only logit scorers without fitted statistics can be gated (their score is a function of one
sample's logits): ``mos`` (grouped models), ``msp``, ``maxlogit``, ``energy[:temperature=T]`` and
``odin:temperature=T`` with ``eps=0``, ``entropy`` and ``gen[:gamma=G,M=M]`` (flat models).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import nn

from .groups import Groups, as_groups
from .metrics import threshold_at_tpr

__all__ = ["OODGate", "GateOutput", "GATE_FORMAT", "GATE_SCORERS"]

GATE_FORMAT = "mosx.gate/1"  # the format tag of gate files (OODGate.save)
GATE_SCORERS = ("mos", "msp", "maxlogit", "energy", "odin", "entropy", "gen")  # odin only with eps=0


class GateOutput(NamedTuple):
    """What the gate returns per sample: class id, its probability, the OOD score, the decision."""

    pred: torch.Tensor  # [N] int64 class id (mosx.group_predict for a grouped model, argmax otherwise)
    conf: torch.Tensor  # [N] the predicted class's probability (within its group for a grouped model)
    score: torch.Tensor  # [N] the scorer's score, higher = more in-distribution
    is_ood: torch.Tensor  # [N] bool, score < threshold


# torch.export.save writes the output structure by name: register one for GateOutput (torch's
# own helper; an older torch without it can still export, only not save the .pt2 with this output).
try:
    from torch.utils._pytree import _register_namedtuple

    _register_namedtuple(GateOutput, serialized_type_name="mosx.gate.GateOutput")
except (ImportError, ValueError):  # pragma: no cover - older torch, or registered twice (module reload)
    pass


# ------------------------------------------------------------------------------ scorer specs
def _scorer_spec(scorer, groups: Groups | None) -> dict:
    """{"name": ..., params...} of a supported scorer given as a spec string or a Scorer."""
    from . import scores as S

    if isinstance(scorer, dict):  # a stored spec
        scorer = scorer_spec_string(scorer)
    if isinstance(scorer, str):
        try:
            scorer = S.build_scorer(scorer, groups=groups)
        except ValueError as e:
            if "needs groups" in str(e):
                raise ValueError(
                    "OODGate: the mos scorer needs the model's grouping: give groups= (or a mosx model file "
                    "that stores one), or pick a flat-model scorer (msp, maxlogit, energy, odin, entropy, gen)"
                ) from None
            raise
    if not isinstance(scorer, S.Scorer):
        raise TypeError(f"OODGate: scorer must be a spec string or a mosx.scores.Scorer, got {type(scorer).__name__}")
    supported = "mos, msp, maxlogit, energy[:temperature=T], odin:temperature=T (eps=0), entropy, gen[:gamma=G,M=M]"
    if type(scorer) is S.MOS:
        if groups is not None and scorer.groups != groups:
            raise ValueError("OODGate: the mos scorer's grouping differs from the gate's groups")
        return {"name": "mos"}
    if type(scorer) is S.MSP:
        spec = {"name": "msp"}
    elif type(scorer) is S.MaxLogit:
        spec = {"name": "maxlogit"}
    elif type(scorer) is S.Energy:
        spec = {"name": "energy", "temperature": float(scorer.temperature)}
    elif type(scorer) is S.ODIN and scorer.eps == 0:
        spec = {"name": "odin", "temperature": float(scorer.temperature)}
    elif type(scorer) is S.Entropy:
        spec = {"name": "entropy"}
    elif type(scorer) is S.GEN:
        spec = {"name": "gen", "gamma": float(scorer.gamma), "M": int(scorer.M)}
    else:
        why = (
            "perturbs the input with a gradient step"
            if type(scorer) is S.ODIN
            else "needs statistics fitted on ID data"
            if scorer.needs_fit
            else f"reads {', '.join(scorer.needs)}, not the logits alone"
            if tuple(scorer.needs) != ("logits",)
            else "is not one of the gate's scorers (its formula is not written into the gate)"
        )
        raise ValueError(
            f"OODGate: scorer {scorer!r} {why}; a gate takes a logit scorer that needs no fitting: {supported}"
        )
    if groups is not None:
        raise ValueError(
            f"OODGate: scorer {spec['name']!r} reads flat class logits but the model is grouped "
            f"({groups.num_logits} = classes + others slots); use scorer='mos', or groups=None "
            "for a flat model"
        )
    return spec


def scorer_spec_string(spec: dict) -> str:
    """The build_scorer spec string of a stored scorer spec: {"name": "energy", "temperature": 2.0}
    -> "energy:temperature=2.0"."""
    params = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f":{params}" if params else "")


# ------------------------------------------------------------------------------ models
def _resolve_model(model):
    """(module, info, record) from a path, a module, or load_model's (module, info) pair. `record` is
    the mosx model file's own dict when the model was read from one (kept verbatim by save)."""
    from .models.backbones import MODEL_FORMAT
    from .models.files import load_model, read_file

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        loaded, info = load_model(path)
        if isinstance(loaded, OODGate):
            raise ValueError(f"OODGate.calibrate: {path} is already a gate file; give the model it was built from")
        record = None
        if os.path.isfile(path) and not path.endswith(".npz"):
            d = read_file(path)
            if isinstance(d, dict) and d.get("format") == MODEL_FORMAT:
                record = {k: v for k, v in d.items() if k != "state_dict"}
        return loaded, dict(info), record
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module) and isinstance(model[1], dict):
        return model[0], dict(model[1]), None
    if isinstance(model, nn.Module):
        if isinstance(model, OODGate):
            raise ValueError("OODGate.calibrate: the model is already a gate; give the model it was built from")
        return model, {}, None
    raise TypeError(
        f"OODGate: model must be an nn.Module, a model file path or load_model's (model, info), "
        f"got {type(model).__name__}"
    )


def _model_width(model: nn.Module) -> int | None:
    head = getattr(model, "head", None)
    return int(head.out_features) if isinstance(head, nn.Linear) else None


def _first_conv(module: nn.Module):
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _arch_of(model: nn.Module) -> str:
    """The build_backbone name of a Classifier's backbone, where it can be told from the module."""
    from .models.backbones import PlainCNN, SmallCNN

    bb = model.backbone
    if isinstance(bb, SmallCNN):
        return f"small-cnn-{bb.stages[0][0].out_channels}"
    if isinstance(bb, PlainCNN):
        return f"plain-cnn-{bb.stages[0][0].out_channels}"
    if isinstance(bb, nn.Identity):
        return "identity"
    cfg = getattr(bb, "pretrained_cfg", None) or getattr(bb, "default_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ValueError(
            f"OODGate.save: cannot tell the architecture of the backbone {type(bb).__name__}; "
            "give arch= to OODGate(...) / OODGate.calibrate(...)"
        )
    return name


def _model_record(model: nn.Module, info: dict, record: dict | None, arch: str | None) -> dict:
    """The mosx model file dict (format mosx.model/1, as mosx.models.save_model writes) of the
    gate's model, with its current weights."""
    from .models.backbones import MODEL_FORMAT, Classifier

    if not isinstance(model, Classifier):
        raise ValueError(
            f"OODGate.save: the gate's model is a {type(model).__name__}, not a mosx model "
            "(mosx.models.Classifier: a backbone and a linear head, as mosx train writes and "
            "mosx.models.build_model makes); only those can be saved in a gate file. Export it "
            "instead (mosx.export.export_onnx / export_pt2), which works for any module"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    groups = info.get("groups")
    if record is not None:
        return {**record, "state_dict": state}
    conv = _first_conv(model.backbone)
    return {
        "format": MODEL_FORMAT,
        "arch": arch or info.get("arch") or _arch_of(model),
        "num_features": int(model.head.in_features),
        "in_chans": int(info.get("in_chans") or (conv.in_channels if conv is not None else 3)),
        "num_outputs": int(model.head.out_features),
        "loss": info.get("loss") or ("group" if groups else "flat"),
        "groups": None
        if groups is None
        else {"num_groups": groups.num_groups, "class_to_group": list(groups.class_to_group)},
        "class_names": list(info["class_names"]) if info.get("class_names") is not None else None,
        "state_dict": state,
    }


def _images_of(batch):
    """The images of a loader batch: a tensor, the first entry of a tuple / list, or batch["image"]."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "inputs", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(
        f"OODGate.calibrate: a loader batch must be an image tensor, a tuple / list starting with one, "
        f"or a dict with 'image'; got {type(batch).__name__}"
    )


# ------------------------------------------------------------------------------ the gate
class OODGate(nn.Module):
    """model -> (pred, conf, score, is_ood), see :class:`GateOutput`.

    Build it with :meth:`calibrate` (the threshold from ID validation data at a TPR level), or
    directly from a known threshold. The model should be in eval mode (calibrate sets it).

    Args:
        model: the trained classifier (any module mapping images to logits; only a
            :class:`mosx.models.Classifier` can be saved with :meth:`save`).
        scorer: a spec string ("mos", "msp", "maxlogit", "energy:temperature=2", "odin:temperature=1000",
            "entropy", "gen:gamma=0.1,M=100")
            or a matching :class:`mosx.scores.Scorer`.
        threshold: samples with ``score < threshold`` are OOD.
        groups: the grouping of a grouped model (the mos scorer needs it); None for a flat model.
        tpr: the TPR level the threshold was calibrated at (kept for the record).
        fpr_rule: the rule it was calibrated under ("nearest" or "first").
        info: load_model's info of the model (class names, arch, ...), kept for :meth:`save`.
        arch: the backbone name for :meth:`save` when it cannot be told from the model.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer="mos",
        threshold: float = math.nan,
        *,
        groups=None,
        tpr: float | None = None,
        fpr_rule: str = "nearest",
        info: dict | None = None,
        arch: str | None = None,
        _record: dict | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"OODGate: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.groups = as_groups(groups) if groups is not None else None
        self.scorer_spec = _scorer_spec(scorer, self.groups)
        width = _model_width(model)
        if self.groups is not None and width is not None and width != self.groups.num_logits:
            raise ValueError(self._width_message(width))
        self.num_logits = width
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))
        self.tpr = None if tpr is None else float(tpr)
        self.fpr_rule = fpr_rule
        self.calibration: dict = {}
        self._info = {**(info or {}), "groups": self.groups}
        self._arch = arch
        self._record = _record

    @property
    def scorer(self) -> str:
        """The scorer's spec string (build_scorer syntax)."""
        return scorer_spec_string(self.scorer_spec)

    @property
    def grouped(self) -> bool:
        return self.groups is not None

    def _width_message(self, width: int) -> str:
        g = self.groups
        return (
            f"OODGate: the model outputs {width} logits but the grouping needs {g.num_logits} "
            f"(= {g.num_classes} classes + {g.num_groups} others slots): the model's width matches no "
            f"grouping given; pass the groups it was trained with (groups=None for a flat model)"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> GateOutput:
        return self.decide(self.model(images))

    def decide(self, logits: torch.Tensor) -> GateOutput:
        """The gate's outputs from the model's logits [N, L]."""
        pred, conf, score = self.predict_and_score(logits)
        is_ood = torch.lt(score.to(torch.float64), self.threshold)
        return GateOutput(pred, conf, score, is_ood)

    def predict_and_score(self, logits: torch.Tensor):
        """(pred, conf, score) from logits, without the threshold."""
        from .ops import group_predict, group_softmax_score

        if logits.dim() != 2:
            raise ValueError(f"OODGate: the model must give [N, L] logits, got shape {tuple(logits.shape)}")
        z = logits if logits.dtype == torch.float64 else logits.float()
        if self.groups is not None:
            if z.shape[1] != self.groups.num_logits:
                raise ValueError(self._width_message(int(z.shape[1])))
            pred, conf = group_predict(z, self.groups)
            return pred, conf, group_softmax_score(z, self.groups)
        spec = self.scorer_spec
        pred = z.argmax(dim=1)
        probs = torch.softmax(z, dim=1)
        conf = probs.gather(1, pred.unsqueeze(1)).squeeze(1)
        name = spec["name"]
        if name == "msp":
            score = probs.amax(dim=1)
        elif name == "maxlogit":
            score = z.amax(dim=1)
        elif name == "energy":
            t = spec["temperature"]
            score = t * torch.logsumexp(z / t, dim=1)
        elif name == "entropy":  # the formulas of mosx.scores.Entropy / GEN, written out for export
            logp = torch.log_softmax(z, dim=1)
            score = (logp.exp() * logp).sum(1)
        elif name == "gen":
            top = probs.topk(min(spec["M"], probs.shape[1]), dim=1, sorted=False).values
            score = -(top.pow(spec["gamma"]) * (1 - top).pow(spec["gamma"])).sum(1)
        else:  # odin, eps = 0
            score = torch.softmax(z / spec["temperature"], dim=1).amax(dim=1)
        return pred, conf, score

    # ------------------------------------------------------------------ calibration
    @classmethod
    def calibrate(
        cls,
        model,
        id_loader,
        scorer="mos",
        groups=None,
        tpr: float = 0.95,
        *,
        fpr_rule: str = "nearest",
        device=None,
        arch: str | None = None,
    ) -> OODGate:
        """A gate whose threshold keeps the `tpr` fraction of `id_loader`'s images as ID.

        Args:
            model: a module, a model file path (any form :func:`mosx.load_model` reads), or
                load_model's (model, info) pair; groups then default to the file's.
            id_loader: iterable of batches of ID validation images (tensors, or tuples / lists /
                dicts holding them, e.g. a DataLoader of (image, label)).
            scorer: see :class:`OODGate`.
            groups: the model's grouping; default: the model file's (None: a flat model).
            tpr: the fraction of ID images to keep, in (0, 1].
            fpr_rule: "nearest" (MOS reference) or "first", as in :func:`mosx.metrics.ood_metrics`.
            device: where to run the model (default: where its parameters are).
            arch: the backbone name stored by :meth:`save` when it cannot be told from the model.

        ``gate.calibration`` records the number of images, the measured TPR and the score range.
        """
        if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0 < tpr <= 1:
            raise ValueError(f"OODGate.calibrate: tpr must be a number in (0, 1], got {tpr!r}")
        if fpr_rule not in ("nearest", "first"):
            raise ValueError(f"OODGate.calibrate: fpr_rule must be 'nearest' or 'first', got {fpr_rule!r}")
        module, info, record = _resolve_model(model)
        g = as_groups(groups) if groups is not None else info.get("groups")
        if groups is not None and info.get("groups") is not None and g != info["groups"]:
            raise ValueError("OODGate.calibrate: groups= differ from the grouping stored in the model file")
        gate = cls(module, scorer, groups=g, tpr=tpr, fpr_rule=fpr_rule, info=info, arch=arch, _record=record)
        gate.eval()
        if device is None:
            p = next(module.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        scores = []
        with torch.no_grad():
            for batch in id_loader:
                x = _images_of(batch)
                if x.shape[0] == 0:
                    continue
                scores.append(gate.predict_and_score(module(x.to(device)))[2].cpu())
        if not scores:
            raise ValueError(
                "OODGate.calibrate: id_loader gave no images; the threshold is calibrated on ID "
                "validation images, at least one"
            )
        s = torch.cat(scores)
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            raise ValueError(
                f"OODGate.calibrate: {int(bad.sum())} calibration score(s) are NaN or infinite; "
                "check the model and the images"
            )
        thr = threshold_at_tpr(s, tpr, fpr_rule=fpr_rule)
        gate.threshold.fill_(thr)
        kept = int((s.double() >= thr).sum())
        gate.calibration = {
            "num_images": int(s.numel()),
            "kept": kept,
            "measured_tpr": kept / s.numel(),
            "score_min": float(s.min()),
            "score_max": float(s.max()),
        }
        return gate

    # ------------------------------------------------------------------ files
    def to_file_dict(self) -> dict:
        """The gate file's contents: plain types and tensors only (loads with weights_only=True)."""
        if math.isnan(float(self.threshold)):
            raise ValueError("OODGate.save: the gate has no threshold; calibrate it first")
        g = self.groups
        return {
            "format": GATE_FORMAT,
            "model": _model_record(self.model, self._info, self._record, self._arch),
            "scorer": dict(self.scorer_spec),
            "threshold": float(self.threshold),
            "tpr": self.tpr,
            "fpr_rule": self.fpr_rule,
            "groups": None if g is None else {"num_groups": g.num_groups, "class_to_group": list(g.class_to_group)},
            "calibration": dict(self.calibration),
        }

    def save(self, path) -> None:
        """Write the gate file (atomically); :func:`mosx.load_model` reads it back as the gate."""
        from ._io import atomic_save

        atomic_save(self.to_file_dict(), os.fspath(path))

    @classmethod
    def load(cls, path, *, map_location="cpu") -> OODGate:
        """The gate of a gate file (as written by :meth:`save`)."""
        from .models.files import load_model

        gate, _ = load_model(path, map_location=map_location)
        if not isinstance(gate, OODGate):
            raise ValueError(
                f"{os.fspath(path)}: not a gate file (format {GATE_FORMAT!r}); build one with OODGate.calibrate"
            )
        return gate

    def extra_repr(self) -> str:
        return (
            f"scorer={self.scorer!r}, threshold={float(self.threshold)!r}, tpr={self.tpr}, "
            f"fpr_rule={self.fpr_rule!r}, groups={self.groups!r}"
        )


def gate_from_file(d: dict, path: str):
    """(gate, info) from the dict of a gate file; used by :func:`mosx.load_model`."""
    from .models.backbones import MODEL_FORMAT
    from .models.files import _from_mosx_file

    if d.get("format") != GATE_FORMAT:
        raise ValueError(f"{path}: mosx gate file of format {d.get('format')!r}; this mosx reads {GATE_FORMAT!r}")
    try:
        rec, spec, threshold = d["model"], d["scorer"], d["threshold"]
    except KeyError as e:
        raise ValueError(f"{path}: mosx gate file lacks the entry {e.args[0]!r}") from None
    if not isinstance(rec, dict) or rec.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: the gate's model record is not a {MODEL_FORMAT!r} model")
    model, info = _from_mosx_file(rec, path)
    g = d.get("groups")
    groups = Groups.from_assignment(g["class_to_group"], g["num_groups"]) if g else None
    model.eval()
    gate = OODGate(
        model,
        spec,
        float(threshold),
        groups=groups,
        tpr=d.get("tpr"),
        fpr_rule=d.get("fpr_rule", "nearest"),
        info=info,
        _record={k: v for k, v in rec.items() if k != "state_dict"},
    )
    gate.calibration = dict(d.get("calibration") or {})
    gate.eval()
    return gate, {
        **info,
        "groups": groups,
        "gate": {"scorer": gate.scorer, "threshold": float(threshold), "tpr": gate.tpr, "fpr_rule": gate.fpr_rule},
    }
