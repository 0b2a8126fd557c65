"""Training-step throughput of the MOS head (the paper's frozen-backbone case, on cached features):
Linear 2048 -> 1008 (ImageNet taxonomy groups), group cross-entropy with mixup, SGD momentum, batch 512.
Compared with the flat-softmax head (1000 outputs) on the same step.

    pytest bench/bench_train.py --benchmark-only   (MOSX_BENCH_QUICK=1: batch 64, one round)
"""

import os

import pytest
import torch

import mosx
from mosx.train.loop import make_loss
from mosx.train.mixup import Mixup, mix_inputs

QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"
BATCH = 64 if QUICK else 512
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["group", "flat"])
def test_head_step(benchmark, device, loss):
    groups = mosx.Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    outputs = groups.num_logits if loss == "group" else groups.num_classes
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(BATCH, 2048, generator=g).to(device)
    y = torch.randint(0, 1000, (BATCH,), generator=g).to(device)
    head = torch.nn.Linear(2048, outputs).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.003, momentum=0.9, fused=device == "cuda")
    fn = make_loss(loss, groups if loss == "group" else None)
    mix = Mixup(0.1, seed=0)

    def step():
        lam, perm = mix.draw(BATCH)
        perm = perm.to(device)
        out = fn(head(mix_inputs(feats, lam, perm)), y, lam, perm)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if QUICK:
        benchmark.pedantic(step, rounds=1, iterations=1)
    else:
        benchmark(step)
    benchmark.extra_info["images_per_step"] = BATCH
