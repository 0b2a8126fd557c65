"""The demo's settings: `DemoSettings` (data sizes, the recipe, Unleashing Mask, scaling, runtime),
the presets (quick, full, tiny), their validation, the scores each model is evaluated with, and the
small shared helpers (the device choice, the progress line, `DemoError`)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

__all__ = [
    "settings_record",
    "same_settings",
    "DemoError",
    "DemoSettings",
    "PRESETS",
    "FLAT_SCORES",
    "GROUPED_SCORES",
    "SCALING_SCORES",
    "make_settings",
    "resolve_device",
]

# Flat-model scores (the baselines of the MOS paper and later ones) and their table labels, in the
# order the table shows them; MOS (grouped model) comes last.
FLAT_SCORES = {
    "msp": "MSP",
    "odin:temperature=1000": "ODIN (T=1000)",
    "mahalanobis": "Mahalanobis",
    "energy": "Energy",
    "kl_matching": "KL matching",
    "maxlogit": "MaxLogit",
    "gradnorm": "GradNorm",
    "react-energy": "ReAct + Energy",
    "ash-energy": "ASH-S + Energy",
    "scale-energy": "SCALE + Energy",
    "dice-energy": "DICE + Energy",
}
# MOS on the grouped model, plain and under each feature-shaping method (the features shaped, the
# grouped head applied, MOS scored): the flat rows above give the same shaping over Energy.
GROUPED_SCORES = {
    "mos": "MOS",
    "react-mos": "ReAct + MOS",
    "ash-mos": "ASH-S + MOS",
    "scale-mos": "SCALE + MOS",
    "dice-mos": "DICE + MOS",
}
SCALING_SCORES = {"msp": "MSP", "energy": "Energy", "mos": "MOS"}


@dataclass
class DemoSettings:
    # data (mosx.data.BenchmarkConfig)
    classes: int = 100
    scripts: int | None = None  # groups; None: the data builder's default (classes // 5, <= 22)
    image_size: int = 32
    train_per_class: int = 200
    test_per_class: int = 50
    ood_per_set: int = 2000
    fit_per_class: int = 50  # training images per class used to fit KL / Mahalanobis / ReAct
    data_seed: int = 0
    data_root: str | None = None  # default ~/.cache/mosx/data (env MOSX_DATA)
    font_dir: str | None = None  # the Noto font files; None: mosx.data's default (/usr/share/fonts/...)
    # model and recipe (mosx.train, preset cpu-demo)
    arch: str = "plain-cnn"  # backbone: plain-cnn or small-cnn (mosx.train.models)
    width: int = 16  # backbone width (model name f"{arch}-{width}")
    epochs: float = 6.0  # backbone training (stage 1)
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4  # stage 1 only; the heads follow the paper (no weight decay)
    head_epochs: float = 10.0  # flat / grouped heads on the frozen backbone (stage 2)
    head_lr: float = 0.1
    mixup: float = 0.1  # the MOS recipe's Beta(0.1, 0.1) mixup
    # Unleashing Mask
    um_keep: float = 0.965  # weights kept by the random mask that estimates b
    umap_keep: float = 0.8  # weights kept by UMAP's learned masks
    um_epochs: float = 0.5
    um_lr: float = 0.01
    # Unleashing Mask in its regime (--um-regime: mosx.demo.regime)
    regime_train_per_class: int = 50  # a small training set, so that the network memorises it
    regime_val_per_class: int = 20  # ID validation images per class (disjoint training images)
    regime_epochs: float = 30.0
    regime_lr: float = 0.05
    regime_weight_decay: float = 5e-4
    regime_val_ood: str = "silhouettes"  # the OOD validation set; the other OOD sets are the test sets
    regime_um_keeps: tuple = (0.9, 0.965, 0.99)  # weight fractions kept by the mask that estimates b
    regime_um_lrs: tuple = (0.01, 0.001)
    regime_um_epochs: float = 3.0  # fine-tuning epochs; every epoch is a candidate
    regime_max_acc_drop: float = 0.01  # a candidate may lose at most this much ID validation accuracy
    # scaling experiment
    scaling_classes: tuple = (20, 50, 100, 200, 400)
    # runtime
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def steps(self, n_train: int) -> int:
        return max(1, round(self.epochs * n_train / self.batch_size))

    @property
    def model_name(self) -> str:
        return f"{self.arch}-{self.width}"


PRESETS = {
    # what the README runs: about two minutes on an idle 2-core CPU, data build included
    # (recipe chosen on ID validation data: docs/demo_results.md, tools/demo_recipe_search.py)
    "quick": {},
    # a stronger model with more data: tens of minutes on a CPU, about a minute on a GPU
    "full": {"width": 32, "train_per_class": 400, "epochs": 8.0, "head_epochs": 20.0, "fit_per_class": 100},
    # CI smoke size: a few classes, a few hundred images, one epoch
    "tiny": {
        "classes": 8,
        "scripts": 4,
        "image_size": 16,
        "train_per_class": 40,
        "test_per_class": 10,
        "ood_per_set": 40,
        "fit_per_class": 10,
        "width": 8,
        "epochs": 1.0,
        "head_epochs": 2.0,
        "batch_size": 32,
        "lr": 0.05,
        "um_epochs": 0.5,
        "scaling_classes": (8, 12),
        "regime_train_per_class": 20,
        "regime_val_per_class": 10,
        "regime_epochs": 2.0,
        "regime_um_keeps": (0.965,),
        "regime_um_lrs": (0.01,),
        "regime_um_epochs": 1.0,
    },
}


def settings_record(s: DemoSettings) -> dict:
    """The settings as every results JSON stores them (tuples as lists)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(s)))


# how a run shows progress and where it ran: never part of what --reuse compares
RUN_ONLY = ("progress", "device")


def same_settings(saved: dict, s: DemoSettings, ignore: tuple = (), ignore_prefix: str | None = None) -> bool:
    """Whether the settings stored in a results file equal s, apart from RUN_ONLY, the names in
    `ignore` and the names starting with `ignore_prefix` (settings of other experiments)."""

    def kept(d):
        return {
            k: v
            for k, v in d.items()
            if k not in RUN_ONLY and k not in ignore and not (ignore_prefix and k.startswith(ignore_prefix))
        }

    return kept(saved) == kept(settings_record(s))


def make_settings(preset: str = "quick", **overrides) -> DemoSettings:
    from mosx.train.config import from_preset

    s = from_preset(DemoSettings, PRESETS, preset, overrides, "demo")
    _validate(s)
    return s


def _validate(s: DemoSettings) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"demo setting: {msg}")

    need(s.classes >= 2, f"classes must be >= 2, got {s.classes}")
    need(s.epochs > 0 and s.um_epochs > 0 and s.head_epochs > 0, "epochs, head_epochs and um_epochs must be > 0")
    need(s.batch_size >= 2, f"batch_size must be >= 2, got {s.batch_size}")
    need(s.width >= 1, f"width must be >= 1, got {s.width}")
    need(s.arch in ("plain-cnn", "small-cnn"), f"arch must be plain-cnn or small-cnn, got {s.arch!r}")
    need(s.weight_decay >= 0, f"weight_decay must be >= 0, got {s.weight_decay}")
    need(s.fit_per_class >= 1, f"fit_per_class must be >= 1, got {s.fit_per_class}")
    need(
        s.classes * s.train_per_class >= s.batch_size,
        f"{s.classes} classes x {s.train_per_class} training images is less than one batch of {s.batch_size}",
    )
    need(s.regime_epochs > 0 and s.regime_um_epochs > 0, "regime_epochs and regime_um_epochs must be > 0")
    need(
        s.regime_train_per_class >= 1 and s.regime_val_per_class >= 1,
        "regime_train_per_class and regime_val_per_class must be >= 1",
    )
    need(
        s.regime_um_keeps and all(0 < k < 1 for k in s.regime_um_keeps),
        f"regime_um_keeps must be in (0, 1), got {s.regime_um_keeps}",
    )
    need(s.regime_um_lrs and all(v > 0 for v in s.regime_um_lrs), f"regime_um_lrs must be > 0, got {s.regime_um_lrs}")
    need(s.regime_max_acc_drop >= 0, f"regime_max_acc_drop must be >= 0, got {s.regime_max_acc_drop}")
    need(all(c >= 2 for c in s.scaling_classes), f"scaling classes must be >= 2, got {s.scaling_classes}")
    need(
        s.device == "auto" or s.device.split(":")[0] in ("cpu", "cuda"),
        f"device must be auto, cpu or cuda[:N], got {s.device!r}",
    )


class DemoError(RuntimeError):
    """A demo setting or a missing piece that stops the run with a message (no traceback)."""


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    return name


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
