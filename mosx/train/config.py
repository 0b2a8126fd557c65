"""Training settings: one dataclass, named presets, and the command-line parser built from them.

The default preset ("paper") is the MOS reference recipe (Huang & Li 2021): BiT-S-R101x1 with a
frozen backbone, SGD momentum 0.9 without weight decay, lr 0.003, batch 512, 500 warm-up steps,
lr / 10 at 6k, 12k and 18k steps, 20k steps, mixup Beta(0.1, 0.1), resize 512 / crop 480 / flip,
normalise with mean = std = 0.5, evaluation at 480x480.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields

__all__ = ["TrainConfig", "PRESETS", "make_config", "build_parser", "config_from_args"]


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # image folder, list file (.txt), or tensors (.pt: {"x", "y"})
    data_root: str | None = None  # root of the relative paths in a list file
    val_data: str | None = None  # same forms; top-1 accuracy is reported at the end
    groups: str | None = None  # JSON | sizes:4,3,... | taxonomy:FILE | kmeans:K | random:K | list
    loss: str = "group"  # "group" (MOS group softmax) or "flat" (softmax baseline)
    # model
    model: str = "resnetv2_101x1_bit"  # any timm name, "small-cnn", or "identity" (data are features)
    weights: str | None = None  # backbone weights: BiT .npz, .pth/.pt state dict, .safetensors
    init: str | None = None  # start from a trained mosx model.pt / checkpoint (UM fine-tuning)
    train_blocks: int = 0  # 0: head only (paper); N: last N backbone blocks too; -1: all
    head_init: str = "zero"  # "zero" (paper) or "random" (training a backbone from scratch)
    # optimisation (paper recipe)
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 512  # global batch per optimizer step
    micro_batch: int = 0  # per-device batch; 0 = batch_size / world size (no accumulation)
    warmup_steps: int = 500
    milestones: tuple = (6000, 12000, 18000)
    lr_decay: float = 0.1
    steps: int = 20000
    mixup_alpha: float = 0.1  # 0 disables mixup
    # transforms
    resize: int = 512
    crop: int = 480
    flip: bool = True
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    eval_resize: int = 480
    # frozen-backbone feature cache
    cache_features: bool = False  # backbone frozen: extract features once, train the head on them
    cache_views: int = 0  # 0: one eval-transform view; V: V augmented (train-transform) views
    # Unleashing Mask
    um_flood_level: float | None = None  # flooding level b, given directly
    um_estimate: float | None = None  # estimate b with a random mask keeping this weight fraction
    um_estimate_only: bool = False  # print the estimated b and stop
    umap_keep: float | None = None  # UMAP: learned masks keeping this fraction of every layer
    umap_train_weights: bool = False  # UMAP: train the weights as well as the mask scores
    # throughput / runtime
    device: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    channels_last: str = "auto"  # "auto" (on CUDA), "on", "off"
    fused: str = "auto"  # fused SGD: "auto" (on CUDA), "on", "off"
    compile: bool = False  # torch.compile the model
    workers: int = -1  # DataLoader workers per process; -1 = auto
    threads: int = 0  # torch CPU threads (0 = leave torch's default)
    seed: int = 0
    deterministic: bool = False
    # bookkeeping
    out: str = "runs/mosx"
    log_every: int = 50
    ckpt_every: int = 1000
    resume: bool = False
    resume_force: bool = False  # resume even when the checkpoint was made with other settings or data
    trust_pickle: bool = False  # allow --init / .pt data files that need pickle (it can run code)
    progress: bool = True
    step_sleep: float = 0.0  # seconds to sleep per step (tests: makes a run killable mid-way)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


PRESETS: dict[str, dict] = {
    "paper": {},
    "paper-flat": {"loss": "flat"},
    # A few-minute CPU run: a small CNN trained from scratch on small images.
    "cpu-demo": {
        "model": "small-cnn",
        "train_blocks": -1,
        "lr": 0.05,
        "batch_size": 64,
        "warmup_steps": 20,
        "milestones": (150, 250),
        "steps": 300,
        "resize": 36,
        "crop": 32,
        "eval_resize": 32,
        "amp": "off",
        "workers": 0,
        "log_every": 20,
        "ckpt_every": 100,
    },
}


def from_preset(cls, presets: dict, preset: str, overrides: dict, what: str):
    """cls(**presets[preset], **overrides), naming `what` ("training", "demo") when the preset or an
    override is unknown."""
    if preset not in presets:
        raise ValueError(f"unknown {what} preset {preset!r}; choose from {', '.join(presets)}")
    bad = sorted(set(overrides) - {f.name for f in fields(cls)})
    if bad:
        raise ValueError(f"unknown {what} setting(s) {bad}")
    return cls(**{**presets[preset], **overrides})


def make_config(preset: str = "paper", **overrides) -> TrainConfig:
    """A TrainConfig from a preset name plus keyword overrides (unknown names raise)."""
    cfg = from_preset(TrainConfig, PRESETS, preset, overrides, "training")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"training setting: {msg}")

    need(cfg.loss in ("group", "flat"), f"loss must be 'group' or 'flat', got {cfg.loss!r}")
    for name in ("lr", "momentum", "weight_decay", "lr_decay", "mixup_alpha"):
        need(math.isfinite(getattr(cfg, name)), f"{name} must be a finite number, got {getattr(cfg, name)}")
    need(
        cfg.um_flood_level is None or math.isfinite(cfg.um_flood_level),
        f"um_flood_level must be a finite number, got {cfg.um_flood_level}",
    )
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.micro_batch >= 0, f"micro_batch must be >= 0, got {cfg.micro_batch}")
    need(cfg.steps >= 0, f"steps must be >= 0, got {cfg.steps}")
    need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    need(list(cfg.milestones) == sorted(cfg.milestones), f"milestones must ascend, got {cfg.milestones}")
    need(cfg.mixup_alpha >= 0, f"mixup_alpha must be >= 0, got {cfg.mixup_alpha}")
    need(cfg.amp in ("auto", "bf16", "off"), f"amp must be auto/bf16/off, got {cfg.amp!r}")
    need(cfg.channels_last in ("auto", "on", "off"), f"channels_last must be auto/on/off, got {cfg.channels_last!r}")
    need(cfg.fused in ("auto", "on", "off"), f"fused must be auto/on/off, got {cfg.fused!r}")
    need(cfg.head_init in ("zero", "random"), f"head_init must be 'zero' or 'random', got {cfg.head_init!r}")
    need(cfg.train_blocks >= -1, f"train_blocks must be >= -1, got {cfg.train_blocks}")
    need(cfg.cache_views >= 0, f"cache_views must be >= 0, got {cfg.cache_views}")
    need(not (cfg.cache_features and cfg.train_blocks != 0), "cache_features needs a frozen backbone (train_blocks 0)")
    need(
        not (cfg.cache_features and cfg.umap_keep is not None),
        "cache_features cannot be combined with UMAP masks (the masked backbone changes)",
    )
    for name in ("um_estimate", "umap_keep"):
        v = getattr(cfg, name)
        need(v is None or 0.0 < v <= 1.0, f"{name} must be in (0, 1], got {v}")
    need(
        not (cfg.um_flood_level is not None and cfg.um_estimate is not None),
        "give um_flood_level or um_estimate, not both",
    )
    need(not cfg.um_estimate_only or cfg.um_estimate is not None, "um_estimate_only needs um_estimate")
    need(len(cfg.mean) == len(cfg.std), "mean and std must have the same length")
    need(cfg.log_every >= 1 and cfg.ckpt_every >= 0, "log_every must be >= 1 and ckpt_every >= 0")


# ---------------------------------------------------------------------- command line
def _floats(s: str) -> tuple:
    return tuple(float(v) for v in s.split(",") if v.strip())


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (on/off), got {s!r}")


HELP = {
    "data": "training data: image folder, list file (<path> <group> <within>), or tensors .pt {'x','y'}",
    "groups": "grouping: groups.json | sizes:398,521,... | taxonomy:FILE (class group lines) | "
    "kmeans:K | random:K | list (from the list file)",
    "model": "timm model name (resnetv2_101x1_bit = BiT-S-R101x1, resnet50, ...), small-cnn, or identity",
    "weights": "local backbone weights: BiT .npz, .pth/.pt state dict or .safetensors",
    "init": "start from a trained mosx model.pt or checkpoint (e.g. for Unleashing Mask)",
    "train_blocks": "backbone blocks that train: 0 = head only (paper), N = last N, -1 = all",
    "head_init": "head initialisation: zero (paper, pretrained backbone) or random (a backbone trained from "
    "scratch needs it: a zero head passes it no gradient at the first step)",
    "batch_size": "global batch per optimizer step",
    "micro_batch": "per-device batch; accumulation reaches batch_size (0 = batch_size / world size)",
    "cache_features": "frozen backbone: extract features once and train the head on the cache",
    "cache_views": "feature cache views: 0 = one eval view, V = V augmented views",
    "um_flood_level": "Unleashing Mask: flooding level b (loss' = |L - b| + b)",
    "um_estimate": "Unleashing Mask: estimate b under a random weight mask keeping this fraction",
    "um_estimate_only": "print the estimated b and stop",
    "umap_keep": "UMAP: learn weight masks keeping this fraction per layer",
    "resume": "continue exactly from <out>/checkpoint.pt (refused when it was made with other settings, "
    "grouping or data, or is past --steps)",
    "resume_force": "with --resume: continue even when the checkpoint's settings, grouping or data differ",
    "trust_pickle": "allow --init and .pt data files that need pickle to load (it can run code stored in "
    "the file): only for files you trust",
    "step_sleep": argparse.SUPPRESS,
}


def build_parser(prog: str = "mosx train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="MOS group-softmax / flat fine-tuning with Unleashing Mask.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="paper",
        choices=sorted(PRESETS),
        help="recipe to start from; every setting below overrides it",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and stop")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": None, "help": HELP.get(f.name, "(default: preset)")}
        if f.name in ("milestones",):
            kw.update(type=_ints, metavar="S1,S2,...")
        elif f.name in ("mean", "std"):
            kw.update(type=_floats, metavar="A,B,C")
        elif f.type in ("bool", bool):
            kw.update(type=_bool, nargs="?", const=True, metavar="on|off")
        elif f.type in ("int", int):
            kw.update(type=int)
        elif f.type in ("float", float, "Optional[float]"):
            kw.update(type=float)
        else:
            kw.update(type=str)
        p.add_argument(flag, **kw)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return make_config(args.preset, **overrides)
