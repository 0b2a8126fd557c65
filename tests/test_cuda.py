"""CUDA-only checks of the mosx kernels: agreement with the CPU kernels (same semantics, including
NaN/inf and tie rules), bitwise determinism, int64 indexing, CuPy zero-copy, robustness against
bad offsets / labels, and the current stream. Everything skips cleanly without a GPU.

The generic op-vs-reference tests in test_ops.py also run on CUDA (parametrised device); these
add the shapes the kernels are tuned for and the CUDA-specific properties.
"""

import pytest
import torch

import mosx
from mosx import Groups

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and mosx.cuda_built()), reason="needs a GPU and a CUDA build of mosx")

ops = torch.ops.mosx
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# CUDA and CPU both accumulate in float32 (float64 for float64); they differ in exp/sum order only.
ACC_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# Outputs in the input dtype may differ by one rounding step of that dtype.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layouts():
    g = torch.Generator().manual_seed(1234)
    return {
        "imagenet": list(mosx.IMAGENET_TAXONOMY_SIZES),          # 1008 logits, 8 uneven groups
        "10k": [100] * 100,                                       # 10,100 logits, groups cross chunks
        "hundreds_small": torch.randint(1, 7, (300,), generator=g).tolist(),
        "many_medium": [40] * 60,                                 # lane-serial medium groups
        "wide": [6000, 4100, 3, 1],                               # groups spanning several chunks
        "tiny": [1],                                              # L = 2
        "over_2047_groups": [1] * 1500 + [2] * 600,               # offsets read from global memory
    }


LAYOUTS = _layouts()


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    return Groups.from_sizes(LAYOUTS[request.param])


def make_logits(gen, n, num_logits, dtype, strided=False, scale=4.0):
    """Random logits on the GPU; strided=True gives a row stride != L and a start that is not
    16-byte aligned, so every row has a different alignment shift."""
    width = num_logits + 3 if strided else num_logits
    base = torch.randn(n, width, generator=gen, dtype=torch.float64) * scale
    x = base[:, 1:num_logits + 1] if strided else base
    x = x.to(dtype)
    dev = torch.empty((n, width), dtype=dtype, device="cuda")
    if strided:
        dev[:, 1:num_logits + 1] = x.cuda()
        return dev[:, 1:num_logits + 1], x
    dev.copy_(x)
    return dev, x


def close(a, b, tol, **kw):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=tol, rtol=tol, equal_nan=True, **kw)


def clear_winner(per_group_values, largest, margin=1e-4):
    """Rows whose winning group beats every other group by `margin` (a near-tie may be decided
    differently by two correct implementations that round differently)."""
    if per_group_values.shape[1] == 1:
        return torch.ones(per_group_values.shape[0], dtype=torch.bool)
    v = per_group_values.nan_to_num(nan=float("inf") if largest else float("-inf"))
    top2 = v.topk(2, dim=1, largest=largest).values
    return (top2[:, 0] - top2[:, 1]).abs() > margin


def per_group_others_prob(x64, groups):
    return torch.stack([torch.softmax(x64[:, a:b], 1)[:, 0] for a, b in groups.slices.tolist()], 1)


def per_group_best_prob(x64, groups):
    return torch.stack([torch.softmax(x64[:, a:b], 1)[:, 1:].max(1).values for a, b in groups.slices.tolist()], 1)


# ------------------------------------------------------------------------ CUDA vs CPU, every op
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_score_and_predict_match_cpu(layout, gen, strided):
    t_cpu, t_gpu = layout.tensors("cpu"), layout.tensors("cuda")
    for dtype in DTYPES:
        for n in (1, 3, 67):
            xd, xc = make_logits(gen, n, layout.num_logits, dtype, strided)
            s, mg, ml = ops.group_softmax_score(xd, t_gpu["offsets"])
            rs, rmg, rml = ops.group_softmax_score(xc, t_cpu["offsets"])
            assert s.dtype == rs.dtype and mg.dtype == torch.int64 and s.device.type == "cuda"
            close(s, rs, ACC_TOL[dtype])
            x64 = xc.double()
            clear = clear_winner(per_group_others_prob(x64, layout), largest=False)
            assert torch.equal(mg.cpu()[clear], rmg[clear])
            close(ml.cpu()[clear], rml[clear], ACC_TOL[dtype] * 10)

            c, p, g = ops.group_predict(xd, t_gpu["offsets"], t_gpu["logit_class"])
            rc, rp, rg = ops.group_predict(xc, t_cpu["offsets"], t_cpu["logit_class"])
            close(p, rp, ACC_TOL[dtype])
            clear = clear_winner(per_group_best_prob(x64, layout), largest=True)
            assert torch.equal(c.cpu()[clear], rc[clear]) and torch.equal(g.cpu()[clear], rg[clear])


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_and_backward_match_cpu(layout, gen, log):
    off_c, off_g = layout.tensors("cpu")["offsets"], layout.tensors("cuda")["offsets"]
    for dtype in DTYPES:
        for n, strided in ((1, False), (67, True)):
            xd, xc = make_logits(gen, n, layout.num_logits, dtype, strided)
            y = ops.group_softmax(xd, off_g, log)
            ry = ops.group_softmax(xc, off_c, log)
            assert y.dtype == dtype and y.is_contiguous() and y.shape == ry.shape
            close(y, ry, OUT_TOL[dtype])
            go, _ = make_logits(gen, n, layout.num_logits, dtype, strided=False, scale=1.0)
            gx = ops.group_softmax_backward(go, ry.cuda(), off_g, log)
            rgx = ops.group_softmax_backward(go.cpu(), ry, off_c, log)
            close(gx, rgx, OUT_TOL[dtype])


def test_score_backward_matches_cpu(layout, gen):
    off_c, off_g = layout.tensors("cpu")["offsets"], layout.tensors("cuda")["offsets"]
    for dtype in DTYPES:
        n = 33
        xd, xc = make_logits(gen, n, layout.num_logits, dtype, strided=True)
        _, mg, ml = ops.group_softmax_score(xc, off_c)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
        gx = ops.group_softmax_score_backward(grad.cuda(), xd, off_g, mg.cuda(), ml.cuda())
        rgx = ops.group_softmax_score_backward(grad, xc, off_c, mg, ml)
        close(gx, rgx, OUT_TOL[dtype])
        # exactly zero outside the chosen group's slice, as on the CPU
        off = off_c.tolist()
        inside = torch.zeros(n, layout.num_logits, dtype=torch.bool)
        for i, k in enumerate(mg.tolist()):
            inside[i, off[k]:off[k + 1]] = True
        assert (gx.cpu()[~inside] == 0).all() and (rgx[~inside] == 0).all()


@pytest.mark.parametrize("form", ["class_ids", "per_group"])
@pytest.mark.parametrize("mix", [False, True], ids=["plain", "mixup"])
def test_cross_entropy_forward_backward_match_cpu(layout, gen, form, mix):
    t_cpu, t_gpu = layout.tensors("cpu"), layout.tensors("cuda")
    m = 2 if mix else 1
    for dtype in DTYPES:
        n = 45
        xd, xc = make_logits(gen, n, layout.num_logits, dtype, strided=(dtype == torch.float32))
        cls = torch.randint(0, layout.num_classes, (m, n), generator=gen)
        cls[:, ::7] = -100  # ignored rows
        if form == "per_group":
            targets = torch.stack([layout.group_labels(c) for c in cls])
            targets[0, 1, 0] = -100  # a single ignored (row, group)
        else:
            targets = cls
        losses, lse = ops.group_cross_entropy(xd, t_gpu["offsets"], targets.cuda(), t_gpu["class_logit"], -100)
        rl, rlse = ops.group_cross_entropy(xc, t_cpu["offsets"], targets, t_cpu["class_logit"], -100)
        assert losses.shape == (m, n, layout.num_groups) and lse.shape == (n, layout.num_groups)
        close(losses, rl, ACC_TOL[dtype] * 5)
        close(lse, rlse, ACC_TOL[dtype] * 5)
        grad = torch.rand(m, n, layout.num_groups, generator=gen, dtype=torch.float64).to(rl.dtype)
        gx = ops.group_cross_entropy_backward(grad.cuda(), xd, t_gpu["offsets"], targets.cuda(),
                                              t_gpu["class_logit"], lse, -100)
        rgx = ops.group_cross_entropy_backward(grad, xc, t_cpu["offsets"], targets, t_cpu["class_logit"], rlse, -100)
        assert gx.dtype == dtype and gx.is_contiguous()
        close(gx, rgx, OUT_TOL[dtype])


def test_empty_batch_and_non_unit_inner_stride(gen):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    off = g.tensors("cuda")["offsets"]
    s, mg, ml = ops.group_softmax_score(torch.empty(0, g.num_logits, device="cuda"), off)
    assert s.shape == (0,) and mg.shape == (0,) and ml.shape == (0,)
    assert ops.group_softmax(torch.empty(0, g.num_logits, device="cuda"), off, False).shape == (0, g.num_logits)
    # inner stride 2: the op makes a contiguous copy and must still agree
    wide = torch.randn(5, 2 * g.num_logits, generator=gen).cuda()
    x = wide[:, ::2]
    close(ops.group_softmax_score(x, off)[0], ops.group_softmax_score(x.cpu(), g.tensors("cpu")["offsets"])[0], 2e-5)


# ------------------------------------------------------------------------ NaN / inf / ties
def test_nan_inf_and_ties_match_cpu_exactly():
    g = Groups.from_sizes([3, 2, 4])  # logits: [o a b c | o d e | o f g h i]
    L = g.num_logits
    rows = []
    def row(**set_):
        r = torch.zeros(L)
        for k, v in set_.items():
            r[int(k[1:])] = v
        rows.append(r)
    row()                                   # all equal: first group / first class wins
    row(p1=float("nan"))                    # NaN in the first class slot sticks
    row(p2=float("nan"))                    # NaN later: the slice is NaN, arg-max skips it
    row(p5=float("inf"))                    # +inf: that group is NaN
    row(p0=float("-inf"), p1=float("-inf"), p2=float("-inf"), p3=float("-inf"))  # only -inf: NaN
    row(p0=float("-inf"))                   # one -inf: others prob exactly 0
    row(p6=float("nan"), p9=float("nan"))   # two NaN groups: the first NaN group wins
    row(p2=3.0, p3=3.0)                     # tie inside a group: first index
    row(p1=2.0, p6=2.0)                     # equal logits in groups of different sizes
    x = torch.stack(rows)
    tc, tg = g.tensors("cpu"), g.tensors("cuda")
    for dtype in DTYPES:
        xc = x.to(dtype)
        xd = xc.cuda()
        for got, ref in zip(ops.group_softmax_score(xd, tg["offsets"]), ops.group_softmax_score(xc, tc["offsets"])):
            close(got, ref, 1e-6)
            assert torch.equal(got.cpu().isnan(), ref.isnan())
        got = ops.group_predict(xd, tg["offsets"], tg["logit_class"])
        ref = ops.group_predict(xc, tc["offsets"], tc["logit_class"])
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[2].cpu(), ref[2])
        close(got[1], ref[1], 1e-6)
        for log in (False, True):
            close(ops.group_softmax(xd, tg["offsets"], log), ops.group_softmax(xc, tc["offsets"], log), OUT_TOL[dtype])
        t = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 8]])
        got = ops.group_cross_entropy(xd, tg["offsets"], t.cuda(), tg["class_logit"], -100)
        ref = ops.group_cross_entropy(xc, tc["offsets"], t, tc["class_logit"], -100)
        for a, b in zip(got, ref):
            close(a, b, 1e-5)


# ------------------------------------------------------------------------ determinism
def test_bitwise_deterministic(gen):
    for sizes in (mosx.IMAGENET_TAXONOMY_SIZES, [100] * 100, [6000, 4100, 3, 1]):
        g = Groups.from_sizes(sizes)
        t = g.tensors("cuda")
        for dtype in (torch.float32, torch.bfloat16):
            x, _ = make_logits(gen, 513, g.num_logits, dtype)
            targets = torch.randint(0, g.num_classes, (2, 513), generator=gen).cuda()

            def run():
                out = list(ops.group_softmax_score(x, t["offsets"]))
                out += ops.group_predict(x, t["offsets"], t["logit_class"])
                losses, lse = ops.group_cross_entropy(x, t["offsets"], targets, t["class_logit"], -100)
                out += [losses, lse]
                out.append(ops.group_cross_entropy_backward(torch.ones_like(losses), x, t["offsets"], targets,
                                                            t["class_logit"], lse, -100))
                y = ops.group_softmax(x, t["offsets"], False)
                out += [y, ops.group_softmax_backward(x, y, t["offsets"], False)]
                out.append(ops.group_softmax_score_backward(out[0], x, t["offsets"], out[1], out[2]))
                return out

            a, b = run(), run()
            for u, v in zip(a, b):
                assert torch.equal(u, v)


# ------------------------------------------------------------------------ robustness
def test_bad_offsets_and_labels_never_fault():
    """Offsets values are not read on the host (that would need a sync): bad ones must give
    garbage, not an illegal memory access; bad labels give NaN instead of an error."""
    x = torch.randn(4, 12, device="cuda")
    for bad in ([0, 20, 12], [0, -5, 12], [0, 9, 3, 12], [5, 6, 7, 12], [0, 2, 4, 6, 8, 10, 12]):
        off = torch.tensor(bad, device="cuda")
        ops.group_softmax_score(x, off)
        ops.group_softmax(x, off, True)
        ops.group_predict(x, off, torch.zeros(12, dtype=torch.long, device="cuda"))
        t = torch.tensor([[0, 1, 2, 3]], device="cuda")
        losses, lse = ops.group_cross_entropy(x, off, t, torch.arange(12, device="cuda"), -100)
        ops.group_cross_entropy_backward(torch.ones_like(losses), x, off, t, torch.arange(12, device="cuda"), lse, -100)
        torch.cuda.synchronize()
    # more groups than fit in shared memory: the host-side clamp of the offsets
    x = torch.randn(2, 5000, device="cuda")
    off = torch.arange(0, 5001, 2, device="cuda")
    off[7], off[100] = 4999, -3
    ops.group_softmax_score(x, off)
    ops.group_softmax(x, off, False)
    torch.cuda.synchronize()
    g = Groups.from_sizes([2, 2])
    tg = g.tensors("cuda")
    x = torch.zeros(3, 6, device="cuda")
    losses, lse = ops.group_cross_entropy(x, tg["offsets"], torch.tensor([[0, 4, -100]], device="cuda"),
                                          tg["class_logit"], -100)
    assert losses[0, 1].isnan().all() and not losses[0, 0].isnan().any() and (losses[0, 2] == 0).all()
    per_group = torch.tensor([[[0, 3], [1, 0], [0, -100]]], device="cuda")
    losses, lse = ops.group_cross_entropy(x, tg["offsets"], per_group, tg["class_logit"], -100)
    assert losses[0, 0, 1].isnan() and not losses[0, 0, 0].isnan() and losses[0, 2, 1] == 0
    gx = ops.group_cross_entropy_backward(torch.ones_like(losses), x, tg["offsets"], per_group, tg["class_logit"], lse, -100)
    assert gx[0, 3:].isnan().all() and not gx[1].isnan().any()
    bad_group = torch.tensor([0, 7, -1], device="cuda")
    gx = ops.group_softmax_score_backward(torch.ones(3, device="cuda"), x, tg["offsets"], bad_group, torch.zeros(3, device="cuda"))
    assert not gx[0].isnan().any() and gx[1:].isnan().all()
    with pytest.raises(RuntimeError, match="need at least"):
        ops.group_softmax_score(torch.zeros(2, 5, device="cuda"), torch.tensor([0, 2, 4, 5], device="cuda"))


def test_runs_on_the_current_stream(gen):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    x, xc = make_logits(gen, 300, g.num_logits, torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = mosx.group_softmax_score(x, g)
        pred, _ = mosx.group_predict(x, g)
    s.synchronize()
    close(y, mosx.group_softmax_score(xc, g), 2e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    x, xc = make_logits(gen, 10, g.num_logits, torch.float32)
    close(mosx.group_softmax_score(x.to("cuda:1"), g), mosx.group_softmax_score(xc, g), 2e-5)


# ------------------------------------------------------------------------ int64 indexing
def test_more_than_2_31_elements():
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    L = g.num_logits
    n = (2**31) // L + 1000  # N * L > 2^31
    need = n * L * 2 * 2 + (1 << 30)  # bf16 logits + bf16 log-softmax output + slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(n, L, dtype=torch.bfloat16, device="cuda")
    x.normal_(0, 4)
    t = g.tensors("cuda")
    s, mg, ml = ops.group_softmax_score(x, t["offsets"])
    y = ops.group_softmax(x, t["offsets"], True)
    tail = x[-5:].cpu()
    tc = g.tensors("cpu")
    close(s[-5:], ops.group_softmax_score(tail, tc["offsets"])[0], 2e-5)
    close(y[-5:], ops.group_softmax(tail, tc["offsets"], True), 1.6e-2)
    del y, x
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------ CuPy
def test_cupy_in_cupy_out_without_copies(gen):
    cp = pytest.importorskip("cupy")
    from mosx._interop import from_array, to_array

    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    xc = torch.randn(16, g.num_logits, generator=gen)
    x = cp.asarray(xc.numpy())
    t, kind = from_array(x)
    assert kind == "cupy" and t.data_ptr() == x.data.ptr  # in: no copy
    score = mosx.group_softmax_score(x, g)
    assert isinstance(score, cp.ndarray)
    close(torch.from_dlpack(score), mosx.group_softmax_score(xc, g), 2e-5)
    out = torch.empty(3, device="cuda")
    assert to_array(out, "cupy").data.ptr == out.data_ptr()  # out: no copy
    probs = mosx.group_softmax(x, g)
    assert isinstance(probs, cp.ndarray) and probs.shape == (16, g.num_logits)
    pred, conf = mosx.group_predict(x, g)
    assert isinstance(pred, cp.ndarray) and isinstance(conf, cp.ndarray)
