"""Unleashing Mask building blocks: flooding, flood-level estimation, UMAP masked layers, gate."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mosx
from mosx.masking import keep_count
from mosx.unleash import (
    MaskedConv2d,
    MaskedLinear,
    WeightMask,
    apply_masks,
    changed_samples,
    estimate_flood_level,
    flood,
    fold_masks,
    gate_samples,
    mask_scores,
    masked_layers,
    random_weight_masks,
    randomly_masked,
)


def top_k_mask(scores, keep):
    """Independent top-k by |scores| (stable sort: lower index first among ties)."""
    a = scores.detach().reshape(-1).abs()
    mask = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    mask[torch.sort(a, descending=True, stable=True).indices[: keep_count(a.numel(), keep)]] = True
    return mask.view(scores.shape)


class StdConv(nn.Conv2d):
    """A conv with its own forward (weight standardisation, like BiT's): masked by parametrization."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def small_net(gen, std_conv=False, num_out=5):
    conv1 = (StdConv if std_conv else nn.Conv2d)(3, 6, 3, padding=1)
    net = nn.Sequential(
        conv1,
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_out),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        net[1].running_mean.copy_(torch.randn(6, generator=gen) * 0.1)
        net[1].running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    return net


# ------------------------------------------------------------------------------ flooding
def test_flood_value_and_gradient_sign(gen):
    x = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = (x**2).mean()
    (g_plain,) = torch.autograd.grad(loss, x, retain_graph=True)
    hi = loss.item() + 1.0  # loss below b: value 2b - L, gradient flipped
    out = flood(loss, hi)
    assert torch.allclose(out, 2 * hi - loss)
    (g_hi,) = torch.autograd.grad(out, x, retain_graph=True)
    assert torch.equal(g_hi, -g_plain)
    lo = loss.item() - 0.5  # loss above b: unchanged
    out = flood(loss, lo)
    assert torch.allclose(out, loss)
    (g_lo,) = torch.autograd.grad(out, x)
    assert torch.equal(g_lo, g_plain)


def test_flood_with_grouped_loss(gen):
    groups = mosx.Groups.from_sizes([3, 2, 4])
    logits = torch.randn(6, groups.num_logits, generator=gen, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=gen)
    loss = mosx.group_cross_entropy(logits, y, groups)
    (g_plain,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_flood,) = torch.autograd.grad(flood(loss, loss.item() * 2), logits)
    torch.testing.assert_close(g_flood, -g_plain, rtol=0, atol=0)


def test_flood_bad_level():
    with pytest.raises(ValueError, match="flood level"):
        flood(torch.tensor(1.0), float("nan"))
    with pytest.raises(TypeError, match="tensor"):
        flood(1.0, 0.5)


# ------------------------------------------------------------------------------ masked layers
def test_apply_and_fold_masks_outputs(device, gen):
    net = small_net(gen).to(device).eval()
    x = torch.randn(4, 3, 9, 9, generator=gen).to(device)
    names = apply_masks(net, keep=0.7, score_init="kaiming_uniform", seed=3)
    assert names == ["0", "3", "7"]
    assert isinstance(net[0], MaskedConv2d) and isinstance(net[7], MaskedLinear)
    # Reference: the plain layers with where(top-k |scores|, w, 0) computed independently.
    ref = copy.deepcopy(net)
    fold_ref = nn.Sequential(*[m for m in ref])  # same modules
    with torch.no_grad():
        out = net(x)
        for i in (0, 3, 7):
            m = fold_ref[i]
            w = torch.where(top_k_mask(m.scores, 0.7), m.weight, torch.zeros_like(m.weight))
            plain = (nn.Conv2d if i != 7 else nn.Linear).__new__(nn.Conv2d if i != 7 else nn.Linear)
            plain.__dict__.update(m.__dict__)
            plain._parameters = {"weight": nn.Parameter(w), "bias": m.bias}
            fold_ref[i] = plain
        expected = fold_ref(x)
    torch.testing.assert_close(out, expected)
    # Fold: plain layers again, no scores, same outputs.
    assert fold_masks(net) == ["0", "3", "7"]
    assert type(net[0]) is nn.Conv2d and type(net[3]) is nn.Conv2d and type(net[7]) is nn.Linear
    assert not any("scores" in k for k in net.state_dict())
    assert masked_layers(net) == []
    with torch.no_grad():
        assert torch.equal(net(x), out)
    for i in (0, 3, 7):
        frac = (net[i].weight != 0).float().mean().item()
        assert abs(frac - keep_count(net[i].weight.numel(), 0.7) / net[i].weight.numel()) < 1e-6


def test_magnitude_init_is_magnitude_pruning(gen):
    lin = nn.Linear(20, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 20, generator=gen))
    net = nn.Sequential(lin)
    apply_masks(net, keep=0.25)
    assert torch.equal(net[0].mask(), top_k_mask(lin.weight, 0.25))


def test_magnitude_init_gives_zero_weights_movable_scores(gen):
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8, generator=gen))
        lin.weight[:2] = 0
    zero_head = nn.Linear(6, 3)
    nn.init.zeros_(zero_head.weight)
    net = nn.Sequential(lin, zero_head)
    apply_masks(net, keep=0.5, train_weights=True, seed=0)
    s = net[0].scores.detach()
    assert torch.all(s[:2] > 0) and torch.all(s[:2] < s[2:].min())  # ranking of |w| kept
    assert torch.equal(s[2:], lin.weight[2:].abs())
    assert torch.all(net[1].scores > 0)
    # grad_scores = grad * w * sign(s): zero weights give none until they train away from 0;
    # then the kept head weights' scores move (with zero scores, sign 0 would block them).
    x = torch.randn(4, 8, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).square().sum().backward()
    assert torch.all(net[1].scores.grad == 0)
    opt.step()
    opt.zero_grad()
    net(x).square().sum().backward()
    kept = net[1].mask()
    assert torch.all(net[1].scores.grad[kept] != 0)


def test_frozen_weights_train_only_scores(gen):
    net = small_net(gen)
    weights_before = [p.detach().clone() for p in net.parameters()]
    apply_masks(net, keep=0.6)
    scores = mask_scores(net)
    assert len(scores) == 3
    assert not net[0].weight.requires_grad and not net[0].bias.requires_grad
    assert net[1].weight.requires_grad  # norm layers untouched
    x = torch.randn(4, 3, 9, 9, generator=gen)
    F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
    assert net[0].weight.grad is None and net[7].weight.grad is None
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    # straight-through: every score gets a gradient, also where the mask is 0
    s7, m7 = net[7].scores, net[7].mask()
    assert (s7.grad[~m7] != 0).any()
    torch.optim.SGD(scores, lr=0.1).step()
    for p, before in zip(
        [net[0].weight, net[3].weight, net[7].weight], [weights_before[0], weights_before[4], weights_before[6]]
    ):
        assert torch.equal(p, before)


def test_train_weights_gets_masked_gradient(gen):
    net = nn.Sequential(nn.Linear(6, 4))
    apply_masks(net, keep=0.5, train_weights=True)
    x = torch.randn(3, 6, generator=gen)
    net(x).square().sum().backward()
    m = net[0].mask()
    assert net[0].weight.grad is not None
    assert torch.all(net[0].weight.grad[~m] == 0) and (net[0].weight.grad[m] != 0).any()
    # A weight frozen beforehand (e.g. a frozen backbone) stays frozen; its scores still train.
    frozen = nn.Sequential(nn.Linear(6, 4))
    frozen[0].weight.requires_grad_(False)
    apply_masks(frozen, keep=0.5, train_weights=True)
    assert not frozen[0].weight.requires_grad and frozen[0].bias.requires_grad
    assert frozen[0].scores.requires_grad


def test_layer_selection(gen):
    net = small_net(gen)
    assert apply_masks(net, 0.5, layers=["3"]) == ["3"]
    assert isinstance(net[3], MaskedConv2d) and type(net[0]) is nn.Conv2d
    assert apply_masks(net, 0.5, layers=lambda n, m: isinstance(m, nn.Linear)) == ["7"]
    assert apply_masks(net, 0.5) == ["0"]  # already masked layers are skipped
    with pytest.raises(ValueError, match="no module named"):
        apply_masks(small_net(gen), 0.5, layers=["nope"])
    with pytest.raises(ValueError, match="not a conv or linear"):
        apply_masks(small_net(gen), 0.5, layers=["1"])
    with pytest.raises(ValueError, match="keep"):
        apply_masks(small_net(gen), 1.5)
    with pytest.raises(ValueError, match="score_init"):
        apply_masks(small_net(gen), 0.5, score_init="zeros")


def test_parametrized_layer_with_own_forward(gen):
    net = small_net(gen, std_conv=True).eval()
    x = torch.randn(2, 3, 9, 9, generator=gen)
    apply_masks(net, keep=0.6, layers=["0"])
    assert isinstance(net[0], StdConv) and isinstance(net[0].parametrizations.weight[0], WeightMask)
    assert len(mask_scores(net)) == 1
    orig = net[0].parametrizations.weight.original
    assert not orig.requires_grad
    m = top_k_mask(net[0].parametrizations.weight[0].scores, 0.6)
    ref = copy.deepcopy(net)
    fold_masks(ref)
    with torch.no_grad():
        out = net(x)
        assert torch.equal(ref[0].weight, torch.where(m, orig, torch.zeros_like(orig)))
        assert torch.equal(ref(x), out)
        assert torch.equal(net(x), out)  # folding a deep copy leaves the original working
    assert type(ref[0]) is StdConv and masked_layers(ref) == []
    assert isinstance(ref[0].weight, nn.Parameter) and list(ref[0].state_dict()) == ["weight", "bias"]
    fold_masks(net)
    with torch.no_grad():
        assert torch.equal(net(x), out)
    assert type(net[0]) is StdConv


def test_masked_layer_constructors(gen):
    conv = MaskedConv2d(3, 4, 3, keep=0.5)
    lin = MaskedLinear(5, 2, keep=0.5, score_init="kaiming_uniform")
    assert conv.scores.shape == conv.weight.shape and "keep=0.5" in repr(conv)
    assert conv(torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)
    assert lin(torch.randn(2, 5)).shape == (2, 2)
    with pytest.raises(ValueError, match="keep"):
        MaskedLinear(2, 2, keep=0.0)


# ------------------------------------------------------------------------------ flood level
def _data(gen, n=23, num_classes=5):
    x = torch.randn(n, 3, 9, 9, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7), x, y


def test_random_weight_masks(gen):
    net = small_net(gen)
    a = random_weight_masks(net, 0.8, seed=1)
    b = random_weight_masks(net, 0.8, seed=1)
    c = random_weight_masks(net, 0.8, seed=2)
    assert list(a) == ["0", "3", "7"]
    for name, m in a.items():
        assert m.dtype == torch.bool and int(m.sum()) == keep_count(m.numel(), 0.8)
        assert torch.equal(m, b[name])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_estimate_flood_level_matches_direct_and_restores(gen):
    net = small_net(gen)
    net.train()
    net[1].eval()  # a mixed train/eval state must come back as it was
    loader, x, y = _data(gen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    b = estimate_flood_level(net, loader, F.cross_entropy, keep=0.9, seed=5)
    # Restored bit for bit (parameters and buffers: eval mode never updates BN statistics).
    for k, v in net.state_dict().items():
        assert torch.equal(
            v.view(torch.uint8) if v.is_floating_point() else v,
            before[k].view(torch.uint8) if v.is_floating_point() else before[k],
        ), k
    assert net.training and not net[1].training and net[0].training
    # Direct computation: masked copy, eval mode, one batch of everything.
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        for name, m in random_weight_masks(ref, 0.9, seed=5).items():
            ref.get_submodule(name).weight.mul_(m)
        direct = F.cross_entropy(ref(x), y).item()
    assert b == pytest.approx(direct, rel=1e-6)
    # The mask matters: the unmasked model's loss differs.
    with torch.no_grad():
        assert abs(F.cross_entropy(copy.deepcopy(net).eval()(x), y).item() - b) > 1e-4


def test_estimate_flood_level_grouped_and_per_sample(gen):
    groups = mosx.Groups.from_sizes([2, 3])
    net = small_net(gen, num_out=groups.num_logits)
    loader, x, y = _data(gen)
    b = estimate_flood_level(
        net, loader, lambda out, t: mosx.group_cross_entropy(out, t, groups), keep=0.8, seed=0, max_batches=2
    )
    b_none = estimate_flood_level(
        net,
        loader,
        lambda out, t: mosx.group_cross_entropy(out, t, groups, reduction="none"),
        keep=0.8,
        seed=0,
        max_batches=2,
    )
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        for name, m in random_weight_masks(ref, 0.8, seed=0).items():
            ref.get_submodule(name).weight.mul_(m)
        # first two batches of 7: the summed group loss, averaged over the 14 samples
        direct = mosx.group_cross_entropy(ref(x[:14]), y[:14], groups, reduction="none").mean().item()
    assert b == pytest.approx(direct, rel=1e-6)
    assert b_none == pytest.approx(direct, rel=1e-6)


def test_estimate_flood_level_restores_after_error(gen):
    net = small_net(gen)
    before = [p.clone() for p in net.parameters()]
    loader, _, _ = _data(gen)

    def broken(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_flood_level(net, loader, broken)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert net.training
    with pytest.raises(ValueError, match="no samples"):
        estimate_flood_level(net, [], F.cross_entropy)
    with pytest.raises(ValueError, match="keep"):
        estimate_flood_level(net, loader, F.cross_entropy, keep=0)


# ------------------------------------------------------------------------------ sample gate
def test_gate_samples(gen):
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    losses = x.exp()
    gated = gate_samples(losses, drop=torch.tensor([1]), reverse=torch.tensor([False, False, True, False, True]))
    expected_value = losses.detach().clone()
    expected_value[1] = 0
    assert torch.equal(gated.detach(), expected_value)
    (g,) = torch.autograd.grad(gated.sum(), x)
    coef = torch.tensor([1.0, 0.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    assert torch.equal(g, coef * x.detach().exp())
    with pytest.raises(ValueError, match="both"):
        gate_samples(losses, drop=[2], reverse=[2])
    with pytest.raises(ValueError, match="1-D"):
        gate_samples(losses.view(5, 1))
    with pytest.raises(ValueError, match="shape"):
        gate_samples(losses, drop=torch.ones(4, dtype=torch.bool))


def test_randomly_masked_and_changed_samples(gen):
    net = small_net(gen).eval()
    x = torch.randn(10, 3, 9, 9, generator=gen)
    before = [p.clone() for p in net.parameters()]
    with torch.no_grad():
        logits = net(x)
        with randomly_masked(net, 0.7, seed=4) as masks:
            assert torch.equal(net[7].weight, before[-2] * masks["7"])
            masked = net(x)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    chosen = changed_samples(logits, masked, 0.3)
    kl = F.kl_div(F.log_softmax(masked, 1), F.log_softmax(logits, 1), log_target=True, reduction="none").sum(1)
    assert int(chosen.sum()) == 3
    assert torch.equal(chosen.nonzero().view(-1).sort().values, kl.topk(3).indices.sort().values)
    with pytest.raises(ValueError, match="same"):
        changed_samples(logits, masked[:5], 0.3)
