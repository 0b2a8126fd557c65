"""CUDA-only checks of the mosx kernels: agreement with the CPU kernels (same semantics, including
NaN/inf and tie rules), bitwise determinism, int64 indexing, CuPy zero-copy, robustness against
bad offsets / labels, and the current stream. Everything skips cleanly without a GPU, except
test_gpu_visible_means_cuda_built, which fails when a GPU is visible but the build has no CUDA
kernels (a silently CPU-only build must never pass this suite by skipping it).

The generic op-vs-reference tests in test_ops.py also run on CUDA (parametrised device); these
add the shapes the kernels are tuned for and the CUDA-specific properties. The CUDA kernels have
three paths (register rows and block rows where they apply, and the chunked fallback; check_path
asserts which one a test reached); MOSX_CUDA_KERNELS=chunked forces the fallback, and test_chunked_kernels_pass_the_same_tests reruns this file on it (unless
MOSX_CUDA_PATHS_SEPARATE=1 says the caller runs both paths itself, as tools/gpu_check.sh does).
"""

import os
import subprocess
import sys

import pytest
import torch
from cuda_paths import planned_path, widest_block_row

import mosx
from mosx import Groups, reference

HAVE_CUDA = torch.cuda.is_available() and mosx.cuda_built()


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    if request.node.originalname == "test_gpu_visible_means_cuda_built":
        return
    if DEV != "cuda":  # rehearsal of the test code on the CPU (see DEV below)
        if not getattr(request.function, "_rehearsable", False):
            pytest.skip("not rehearsable on the CPU (hard-codes the cuda device)")
        return
    if not HAVE_CUDA:
        pytest.skip("needs a GPU and a CUDA build of mosx")


def test_gpu_visible_means_cuda_built():
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    assert mosx.cuda_built(), (
        "a GPU is visible but this build of mosx has no CUDA kernels (built with MOSX_CUDA=0, or "
        "without nvcc / with a CPU-only torch): rebuild with MOSX_CUDA=1"
    )


ops = torch.ops.mosx
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# CUDA and CPU both accumulate in float32 (float64 for float64); they differ in exp/sum order only.
ACC_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# Outputs in the input dtype may differ by one rounding step of that dtype.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layouts():
    g = torch.Generator().manual_seed(1234)
    return {
        "imagenet": list(mosx.IMAGENET_TAXONOMY_SIZES),  # 1008 logits, 8 uneven groups
        "10k": [100] * 100,  # 10,100 logits, groups cross chunks
        "hundreds_small": torch.randint(1, 7, (300,), generator=g).tolist(),
        "many_medium": [40] * 60,  # lane-serial medium groups
        "wide": [6000, 4100, 3, 1],  # groups spanning several chunks
        "tiny": [1],  # L = 2
        "over_2047_groups": [1] * 1500 + [2] * 600,  # offsets read from global memory
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
    x = base[:, 1 : num_logits + 1] if strided else base
    x = x.to(dtype)
    dev = torch.empty((n, width), dtype=dtype, device="cuda")
    if strided:
        dev[:, 1 : num_logits + 1] = x.cuda()
        return dev[:, 1 : num_logits + 1], x
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
            inside[i, off[k] : off[k + 1]] = True
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
        gx = ops.group_cross_entropy_backward(
            grad.cuda(), xd, t_gpu["offsets"], targets.cuda(), t_gpu["class_logit"], lse, -100
        )
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

    row()  # all equal: first group / first class wins
    row(p1=float("nan"))  # NaN in the first class slot: group 0 is NaN, class 0
    row(p2=float("nan"))  # NaN later: the same (first class of the NaN group)
    row(p5=float("inf"))  # +inf: that group is NaN
    row(p0=float("-inf"), p1=float("-inf"), p2=float("-inf"), p3=float("-inf"))  # only -inf: NaN
    row(p0=float("-inf"))  # one -inf: others prob exactly 0
    row(p6=float("nan"), p9=float("nan"))  # two NaN groups: the first NaN group wins
    row(p2=3.0, p3=3.0)  # tie inside a group: first index
    row(p1=2.0, p6=2.0)  # equal logits in groups of different sizes
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
                out.append(
                    ops.group_cross_entropy_backward(
                        torch.ones_like(losses), x, t["offsets"], targets, t["class_logit"], lse, -100
                    )
                )
                y = ops.group_softmax(x, t["offsets"], False)
                out += [y, ops.group_softmax_backward(x, y, t["offsets"], False)]
                out.append(ops.group_softmax_score_backward(out[0], x, t["offsets"], out[1], out[2]))
                return out

            a, b = run(), run()
            for u, v in zip(a, b):
                assert torch.equal(u, v)


# ------------------------------------------------------------------------ robustness
@pytest.mark.parametrize("L", [12, 3000], ids=["register", "block"])
def test_bad_offsets_and_labels_never_fault(L):
    """Offsets values are not read on the host (that would need a sync): bad ones must give
    garbage, not an illegal memory access; bad labels give NaN instead of an error."""
    x = torch.randn(4, L, device="cuda")
    for bad in ([0, 20, 12], [0, -5, 12], [0, 9, 3, 12], [5, 6, 7, 12], [0, 2, 4, 6, 8, 10, 12]):
        off = torch.tensor(bad, device="cuda") * (L // 12)  # the patterns, stretched to L
        ops.group_softmax_score(x, off)
        ops.group_softmax(x, off, True)
        ops.group_predict(x, off, torch.zeros(L, dtype=torch.long, device="cuda"))
        t = torch.tensor([[0, 1, 2, 3]], device="cuda")
        class_logit = torch.arange(L - (len(bad) - 1), device="cuda")  # one per class: L - K
        losses, lse = ops.group_cross_entropy(x, off, t, class_logit, -100)
        ops.group_cross_entropy_backward(torch.ones_like(losses), x, off, t, class_logit, lse, -100)
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
    losses, lse = ops.group_cross_entropy(
        x, tg["offsets"], torch.tensor([[0, 4, -100]], device="cuda"), tg["class_logit"], -100
    )
    assert losses[0, 1].isnan().all() and not losses[0, 0].isnan().any() and (losses[0, 2] == 0).all()
    per_group = torch.tensor([[[0, 3], [1, 0], [0, -100]]], device="cuda")
    losses, lse = ops.group_cross_entropy(x, tg["offsets"], per_group, tg["class_logit"], -100)
    assert losses[0, 0, 1].isnan() and not losses[0, 0, 0].isnan() and losses[0, 2, 1] == 0
    gx = ops.group_cross_entropy_backward(
        torch.ones_like(losses), x, tg["offsets"], per_group, tg["class_logit"], lse, -100
    )
    assert gx[0, 3:].isnan().all() and not gx[1].isnan().any()
    bad_group = torch.tensor([0, 7, -1], device="cuda")
    gx = ops.group_softmax_score_backward(
        torch.ones(3, device="cuda"), x, tg["offsets"], bad_group, torch.zeros(3, device="cuda")
    )
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


# ======================================================================== v2: paths, tiers, edges
# The tests below take their device from DEV, so that the test code itself can be rehearsed on a
# machine without a GPU (MOSX_TEST_CUDA_DEVICE=cpu, see tools/gpu_check.sh --rehearse): there they
# compare the CPU kernels with themselves, which checks shapes, helpers and assertions, not CUDA.
DEV = os.environ.get("MOSX_TEST_CUDA_DEVICE", "cuda")
CUDA_PATH = "chunked" if os.environ.get("MOSX_CUDA_KERNELS") == "chunked" else "fast"
# Row widths (L + alignment shift) at every tier boundary of the register path (64 and 128
# positions: four and two rows per warp; 256, 1024 and 2048: a warp per row) and at the chunked
# path's 1024-element chunk (float32 / 16-bit; float64 chunks hold 512), one below, at and one
# above.
TIER_WIDTHS = sorted({w + d for w in (64, 128, 256, 512, 1024, 2048) for d in (-1, 0, 1)})
SHIFTS = [0, 1, 3]
ROWS_PER_WARP_LAYOUTS = {
    "L48_four_rows_per_warp": [11] * 4,
    "L100_two_rows_per_warp": [9, 30, 1, 56],
    "L168": [20] * 8,
    "imagenet": list(mosx.IMAGENET_TAXONOMY_SIZES),
    "L1200": [99] * 12,
    "10k": [100] * 100,
}
# MOSX_TEST_SUBSET=sanitize: a smaller draw of the same tests that still runs every kernel and tier
# (tools/gpu_check.sh runs compute-sanitizer over it).
if os.environ.get("MOSX_TEST_SUBSET") == "sanitize":
    TIER_WIDTHS = [65, 129, 257, 1025, 2049]
    SHIFTS = [1]
    ROWS_PER_WARP_LAYOUTS = {k: ROWS_PER_WARP_LAYOUTS[k] for k in ("L48_four_rows_per_warp", "L168", "imagenet")}


def sizes_for(num_logits, k):
    """Group sizes (classes per group) of k groups covering num_logits logits, uneven."""
    per = (num_logits - k) // k
    sizes = [per] * k
    sizes[0] += (num_logits - k) - per * k
    assert min(sizes) >= 1 and sum(sizes) + k == num_logits
    return sizes


def edge_logits(gen, n, num_logits, dtype, shift=0, stride=None, scale=4.0):
    """[n, L] logits on DEV in an allocation that ends exactly at the last logit (so memcheck
    sees any read past it): rows `stride` apart (default L, packed), the first one starting
    `shift` elements into the allocation. Returns (device view, the same values on the CPU)."""
    stride = num_logits if stride is None else stride
    vals = (torch.randn(n, num_logits, generator=gen, dtype=torch.float64) * scale).to(dtype)
    size = (n - 1) * stride + shift + num_logits if n else shift
    flat = torch.zeros(size, dtype=dtype, device=DEV)
    x = flat.as_strided((n, num_logits), (stride, 1), shift)
    x.copy_(vals.to(DEV))
    return x, vals


def edge_copy(t, shift):
    """A contiguous copy of t on DEV at a storage offset of `shift` elements, in an allocation of
    exactly numel + shift elements."""
    flat = torch.zeros(t.numel() + shift, dtype=t.dtype, device=DEV)
    out = flat[shift:].view(t.shape)
    out.copy_(t.to(DEV))
    return out


def check_every_op(x, xc, g, dtype, gen, what="", shift=None):
    """Every op on x (DEV) against the CPU kernels on xc (the same values). With `shift` (the
    alignment shift of x's first row), also the kernel path of the score forward and of the
    cross-entropy backward (whose output, a new tensor, has shift 0)."""
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    n, L = xc.shape
    acc_tol, out_tol = ACC_TOL[dtype], OUT_TOL[dtype]
    x64 = xc.double()
    s, mg, ml = ops.group_softmax_score(x, td["offsets"])
    es = xc.element_size()
    uniform = n <= 1 or x.stride(0) * es % 16 == 0
    if shift is not None:
        check_path(expected_path(L, g.num_groups, dtype, shift, uniform), f"{what} forward")
    rs, rmg, rml = ops.group_softmax_score(xc, tc["offsets"])
    close(s, rs, acc_tol, msg=lambda m: f"{what} score: {m}")
    clear = clear_winner(per_group_others_prob(x64, g), largest=False)
    assert torch.equal(mg.cpu()[clear], rmg[clear]), what
    c, p, grp = ops.group_predict(x, td["offsets"], td["logit_class"])
    rc, rp, rg = ops.group_predict(xc, tc["offsets"], tc["logit_class"])
    close(p, rp, acc_tol, msg=lambda m: f"{what} predict: {m}")
    clear = clear_winner(per_group_best_prob(x64, g), largest=True)
    assert torch.equal(c.cpu()[clear], rc[clear]) and torch.equal(grp.cpu()[clear], rg[clear]), what
    gs = torch.randn(n, generator=gen, dtype=torch.float64).to(rs.dtype)
    close(
        ops.group_softmax_score_backward(gs.to(DEV), x, td["offsets"], rmg.to(DEV), rml.to(DEV)),
        ops.group_softmax_score_backward(gs, xc, tc["offsets"], rmg, rml),
        out_tol,
    )
    for log in (False, True):
        y = ops.group_softmax(x, td["offsets"], log)
        ry = ops.group_softmax(xc, tc["offsets"], log)
        close(y, ry, out_tol, msg=lambda m: f"{what} softmax log={log}: {m}")
        go = (torch.randn(n, L, generator=gen, dtype=torch.float64)).to(dtype)
        close(
            ops.group_softmax_backward(go.to(DEV), ry.to(DEV), td["offsets"], log),
            ops.group_softmax_backward(go, ry, tc["offsets"], log),
            out_tol,
        )
    cls = torch.randint(0, g.num_classes, (2, n), generator=gen)
    cls[:, ::5] = -100
    losses, lse = ops.group_cross_entropy(x, td["offsets"], cls.to(DEV), td["class_logit"], -100)
    rl, rlse = ops.group_cross_entropy(xc, tc["offsets"], cls, tc["class_logit"], -100)
    close(losses, rl, acc_tol * 5, msg=lambda m: f"{what} cross-entropy: {m}")
    close(lse, rlse, acc_tol * 5)
    gl = torch.rand(2, n, g.num_groups, generator=gen, dtype=torch.float64).to(rl.dtype)
    gx = ops.group_cross_entropy_backward(
        gl.to(DEV), x, td["offsets"], cls.to(DEV), td["class_logit"], rlse.to(DEV), -100
    )
    if shift is not None:
        same = uniform and shift == 0 and (n <= 1 or L * es % 16 == 0)  # gx rows share x's shift
        check_path(expected_path(L, g.num_groups, dtype, shift, same), f"{what} cross-entropy backward")
    close(
        gx,
        ops.group_cross_entropy_backward(gl, xc, tc["offsets"], cls, tc["class_logit"], rlse, -100),
        out_tol,
    )


def block_fits(L, K, dtype, want_arg=False):
    """Whether the block tier's shared-memory layout for this row fits in one block of the GPU
    (assumed on the CPU rehearsal, where no path is checked)."""
    if DEV != "cuda":
        return True
    need = ops._cuda_block_smem_bytes(K, L, dtype, want_arg)
    return need <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin


def expected_path(L, K, dtype, shift=0, uniform=True, want_arg=False):
    """The kernel path plan_rows (csrc/cuda/launch.cuh) picks for a forward op on rows of L
    logits in K groups (docs/semantics.md); want_arg: the prediction (its block layout is larger)."""
    return planned_path(L, K, dtype, shift, uniform, CUDA_PATH, lambda: block_fits(L, K, dtype, want_arg))


def check_path(want, what=""):
    """The last tiered op on the GPU (a forward, or the cross-entropy backward) ran on the path
    `want` (not checkable on the CPU)."""
    if DEV == "cuda":
        got = ops._cuda_last_path()
        assert got == want, f"{what}: ran on {got}, the test meant {want}"


def rehearsable(fn):
    """Marks a test whose code can be rehearsed on the CPU (MOSX_TEST_CUDA_DEVICE=cpu)."""
    fn._rehearsable = True
    return fn


def test_cuda_kernel_path_follows_environment():
    assert torch.ops.mosx._cuda_kernels() == CUDA_PATH


def test_chunked_kernels_pass_the_same_tests():
    # The chunked kernels are the fallback of the register-row path; this reruns the CUDA tests in
    # a fresh process forced onto them (the variable is read once per process).
    if CUDA_PATH == "chunked":
        pytest.skip("already running the chunked kernels")
    if os.environ.get("MOSX_CUDA_PATHS_SEPARATE") == "1":
        pytest.skip("the caller runs both kernel paths itself")
    env = {**os.environ, "MOSX_CUDA_KERNELS": "chunked"}
    here = os.path.dirname(os.path.abspath(__file__))
    for target, k in (
        (__file__, "not more_than_2_31 and not chunked_kernels_pass"),
        (os.path.join(here, "test_ops.py"), "cuda"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target, "-k", k],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert " passed" in r.stdout


@rehearsable
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("width", TIER_WIDTHS)
def test_tier_and_chunk_boundaries(width, shift, dtype, gen):
    # Rows share one alignment shift (stride a multiple of 8 elements), so the register path runs
    # where the width allows; the allocation ends at the last logit.
    L = width - shift
    stride = (width + 7) // 8 * 8
    for k in (2, 8):
        g = Groups.from_sizes(sizes_for(L, k))
        x, xc = edge_logits(gen, 37, L, dtype, shift, stride)
        check_every_op(x, xc, g, dtype, gen, what=f"L={L} shift={shift} K={k}", shift=shift)


# Block tier (csrc/cuda/block_rows.cuh): groups are cut into segments of 63 logits, reduced by one
# thread each; a group of at most 8 segments (504 logits) is merged by one thread, a wider one by
# a warp. Group widths (in logits) one below, at and one above those boundaries, groups of one
# class, and layouts that reach the tier by width (> 2048 positions) or by group count (> 32).
BLOCK_LAYOUTS = {
    "segment_edges_wide_row": [n - 1 for n in (2, 62, 63, 64, 126, 127, 128, 503, 504, 505, 1000)],
    "many_groups_short_row": [n - 1 for n in (2, 62, 63, 64, 3)] * 8,
    "two_warp_merged_groups": [5000, 4400],
    "most_groups_in_shared_memory": [1] * 2047,  # K + 1 = 2048 offsets: still the block tier
    # 11 warp-merged groups (more than the block's 8 warps) between groups of 3 logits
    "wide_groups_between_narrow_ones": [s for i in range(11) for s in (504 + 61 * i, 2)],
}
if os.environ.get("MOSX_TEST_SUBSET") == "sanitize":  # still: strides past 256 groups and segments
    BLOCK_LAYOUTS = {
        k: BLOCK_LAYOUTS[k]
        for k in (
            "segment_edges_wide_row",
            "many_groups_short_row",
            "most_groups_in_shared_memory",
            "wide_groups_between_narrow_ones",
        )
    }


@rehearsable
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["shared_shift", "packed_odd_rows"])
@pytest.mark.parametrize("name", list(BLOCK_LAYOUTS))
def test_block_tier_segments_and_merges(name, packed, dtype, gen):
    g = Groups.from_sizes(BLOCK_LAYOUTS[name])
    L, K = g.num_logits, g.num_groups
    for n, shift in ((1, 0), (37, 3)):
        # packed rows of an odd width have a different alignment shift each (the row's own shift
        # decides its staging); otherwise the rows share one
        stride = L if packed else (L + shift + 7) // 8 * 8
        x, xc = edge_logits(gen, n, L, dtype, shift, stride)
        uniform = n == 1 or stride * xc.element_size() % 16 == 0
        if CUDA_PATH == "fast":  # the layouts are meant for the block tier: it must fit this GPU
            assert block_fits(L, K, dtype, want_arg=True), f"{name} {dtype}: layout too large here"
            assert expected_path(L, K, dtype, shift, uniform) == "block"
        check_every_op(x, xc, g, dtype, gen, what=f"{name} n={n} shift={shift}", shift=shift)


def test_block_tier_width_limit_and_group_limit(gen):
    # The widest row whose block layout fits in the device's opt-in shared memory per block runs
    # on the block tier (a launch at the limit, to 16-byte alignment); one logit more, and 2048 groups (2049
    # offsets), take the chunked kernels. The score's and the prediction's layouts differ.
    if CUDA_PATH == "chunked":
        pytest.skip("the default path's limits")
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for want_arg in (False, True):
            widest = widest_block_row(ops._cuda_block_smem_bytes, 2, dtype, want_arg, smem)
            assert widest >= 1024, widest
            for L, want in ((widest, "block"), (widest + 1, "chunked")):
                assert expected_path(L, 2, dtype, want_arg=want_arg) == want
                g = Groups.from_sizes([L // 2 - 1, L - L // 2 - 1])
                td, tc = g.tensors(DEV), g.tensors("cpu")
                x, xc = edge_logits(gen, 3, g.num_logits, dtype)
                what = f"L={L} {dtype} want_arg={want_arg}"
                if want_arg:
                    c, p, _ = ops.group_predict(x, td["offsets"], td["logit_class"])
                    check_path(want, what)
                    rc, rp, _ = ops.group_predict(xc, tc["offsets"], tc["logit_class"])
                    close(p, rp, ACC_TOL[dtype])
                    clear = clear_winner(per_group_best_prob(xc.double(), g), largest=True)
                    assert torch.equal(c.cpu()[clear], rc[clear]), what
                else:
                    s, _, _ = ops.group_softmax_score(x, td["offsets"])
                    check_path(want, what)
                    close(s, ops.group_softmax_score(xc, tc["offsets"])[0], ACC_TOL[dtype])
    g = Groups.from_sizes([1] * 2048)
    x, xc = edge_logits(gen, 5, g.num_logits, torch.float32)
    s, mg, _ = ops.group_softmax_score(x, g.tensors(DEV)["offsets"])
    check_path("chunked", "2048 groups")
    close(s, ops.group_softmax_score(xc, g.tensors("cpu")["offsets"])[0], ACC_TOL[torch.float32])


@rehearsable
@pytest.mark.parametrize("shift", [0, 1])
def test_packed_rows_with_varying_shifts_and_exact_allocation(shift, gen):
    # Packed rows of an odd width: every row has another alignment shift (the block path for the
    # 1201-logit row, the chunked path for the shorter ones),
    # in an allocation of exactly n * L (+ shift) elements.
    for sizes in (list(mosx.IMAGENET_TAXONOMY_SIZES)[:-1], [6, 1, 2], [1200]):
        g = Groups.from_sizes(sizes)
        for dtype in (torch.float32, torch.bfloat16):
            x, xc = edge_logits(gen, 19, g.num_logits, dtype, shift)
            check_every_op(x, xc, g, dtype, gen, what=f"sizes={sizes[:3]} shift={shift}", shift=shift)


def resident_warps():
    if DEV != "cuda":
        return 64
    return torch.cuda.get_device_properties(0).multi_processor_count * 64  # 2048 threads per SM


@rehearsable
@pytest.mark.parametrize("name", list(ROWS_PER_WARP_LAYOUTS))
def test_several_rows_per_warp(name, gen):
    # Three times as many rows as a full wave of warps can hold: every warp runs the grid-stride
    # loop (and the register path's next-row prefetch) several times; the short layouts put four
    # or two rows in each warp, and the row count (not a multiple of 4) leaves a warp's last
    # slots empty.
    g = Groups.from_sizes(ROWS_PER_WARP_LAYOUTS[name])
    n = min(3 * resident_warps(), 30000) * (4 if g.num_logits <= 128 else 1) + 3
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    for dtype in (torch.float32, torch.bfloat16):
        xc = (torch.randn(n, g.num_logits, generator=gen) * 4).to(dtype)
        x = xc.to(DEV)
        s, mg, _ = ops.group_softmax_score(x, td["offsets"])
        rs, rmg, _ = ops.group_softmax_score(xc, tc["offsets"])
        close(s, rs, ACC_TOL[dtype])
        agree = (mg.cpu() == rmg).float().mean().item()
        assert agree > 0.999, agree  # near-ties may go either way; the last row must be there too
        c, p, _ = ops.group_predict(x, td["offsets"], td["logit_class"])
        rc, rp, _ = ops.group_predict(xc, tc["offsets"], tc["logit_class"])
        close(p, rp, ACC_TOL[dtype])
        assert (c.cpu() == rc).float().mean().item() > 0.999
        cls = torch.randint(0, g.num_classes, (1, n), generator=gen)
        losses, lse = ops.group_cross_entropy(x, td["offsets"], cls.to(DEV), td["class_logit"], -100)
        rl, rlse = ops.group_cross_entropy(xc, tc["offsets"], cls, tc["class_logit"], -100)
        close(losses, rl, ACC_TOL[dtype] * 5)
        y = ops.group_softmax(x, td["offsets"], False)
        uniform = g.num_logits * xc.element_size() % 16 == 0  # packed rows share a shift
        check_path(expected_path(g.num_logits, g.num_groups, dtype, 0, uniform), name)
        close(y[-3:], ops.group_softmax(xc[-3:], tc["offsets"], False), OUT_TOL[dtype])
        close(y[:3], ops.group_softmax(xc[:3], tc["offsets"], False), OUT_TOL[dtype])


@rehearsable
@pytest.mark.parametrize("gshift,oshift", [(0, 1), (1, 0), (3, 2), (2, 2), (0, 0)])
def test_softmax_backward_grad_and_out_at_different_alignments(gshift, oshift, gen):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    n = 29
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xc = (torch.randn(n, g.num_logits, generator=gen) * 3).to(dtype)
        for log in (False, True):
            ry = ops.group_softmax(xc, tc["offsets"], log)
            go = torch.randn(n, g.num_logits, generator=gen).to(dtype)
            out, grad = edge_copy(ry, oshift), edge_copy(go, gshift)
            close(
                ops.group_softmax_backward(grad, out, td["offsets"], log),
                ops.group_softmax_backward(go, ry, tc["offsets"], log),
                OUT_TOL[dtype],
            )


@rehearsable
def test_cross_entropy_empty_batch_and_its_backward():
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    td = g.tensors(DEV)
    K, L = g.num_groups, g.num_logits
    x = torch.empty(0, L, device=DEV)
    for targets in (
        torch.empty(1, 0, dtype=torch.long, device=DEV),
        torch.empty(2, 0, K, dtype=torch.long, device=DEV),
    ):
        losses, lse = ops.group_cross_entropy(x, td["offsets"], targets, td["class_logit"], -100)
        assert losses.shape == (targets.shape[0], 0, K) and lse.shape == (0, K)
        gx = ops.group_cross_entropy_backward(
            torch.ones_like(losses), x, td["offsets"], targets, td["class_logit"], lse, -100
        )
        assert gx.shape == (0, L)
    xg = torch.empty(0, L, device=DEV, requires_grad=True)
    loss = mosx.group_cross_entropy(xg, torch.empty(0, dtype=torch.long, device=DEV), g, reduction="sum")
    loss.backward()
    assert xg.grad.shape == (0, L)
    assert ops.group_softmax_backward(x, x, td["offsets"], True).shape == (0, L)
    assert ops.group_softmax_score_backward(
        torch.empty(0, device=DEV),
        x,
        td["offsets"],
        torch.empty(0, dtype=torch.long, device=DEV),
        torch.empty(0, device=DEV),
    ).shape == (0, L)


@rehearsable
def test_an_empty_batch_launches_nothing_and_says_so():
    # After an op on no rows the noted path is "none", not the path of the op before it.
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    td = g.tensors(DEV)
    x = torch.randn(3, g.num_logits, device=DEV)
    t = torch.randint(0, g.num_classes, (1, 3), device=DEV)

    def ce_backward(x, t):
        losses, lse = ops.group_cross_entropy(x, td["offsets"], t, td["class_logit"], -100)
        return ops.group_cross_entropy_backward(
            torch.ones_like(losses), x, td["offsets"], t, td["class_logit"], lse, -100
        )

    runs = {
        "score": lambda x, t: ops.group_softmax_score(x, td["offsets"]),
        "predict": lambda x, t: ops.group_predict(x, td["offsets"], td["logit_class"]),
        "softmax": lambda x, t: ops.group_softmax(x, td["offsets"], False),
        "cross-entropy": lambda x, t: ops.group_cross_entropy(x, td["offsets"], t, td["class_logit"], -100),
        "cross-entropy backward": ce_backward,
    }
    for name, run in runs.items():
        run(x, t)
        check_path(expected_path(g.num_logits, g.num_groups, torch.float32), name)
        out = run(x[:0], t[:, :0])
        check_path("none", f"{name} on no rows")
        assert all(0 in o.shape for o in (out if isinstance(out, tuple) else (out,))), name


@rehearsable
@pytest.mark.parametrize("ignore_index", [5, -1, 1000])
def test_class_id_targets_with_a_custom_ignore_index(ignore_index, gen):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    n = 41
    xc = torch.randn(n, g.num_logits, generator=gen) * 3
    x = xc.to(DEV)
    cls = torch.randint(0, g.num_classes, (2, n), generator=gen)
    cls[:, ::3] = ignore_index
    losses, lse = ops.group_cross_entropy(x, td["offsets"], cls.to(DEV), td["class_logit"], ignore_index)
    rl, rlse = ops.group_cross_entropy(xc, tc["offsets"], cls, tc["class_logit"], ignore_index)
    close(losses, rl, 1e-4)
    assert (losses[:, ::3] == 0).all() and (losses[:, 1::3] != 0).any()
    grad = torch.rand(2, n, g.num_groups, generator=gen)
    close(
        ops.group_cross_entropy_backward(
            grad.to(DEV), x, td["offsets"], cls.to(DEV), td["class_logit"], lse, ignore_index
        ),
        ops.group_cross_entropy_backward(grad, xc, tc["offsets"], cls, tc["class_logit"], rlse, ignore_index),
        2e-5,
    )
    # and the Python API against the reference loop (float64 on the CPU)
    got = mosx.group_cross_entropy(x, cls[0].to(DEV), g, reduction="none", ignore_index=ignore_index)
    want = reference.group_cross_entropy(xc.double(), cls[0], g, reduction="none", ignore_index=ignore_index)
    close(got.double(), want, 1e-4)


@rehearsable
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize(
    "size,k",
    [
        (12, 4),
        (30, 4),
        (100, 12),
        (10, 30),
        (100, 8),
        (10, 120),
        (40, 60),
        (1100, 3),
        (600, 5),
        (520, 11),
        (2, 2100),
    ],
    ids=[
        "register_four_rows_per_warp",
        "register_two_rows_per_warp",
        "register_L1200",
        "register_small_groups",
        "register_L800",
        "block_many_groups",
        "block_medium",
        "block_wide",
        "block_warp_merged",
        "block_more_wide_groups_than_warps",
        "chunked_2100_groups",
    ],
)
def test_identical_groups_tie_to_the_first_on_every_path(size, k, shift, gen):
    # Bit-identical groups placed so that the fast reductions sum them in different orders: in
    # different lanes of the register tiles, in segments that start at other positions of the
    # block tier (merged by a thread or, past 8 segments, by a warp; picked by several warps),
    # lane-serially or by the whole warp of the chunked kernels, inside one chunk or across a
    # chunk boundary. The canonical recheck must make them tie exactly, and the tie goes to the first group. The ids
    # name the path of the default kernels (check_path); MOSX_CUDA_KERNELS=chunked runs them all
    # chunked.
    g = Groups.from_sizes([size - 1] * k)
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    n = 24
    L = g.num_logits
    stride = (L + shift + 7) // 8 * 8
    for dtype in (torch.float32, torch.bfloat16):
        block = (torch.randn(n, size, generator=gen, dtype=torch.float64) * 3).to(dtype)
        vals = block.repeat(1, k)
        flat = torch.zeros((n - 1) * stride + shift + L, dtype=dtype, device=DEV)
        x = flat.as_strided((n, L), (stride, 1), shift)
        x.copy_(vals.to(DEV))
        s, mg, ml = ops.group_softmax_score(x, td["offsets"])
        assert (mg == 0).all(), (dtype, mg)
        rs, rmg, rml = ops.group_softmax_score(vals, tc["offsets"])
        close(s, rs, ACC_TOL[dtype])
        c, p, grp = ops.group_predict(x, td["offsets"], td["logit_class"])
        check_path(expected_path(L, k, dtype, shift, want_arg=True), f"size={size} k={k}")
        assert (grp == 0).all(), (dtype, grp)
        ref_cls, ref_prob, ref_group = reference.group_predict(vals.double(), g)
        assert torch.equal(c.cpu(), ref_cls) and (ref_group == 0).all()
        close(p.double(), ref_prob, ACC_TOL[dtype])


@rehearsable
@pytest.mark.parametrize("n", [1, 3, 6, 37])
def test_short_rows_some_tied_share_a_warp(n, gen):
    # Four rows per warp (48 logits): every other row holds four bit-identical groups (a near-tie,
    # decided again by the whole warp for that row only), the rows between them random.
    g = Groups.from_sizes([11] * 4)
    tc, td = g.tensors("cpu"), g.tensors(DEV)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xc = (torch.randn(n, g.num_logits, generator=gen, dtype=torch.float64) * 3).to(dtype)
        xc[::2] = xc[::2, :12].repeat(1, 4)
        x = xc.to(DEV)
        s, mg, ml = ops.group_softmax_score(x, td["offsets"])
        check_path(expected_path(g.num_logits, 4, dtype), "L48")
        assert (mg[::2] == 0).all(), mg
        rs, rmg, rml = ops.group_softmax_score(xc, tc["offsets"])
        close(s, rs, ACC_TOL[dtype])
        close(ml, rml, ACC_TOL[dtype])
        clear = clear_winner(per_group_others_prob(xc.double(), g), largest=False)
        assert torch.equal(mg.cpu()[clear], rmg[clear])
        c, p, grp = ops.group_predict(x, td["offsets"], td["logit_class"])
        assert (grp[::2] == 0).all(), grp
        rc, rp, rg = ops.group_predict(xc, tc["offsets"], tc["logit_class"])
        close(p, rp, ACC_TOL[dtype])
        assert torch.equal(c.cpu()[::2], rc[::2])


@rehearsable
def test_nan_and_inf_prediction_follow_the_reference():
    # The rule on every device: the first group whose softmax is NaN (a NaN or +inf in its slice,
    # or only -inf) wins, at its first class; its probability is NaN.
    g = Groups.from_sizes([3, 2, 4])  # logits: [o a b c | o d e | o f g h i]
    L = g.num_logits
    rows = []
    for v in (float("nan"), float("inf")):
        for j in range(L):  # every slot once, on zero logits (the example: NaN at slot 1)
            r = torch.zeros(L)
            r[j] = v
            rows.append(r)
    r = torch.zeros(L)
    r[4:7] = float("-inf")  # group 1 only -inf
    rows.append(r)
    r = torch.randn(L)
    r[7], r[2] = float("nan"), float("inf")  # two NaN groups: the first wins
    rows.append(r)
    x = torch.stack(rows)
    td = g.tensors(DEV)
    ref_cls, ref_prob, ref_group = reference.group_predict(x.double(), g)
    ref_score = reference.group_softmax_score(x.double(), g)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype).to(DEV)
        c, p, grp = ops.group_predict(xd, td["offsets"], td["logit_class"])
        assert torch.equal(c.cpu(), ref_cls), (dtype, c.cpu(), ref_cls)
        assert torch.equal(grp.cpu(), ref_group), (dtype, grp.cpu(), ref_group)
        assert torch.equal(p.cpu().isnan(), ref_prob.isnan())
        s, mg, _ = ops.group_softmax_score(xd, td["offsets"])
        assert torch.equal(s.cpu().isnan(), ref_score.isnan())


@rehearsable
def test_nan_and_inf_in_later_segments_on_the_block_tier():
    # Rows of 2203 logits (the block tier): a NaN, +inf or -inf run placed in the first, a middle
    # or the last 63-logit segment of a group merged by one thread (201 logits) or by a warp
    # (1701 logits), a segment of only -inf beside finite ones, a group of only -inf.
    g = Groups.from_sizes([200, 1700, 300])
    (a0, b0), (a1, b1), (a2, b2) = g.slices.tolist()
    L = g.num_logits
    gen = torch.Generator().manual_seed(7)
    rows = []
    for pos in (a0, a0 + 1, a0 + 130, b0 - 1, a1, a1 + 63, a1 + 900, b1 - 1, b2 - 1):
        for v in (float("nan"), float("inf")):
            r = torch.randn(L, generator=gen)
            r[pos] = v
            rows.append(r)
    r = torch.randn(L, generator=gen)
    r[a1 + 63 : a1 + 126] = float("-inf")  # one whole segment of the wide group
    rows.append(r)
    r = torch.randn(L, generator=gen)
    r[a0:b0] = float("-inf")  # a whole group
    rows.append(r)
    r = torch.randn(L, generator=gen)
    r[a2 + 5], r[a1 + 700] = float("nan"), float("inf")  # two NaN groups: the first wins
    rows.append(r)
    x = torch.stack(rows)
    td, tc = g.tensors(DEV), g.tensors("cpu")
    ref_cls, ref_prob, ref_group = reference.group_predict(x.double(), g)
    ref_score = reference.group_softmax_score(x.double(), g)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype).to(DEV)
        c, p, grp = ops.group_predict(xd, td["offsets"], td["logit_class"])
        check_path(expected_path(L, 3, dtype, want_arg=True), "nan rows")
        assert torch.equal(c.cpu(), ref_cls), (dtype, c.cpu(), ref_cls)
        assert torch.equal(grp.cpu(), ref_group), (dtype, grp.cpu(), ref_group)
        assert torch.equal(p.cpu().isnan(), ref_prob.isnan())
        s, mg, ml = ops.group_softmax_score(xd, td["offsets"])
        assert torch.equal(s.cpu().isnan(), ref_score.isnan())
        rs, rmg, _ = ops.group_softmax_score(x.to(dtype), tc["offsets"])
        close(s, rs, ACC_TOL[dtype])
        assert torch.equal(mg.cpu(), rmg)
        close(
            ops.group_softmax(xd, td["offsets"], False),
            ops.group_softmax(x.to(dtype), tc["offsets"], False),
            OUT_TOL[dtype],
        )


@rehearsable
def test_nan_groups_offered_by_different_warps_of_a_block():
    # 300 groups on the block tier: thread t offers groups t and t + 256, and the warps' picks are
    # merged afterwards. NaN (or +inf) in groups 260 (thread 4, warp 0) and 40 (warp 1): group 40
    # must win (the first NaN group), which a merge in warp order would get wrong.
    g = Groups.from_sizes([3] * 300)
    sl = g.slices.tolist()
    gen = torch.Generator().manual_seed(11)
    rows = []
    for v in (float("nan"), float("inf")):
        for groups in ((260, 40), (260,), (40, 260, 299), (299, 0)):
            r = torch.randn(g.num_logits, generator=gen)
            for k in groups:
                r[sl[k][0] + 1 + k % 2] = v
            rows.append(r)
    x = torch.stack(rows)
    td = g.tensors(DEV)
    ref_cls, _, ref_group = reference.group_predict(x.double(), g)
    ref_score = reference.group_softmax_score(x.double(), g)
    assert ref_group.tolist() == [40, 260, 40, 0] * 2
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype).to(DEV)
        c, p, grp = ops.group_predict(xd, td["offsets"], td["logit_class"])
        check_path(expected_path(g.num_logits, 300, dtype, want_arg=True), "300 groups")
        assert torch.equal(grp.cpu(), ref_group) and torch.equal(c.cpu(), ref_cls), (dtype, grp.cpu())
        s, mg, _ = ops.group_softmax_score(xd, td["offsets"])
        assert torch.equal(mg.cpu(), ref_group) and s.isnan().all() and ref_score.isnan().all(), (dtype, mg.cpu())


@rehearsable
def test_backward_arguments_are_checked_as_on_the_cpu():
    """The backward ops check their saved and incoming tensors with the CPU's helpers: the same
    rule and the same message on both devices (shape, not only the element count; a float dtype)."""
    g = Groups.from_sizes([3, 2, 4])
    td = g.tensors(DEV)
    x = torch.randn(5, g.num_logits, device=DEV)
    s, mg, ml = ops.group_softmax_score(x, td["offsets"])
    cases = [
        ((s, x, td["offsets"], mg, ml[:, None]), r"min_lse must have shape \[5\]"),
        ((s.long(), x, td["offsets"], mg, ml), "grad_score must be float64, float32, float16 or bfloat16"),
        ((s, x, td["offsets"], mg.int(), ml), "min_group must be int64"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops.group_softmax_score_backward(*args)
    y = ops.group_softmax(x, td["offsets"], False)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape"):
        ops.group_softmax_backward(y[:, :-1], y, td["offsets"], False)
    t = torch.randint(0, g.num_classes, (1, 5), device=DEV)
    losses, lse = ops.group_cross_entropy(x, td["offsets"], t, td["class_logit"], -100)
    with pytest.raises(RuntimeError, match=r"lse must have shape"):
        ops.group_cross_entropy_backward(
            torch.ones_like(losses), x, td["offsets"], t, td["class_logit"], lse[:, :1], -100
        )


def test_a_min_group_that_is_no_group_index_poisons_its_row():
    """CUDA cannot raise on a value without a device sync: an out-of-range min_group gives NaN in
    its row (the CPU raises), and the other rows are exact (docs/semantics.md)."""
    g = Groups.from_sizes([3, 2, 4])
    td = g.tensors(DEV)
    x = torch.randn(4, g.num_logits, device=DEV)
    s, mg, ml = ops.group_softmax_score(x, td["offsets"])
    bad = mg.clone()
    bad[1] = 7
    gx = ops.group_softmax_score_backward(torch.ones_like(s), x, td["offsets"], bad, ml)
    want = ops.group_softmax_score_backward(torch.ones_like(s), x, td["offsets"], mg, ml)
    assert torch.isnan(gx[1]).all()
    keep = torch.tensor([0, 2, 3], device=DEV)
    torch.testing.assert_close(gx[keep], want[keep], rtol=0, atol=0)
