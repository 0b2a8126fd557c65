"""`mosx train`: the MOS reference trainer (group-softmax or flat fine-tuning) with Unleashing Mask.

Python API:

    from mosx.train import make_config, train
    cfg = make_config("cpu-demo", data="folder/", groups="random:4", steps=100, out="runs/demo")
    result = train(cfg)              # TrainResult: losses, images/s, model path, groups
    model, info = load_model(result.model_path)

Command line: `mosx train --preset paper --data train_list.txt --model resnetv2_101x1_bit
--weights BiT-S-R101x1.npz --out runs/mos` (torchrun for several GPUs / nodes).

Layout: config (TrainConfig, presets, CLI flags), data (datasets, transforms, samplers), grouping,
models, mixup, schedule; loop (`train`: the stages in order, and the setup stage), resume (the run
checkpoint), flood_level (UM's b), features (loaders, feature cache), steps (the step loop), log
(loss log), save (model file, accuracy), state (what the stages pass), checkpoint (atomic writes).
"""

from __future__ import annotations

import json
import sys

from .._io import OutputBusy, disk_full_exit
from .config import PRESETS, TrainConfig, build_parser, config_from_args, make_config
from .data import UnreadableImage
from .loop import TrainResult, make_loss, train
from .models import Classifier, build_model, load_model
from .resume import ResumeMismatch
from .state import NonFiniteTraining

__all__ = [
    "main",
    "train",
    "make_config",
    "TrainConfig",
    "TrainResult",
    "PRESETS",
    "load_model",
    "build_model",
    "Classifier",
    "make_loss",
    "NonFiniteTraining",
    "ResumeMismatch",
]


# what stops a run with a message and an exit code instead of a traceback
_EXIT_CODES = {ResumeMismatch: 2, OutputBusy: 2, NonFiniteTraining: 3, UnreadableImage: 4}


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"mosx train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        result = train(cfg)
    except tuple(_EXIT_CODES) as e:
        print(f"mosx train: {e}", file=sys.stderr)
        return _EXIT_CODES[type(e)]
    except OSError as e:
        advice = "Every checkpoint written in full is intact: free space, then rerun the same command with --resume."
        return disk_full_exit("mosx train", e, advice)
    if result.flood_level is not None and cfg.um_estimate_only:
        print(f"{result.flood_level:.6f}")
    return 0
