"""Frozen-backbone training: full image pipeline against the feature cache (eval view, augmented views).

Real data (Fashion-MNIST from Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist):
1. a small CNN is trained from scratch (flat softmax) to serve as the "pretrained" backbone;
2. the MOS head (4 clothing groups) is trained on the frozen backbone with the same recipe three ways:
   through the full pipeline (augment + backbone forward every step), on a cache of one eval view,
   and on a cache of V augmented views. Reported: wall time (cache extraction included), final
   training loss and test top-1 accuracy.

    python bench/train_feature_cache.py [--n-train 12000] [--steps 300] [--threads 1]
"""

import argparse
import gzip
import json
import sys
import tempfile
import time

import numpy as np
import torch

FMNIST = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST classes: 0 T-shirt 1 Trouser 2 Pullover 3 Dress 4 Coat 5 Sandal 6 Shirt 7 Sneaker 8 Bag 9 Boot
TAXONOMY = {
    "0": "tops",
    "2": "tops",
    "4": "tops",
    "6": "tops",
    "1": "dress+trousers",
    "3": "dress+trousers",
    "5": "footwear",
    "7": "footwear",
    "9": "footwear",
    "8": "bags",
}


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from mosx.train import make_config, train

    xtr = torch.from_numpy(idx(f"{FMNIST}/train-images-idx3-ubyte.gz")[: a.n_train].copy()).unsqueeze(1)
    ytr = torch.from_numpy(idx(f"{FMNIST}/train-labels-idx1-ubyte.gz")[: a.n_train].astype(np.int64))
    xte = torch.from_numpy(idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[: a.n_test].copy()).unsqueeze(1)
    yte = torch.from_numpy(idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[: a.n_test].astype(np.int64))
    names = [str(c) for c in range(10)]
    tmp = tempfile.mkdtemp(prefix="mosx_cache_bench_")
    common = dict(
        threads=a.threads,
        workers=0,
        progress=False,
        amp="off",
        resize=32,
        crop=28,
        eval_resize=28,
        seed=0,
        ckpt_every=0,
        log_every=25,
    )
    t = time.perf_counter()
    pre = train(
        make_config(
            "cpu-demo",
            **common,
            model="small-cnn-16",
            loss="flat",
            steps=400,
            batch_size=64,
            milestones=(300,),
            out=f"{tmp}/pretrain",
        ),
        data={"x": xtr, "y": ytr, "class_names": names},
        val_data=(xte, yte),
    )
    print(f"pretrain: {time.perf_counter() - t:.1f}s, test acc {pre.val_accuracy:.4f}", flush=True)
    with open(f"{tmp}/tax.json", "w") as f:
        json.dump(TAXONOMY, f)
    head = dict(
        common,
        model="small-cnn-16",
        weights=f"{tmp}/pretrain/model.pt",
        train_blocks=0,
        groups=f"taxonomy:{tmp}/tax.json",
        steps=a.steps,
        batch_size=128,
        lr=0.05,
        warmup_steps=20,
        milestones=(a.steps // 2, 3 * a.steps // 4),
    )
    rows = []
    for label, kw in (
        ("full pipeline", {}),
        ("cache, 1 eval view", {"cache_features": True}),
        (f"cache, {a.views} augmented views", {"cache_features": True, "cache_views": a.views}),
    ):
        t = time.perf_counter()
        r = train(
            make_config("cpu-demo", **head, **kw, out=f"{tmp}/{len(rows)}"),
            data={"x": xtr, "y": ytr, "class_names": names},
            val_data=(xte, yte),
        )
        total = time.perf_counter() - t
        rows.append(
            {
                "run": label,
                "total_s": total,
                "loop_s": r.seconds,
                "cache_s": r.cache_seconds,
                "final_loss": r.final_loss,
                "test_acc": r.val_accuracy,
            }
        )
        print(rows[-1], flush=True)
    print(f"\n{'run':<28} {'total s':>8} {'loop s':>8} {'cache s':>8} {'loss':>8} {'test acc':>8}")
    for r in rows:
        print(
            f"{r['run']:<28} {r['total_s']:8.1f} {r['loop_s']:8.1f} {r['cache_s'] or 0:8.1f} "
            f"{r['final_loss']:8.4f} {r['test_acc']:8.4f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pretrain_test_acc": pre.val_accuracy, "rows": rows, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
