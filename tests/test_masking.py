"""mosx.masked_weight (UMAP learned weight masks) against a sort-based plain-PyTorch reference."""

import numpy as np
import pytest
import torch

import mosx  # noqa: F401
from mosx.masking import keep_count, masked_weight

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------ reference
def ref_mask(scores, keep):
    """Top-k |scores| with a full stable sort: ties keep the lower flat index, NaN ranks highest."""
    a = scores.detach().reshape(-1).cpu()
    key = a.abs() if a.dtype == torch.float64 else a.float().abs()
    k = keep_count(a.numel(), keep)
    order = torch.sort(key, descending=True, stable=True).indices
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape).to(scores.device)


def draw(shape, dtype, device, gen, kind="normal"):
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # few distinct magnitudes, both signs: many ties in |s|
        x = torch.randint(-3, 4, shape, generator=gen).double()
    elif kind == "const":
        x = torch.full(shape, 0.5, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return x.to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------ forward
def test_keep_count():
    assert keep_count(10, 0.8) == 8
    assert keep_count(10, 0.85) == 9  # 8.5 rounds up
    assert keep_count(10, 1e-9) == 1  # never empty
    assert keep_count(10, 1.0) == 10
    assert keep_count(0, 0.5) == 0
    assert keep_count(1000, 0.965) == 965


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (37, 11), (5,), (1,)])
@pytest.mark.parametrize("keep", [0.8, 0.5, 0.965, 1.0, 1e-6])
def test_forward_matches_reference(device, gen, dtype, shape, keep):
    w = draw(shape, dtype, device, gen)
    s = draw(shape, dtype, device, gen)
    out, mask = masked_weight(w, s, keep, return_mask=True)
    expected = ref_mask(s, keep)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == keep_count(w.numel(), keep)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, torch.where(expected, w, torch.zeros_like(w)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["ties", "const"])
@pytest.mark.parametrize("keep", [0.8, 0.3, 0.5])
def test_ties_exactly_k_lower_index_first(device, gen, dtype, kind, keep):
    shape = (24, 7, 3)
    w = draw(shape, dtype, device, gen)
    s = draw(shape, dtype, device, gen, kind)
    mask = masked_weight(w, s, keep, return_mask=True)[1]
    assert int(mask.sum()) == keep_count(w.numel(), keep)
    assert torch.equal(mask, ref_mask(s, keep))
    # Independent check of the tie rule with NumPy's lexsort: by |s| descending, then index.
    a = np.abs(s.double().cpu().numpy().reshape(-1))
    order = np.lexsort((np.arange(a.size), -a))
    expected = np.zeros(a.size, dtype=bool)
    expected[order[: keep_count(a.size, keep)]] = True
    np.testing.assert_array_equal(mask.cpu().numpy().reshape(-1), expected)


def test_signs_and_zero_scores_tie_on_magnitude(device):
    s = torch.tensor([0.0, -2.0, 2.0, -0.0, 1.0, -1.0], device=device)
    w = torch.arange(1.0, 7.0, device=device)
    _, mask = masked_weight(w, s, 0.5, return_mask=True)  # k = 3: -2, 2, then 1 (index 4 < 5)
    assert mask.cpu().tolist() == [False, True, True, False, True, False]


def test_nan_scores_rank_highest(device):
    s = torch.tensor([1.0, float("nan"), 3.0, 2.0], device=device)
    w = torch.ones(4, device=device)
    _, mask = masked_weight(w, s, 0.5, return_mask=True)
    assert mask.cpu().tolist() == [False, True, True, False]
    for dt in (torch.float32, torch.float64):
        t, c = torch.ops.mosx._masked_weight_threshold(s.to(dt), 2)
        assert mask_from_threshold(s.to(dt), t, c).cpu().tolist() == [False, True, True, False]


def test_non_contiguous_inputs_use_logical_order(device, gen):
    w = draw((12, 20), torch.float32, device, gen).t()
    s = draw((12, 20), torch.float32, device, gen, "ties").t()
    assert not s.is_contiguous()
    out, mask = masked_weight(w, s, 0.7, return_mask=True)
    out_c, mask_c = masked_weight(w.contiguous(), s.contiguous(), 0.7, return_mask=True)
    assert torch.equal(mask, mask_c) and torch.equal(out, out_c)
    assert torch.equal(mask, ref_mask(s, 0.7))


def test_empty_layer(device):
    w = torch.empty(0, 3, device=device)
    out, mask = masked_weight(w, w.clone(), 0.8, return_mask=True)
    assert out.shape == (0, 3) and mask.shape == (0, 3)


def test_large_layer_float32_and_float64_agree(device, gen):
    # A layer beyond one CPU chunk / many GPU blocks, ties spread over all of them: float32 and
    # float64 selections must agree when the scores are exactly representable in both.
    s32 = torch.randint(-50, 51, (300, 257), generator=gen).float().to(device)
    w32 = torch.randn(300, 257, generator=gen).to(device)
    m32 = masked_weight(w32, s32, 0.8, return_mask=True)[1]
    m64 = masked_weight(w32.double(), s32.double(), 0.8, return_mask=True)[1]
    assert torch.equal(m32, m64)
    assert torch.equal(m32, ref_mask(s32, 0.8))


def mask_from_threshold(scores, t, c):
    """Apply the (T, c) rule of masked_weight.h in Python."""
    flat = scores.reshape(-1)
    if flat.dtype == torch.float64:
        bits = flat.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    else:
        bits = (flat.float().view(torch.int32) & 0x7FFFFFFF).long()
    idx = torch.arange(flat.numel(), device=flat.device)
    return ((bits > t) | ((bits == t) & (idx <= c))).view(scores.shape)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["normal", "ties", "const"])
@pytest.mark.parametrize("keep", [0.8, 0.31, 1.0])
def test_aten_selection_matches_kernel_selection(device, gen, dtype, kind, keep):
    # The CUDA op selects with ATen (kthvalue on packed keys / ties by cumsum); the CPU op with its
    # own radix select. Both must pick the same entries: check the ATen path on every device.
    shape = (40, 9, 3, 3)
    s = draw(shape, dtype, device, gen, kind)
    s.view(-1)[::7] = -s.view(-1)[::7]
    k = keep_count(s.numel(), keep)
    t, c = torch.ops.mosx._masked_weight_threshold(s, k)
    assert t.device == s.device and t.dtype == torch.int64 and t.dim() == 0
    m = mask_from_threshold(s, t, c)
    assert int(m.sum()) == k
    assert torch.equal(m, ref_mask(s, keep))
    assert torch.equal(m, masked_weight(s, s, keep, return_mask=True)[1])


# ------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_backward_matches_straight_through_reference(device, gen, dtype, wants):
    want_w, want_s = wants
    shape = (9, 4, 3, 3)
    w0 = draw(shape, dtype, device, gen)
    s0 = draw(shape, dtype, device, gen)
    s0.view(-1)[:5] = 0  # sign(0) = 0
    g = draw(shape, dtype, device, gen)
    w = w0.clone().requires_grad_(want_w)
    s = s0.clone().requires_grad_(want_s)
    masked_weight(w, s, 0.8).backward(g)
    mask = ref_mask(s0, 0.8)
    if want_w:
        assert torch.equal(w.grad, torch.where(mask, g, torch.zeros_like(g)))
    else:
        assert w.grad is None
    if want_s:
        # Reference: autograd of the surrogate sum(g * w * |s|) (float math, rounded once).
        sr = s0.double().clone().requires_grad_(True)
        (g.double() * w0.double() * sr.abs()).sum().backward()
        assert torch.equal(s.grad, sr.grad.to(dtype))
    else:
        assert s.grad is None


def test_backward_through_a_conv(device, gen):
    # The op inside a real layer: gradients equal those of the plain-PyTorch formulation.
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    w0 = torch.randn(4, 3, 3, 3, generator=gen).to(device)
    s0 = torch.randn(4, 3, 3, 3, generator=gen).to(device)
    w, s = w0.clone().requires_grad_(), s0.clone().requires_grad_()
    torch.nn.functional.conv2d(x, masked_weight(w, s, 0.6)).square().sum().backward()
    mask = ref_mask(s0, 0.6)
    wr, sr = w0.clone().requires_grad_(), s0.clone().requires_grad_()
    weff = torch.where(mask, wr, torch.zeros_like(wr))
    # straight-through: d w_eff / d s := w * sign(s)
    weff = weff + wr.detach() * (sr.abs() - sr.abs().detach())
    torch.nn.functional.conv2d(x, weff).square().sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)
    torch.testing.assert_close(s.grad, sr.grad)


def test_gradcheck_weight_path(gen):
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: masked_weight(w, s, 0.7), (w,))


def test_score_gradient_finite_differences_of_surrogate(gen):
    # Finite differences of the op w.r.t. the scores see zero (piecewise-constant mask). The
    # straight-through gradient is defined as the derivative of F(s) = sum(g * w * |s|); check it
    # against central differences of F, away from s = 0 where |s| has a kink.
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    s = s + 0.1 * s.sign()
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    sg = s.clone().requires_grad_()
    (gs,) = torch.autograd.grad(masked_weight(w, sg, 0.7), sg, g)
    eps = 1e-6
    fd = torch.empty_like(s)
    for i in range(s.numel()):
        e = torch.zeros_like(s).view(-1)
        e[i] = eps
        e = e.view_as(s)
        fd.view(-1)[i] = ((g * w * (s + e).abs()).sum() - (g * w * (s - e).abs()).sum()) / (2 * eps)
    torch.testing.assert_close(gs, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, gen, dtype):
    w = torch.randn(7, 3, 2, generator=gen, dtype=dtype).to(device)
    s = torch.randn(7, 3, 2, generator=gen, dtype=dtype).to(device)
    for rw, rs in [(False, False), (True, True), (False, True)]:
        torch.library.opcheck(
            torch.ops.mosx.masked_weight.default, (w.clone().requires_grad_(rw), s.clone().requires_grad_(rs), 0.6)
        )
    mask = masked_weight(w, s, 0.6, return_mask=True)[1]
    g = torch.randn_like(w)
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.mosx.masked_weight_backward.default, (g, w, s, mask, *flags))


def test_compiles_without_graph_break(gen):
    w = torch.randn(8, 6, generator=gen, requires_grad=True)
    s = torch.randn(8, 6, generator=gen, requires_grad=True)
    x = torch.randn(3, 6, generator=gen)

    def f(x, w, s):
        return (x @ masked_weight(w, s, 0.5).t()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, s)
    out.backward()
    gw, gs = w.grad.clone(), s.grad.clone()
    w.grad = s.grad = None
    f(x, w, s).backward()
    assert torch.equal(gw, w.grad) and torch.equal(gs, s.grad)
    torch.testing.assert_close(out, f(x, w, s))


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_python(device):
    w = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="shape"):
        masked_weight(w, torch.randn(3, 4, device=device), 0.5)
    for keep in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keep"):
            masked_weight(w, w.clone(), keep)
    with pytest.raises(TypeError, match="dtype"):
        masked_weight(w, w.double(), 0.5)
    with pytest.raises(TypeError, match="float"):
        masked_weight(w.long(), w.long(), 0.5)
    with pytest.raises(TypeError, match="tensor"):
        masked_weight(w, w.tolist(), 0.5)


def test_bad_inputs_raw_op():
    # Direct torch.ops calls get the same checks from C++.
    w = torch.randn(4, 3)
    op = torch.ops.mosx.masked_weight
    with pytest.raises(RuntimeError, match="shape"):
        op(w, torch.randn(12), 0.5)
    with pytest.raises(RuntimeError, match="keep must be a fraction"):
        op(w, w, 0.0)
    with pytest.raises(RuntimeError, match="keep must be a fraction"):
        op(w, w, 1.01)
    with pytest.raises(RuntimeError, match="dtype"):
        op(w, w.double(), 0.5)
    with pytest.raises(RuntimeError, match="float64, float32"):
        op(w.int(), w.int(), 0.5)
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.mosx.masked_weight_backward(w, w, w, m.float(), True, True)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.mosx.masked_weight_backward(w.t(), w, w, m, True, True)


def test_meta_scores_with_cpu_weight_are_refused():
    """A call mixing meta and real tensors runs the fake kernel: it must not return uninitialised memory."""
    w = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="scores are on meta but weight is on cpu"):
        torch.ops.mosx.masked_weight(w, torch.randn(4, 5, device="meta"), 0.5)
