"""How the `mosx demo` quick recipe was chosen: ID validation accuracy on a development split that never
touches the benchmark's test fonts or any OOD set.

The development split: a benchmark built (with mosx.data, its own family split) from the font files of
the typeface families on the TRAIN side of the demo benchmark only. The scripts with two or more
train-side designs (Latin, Arabic, Hebrew, Thai, Greek, Cyrillic, Lao) qualify; their train-side
families are split again into dev-train and dev-validation families. A recipe is trained from scratch
(flat softmax, as the demo's stage 1) on dev-train and scored by top-1 accuracy on dev-validation.

    python tools/demo_recipe_search.py prepare              # font folder + dev benchmark under /tmp
    python tools/demo_recipe_search.py run NAME model=plain-cnn-16 epochs=6 wd=5e-4 [lr= bs= mixup= pad= ms=0.75,0.9]

Besides mosx's backbones (small-cnn-W, plain-cnn-W), model= takes the exploration variants tried on
the way (plain-<w1.w2.w3>-<bn|gn>-<gap|flat>[-fc<D>]); plain-16.32.64-bn-flat-fc256 is plain-cnn-16.
Each run appends one JSON line to <work>/results.jsonl. Pin it to one core for comparable timings
(taskset -c 1, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

WORK = os.environ.get("MOSX_RECIPE_WORK", "/tmp/mosx-recipe-search")
DEV = dict(num_classes=100, num_scripts=7, ood_sets=(), ood_per_set=1)


def prepare() -> str:
    """Link the train-side font files of the demo benchmark (seed 0) plus the held-out scripts' fonts
    (needed by the planner, not used) into WORK/fonts; build the dev benchmark into WORK/data."""
    import mosx.data
    from mosx.data import glyphs

    demo = mosx.data.load_benchmark(num_classes=100, progress=False)  # the quick demo's benchmark
    side = demo.manifest["family_split"]
    src = demo.manifest["config"]["font_dir"]
    ood_families = {f for _, _, fams in glyphs.OOD_SCRIPTS for f in fams}
    fonts = os.path.join(WORK, "fonts")
    os.makedirs(fonts, exist_ok=True)
    for name in sorted(os.listdir(src)):
        family = os.path.splitext(name)[0].split("-", 1)[0]
        dst = os.path.join(fonts, name)
        if (side.get(family) == "train" or family in ood_families) and not os.path.exists(dst):
            os.symlink(os.path.join(src, name), dst)
    bench = dev_benchmark()
    print(f"dev benchmark {bench.path}: scripts {bench.script_names}")
    print("dev-train families:", bench.manifest["fonts"]["train"])
    print("dev-validation families:", bench.manifest["fonts"]["test"])
    return bench.path


def dev_benchmark():
    import mosx.data

    return mosx.data.load_benchmark(
        os.path.join(WORK, "data"), font_dir=os.path.join(WORK, "fonts"), progress=False, **DEV
    )


class Variant(nn.Module):
    """Exploration variants: conv (BN or GN) + ReLU + 2x2 max pool stages; global average pool or
    flatten (32x32 input), optionally a fully connected feature layer with BatchNorm."""

    def __init__(self, widths, norm, pool, fc):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            n = nn.BatchNorm2d(w) if norm == "bn" else nn.GroupNorm(min(8, w), w)
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), n, nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.stages = nn.Sequential(*layers)
        self.pool = pool
        d = c if pool == "gap" else c * (32 // 2 ** len(widths)) ** 2
        self.fc = nn.Sequential(nn.Linear(d, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True)) if fc else nn.Identity()
        self.num_features = fc or d

    def forward(self, x):
        x = self.stages(x)
        return self.fc(x.mean((2, 3)) if self.pool == "gap" else x.flatten(1))


def _install_variants():
    import mosx.train.loop as loop

    base = loop.build_backbone

    def build(name, num_features=None, in_chans=3):
        parts = name.split("-")
        if parts[0] == "plain" and len(parts) >= 4 and "." in parts[1]:
            fc = int(parts[4][2:]) if len(parts) > 4 else 0
            net = Variant(tuple(int(v) for v in parts[1].split(".")), parts[2], parts[3], fc)
            return net, net.num_features
        return base(name, num_features, in_chans)

    loop.build_backbone = build


def run(tag: str, args: list[str]) -> dict:
    from mosx.train import make_config, train

    _install_variants()
    kw = dict(a.split("=", 1) for a in args)
    model = kw.pop("model", "plain-cnn-16")
    epochs, bs, lr = float(kw.pop("epochs", 6)), int(kw.pop("bs", 128)), float(kw.pop("lr", 0.1))
    wd, mix, pad = float(kw.pop("wd", 5e-4)), float(kw.pop("mixup", 0.1)), int(kw.pop("pad", 4))
    ms = tuple(float(v) for v in kw.pop("ms", "0.75,0.9").split(","))
    if kw:
        raise SystemExit(f"unknown settings {sorted(kw)}")
    bench = dev_benchmark()
    x, y = bench.train.tensors()
    xv, yv = bench.test.tensors()
    steps = round(epochs * len(y) / bs)
    cfg = make_config(
        "cpu-demo",
        model=model,
        loss="flat",
        head_init="random",
        steps=steps,
        batch_size=bs,
        lr=lr,
        weight_decay=wd,
        warmup_steps=min(20, max(1, steps // 10)),
        milestones=tuple(int(steps * m) for m in ms),
        mixup_alpha=mix,
        resize=32 + pad,
        crop=32,
        eval_resize=32,
        flip=False,
        seed=0,
        device="cpu",
        out=os.path.join(WORK, "runs", tag),
        progress=False,
        ckpt_every=0,
        log_every=max(1, steps // 8),
        workers=0,
    )
    t0 = time.perf_counter()
    r = train(cfg, data={"x": x, "y": y, "class_names": bench.class_names}, val_data=(xv, yv), log=lambda m: None)
    rec = dict(
        tag=tag,
        model=model,
        epochs=epochs,
        bs=bs,
        lr=lr,
        wd=wd,
        mixup=mix,
        pad=pad,
        ms=ms,
        val_acc=r.val_accuracy,
        seconds=round(time.perf_counter() - t0, 1),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(rec), flush=True)
    with open(os.path.join(WORK, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "prepare":
        prepare()
    elif len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)
