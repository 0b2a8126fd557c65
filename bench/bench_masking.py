"""Speed of mosx.masked_weight (UMAP layer mask) against the edge-popup way (full sort of |s|).

Sizes: a ResNet-50 3x3 conv of the last stage (512*512*9 = 2.4M weights) and a 1x1 conv of 1M.
Forward + backward of the masked weight with frozen weights (scores train), as in UMAP.
    pytest bench/bench_masking.py --benchmark-only
Runs on the CPU, and on the GPU when one is present and the CUDA kernels are built. On the GPU,
MOSX_MASK_SELECT=aten times the ATen (kthvalue) selection instead of mosx's radix select.
"""

import pytest
import torch
from conftest import QUICK

import mosx
from mosx.masking import keep_count, masked_weight

SHAPES = {"conv3x3_2.4M": (512, 512, 3, 3), "conv1x1_1M": (2048, 512, 1, 1)}
if QUICK:
    SHAPES = {"conv3x3_37k": (64, 64, 3, 3)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and mosx.cuda_built() else [])


class SortMask(torch.autograd.Function):
    """The usual implementation: sort |s| every step, zero the smallest, straight-through."""

    @staticmethod
    def forward(ctx, a, keep):
        out = torch.zeros_like(a)
        idx = a.flatten().sort(descending=True).indices[: keep_count(a.numel(), keep)]
        out.view(-1)[idx] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def sort_masked_weight(w, s, keep):
    return w * SortMask.apply(s.abs(), keep)


def step(fn, w, s, g):
    s.grad = None
    fn(w, s, 0.8).backward(g)
    if s.is_cuda:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["mosx", "sort"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_masked_weight_fwd_bwd(benchmark, device, shape, impl):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPES[shape], generator=gen).to(device)
    s = torch.randn(SHAPES[shape], generator=gen).to(device).requires_grad_()
    g = torch.randn(SHAPES[shape], generator=gen).to(device)
    fn = masked_weight if impl == "mosx" else sort_masked_weight
    benchmark.group = f"masked_weight {shape} {device}"
    benchmark.pedantic(step, args=(fn, w, s, g), rounds=1 if QUICK else 10, warmup_rounds=0 if QUICK else 2)
    # Both keep the same entries (distinct random scores: no ties to break differently).
    s.grad = None
    assert torch.equal(masked_weight(w, s.detach(), 0.8), sort_masked_weight(w, s.detach(), 0.8))
