"""The CUDA kernels, run on the CPU: tools/cuda_emu compiles csrc/cuda/*.cu (host code and kernels,
unchanged but for mechanical rewrites) against a SIMT emulator and loads them as torch.ops.mosx_emu,
whose ops take CPU tensors. Each op is compared with the CPU kernels (torch.ops.mosx) on the same
tensor, on every kernel path (register, block, chunked; MOSX_CUDA_KERNELS=chunked), with the
emulator checking barriers, warp-op convergence, late cp.async copies and shared-memory limits
(tools/cuda_emu/emu.h). This runs the device code on every CI run; it does not replace the GPU
run (tests/test_cuda.py, tools/gpu_check.sh): no timing, no memory model, CPU float rounding.

Skips only where no CUDA toolkit headers are found; MOSX_REQUIRE_CUDA_EMU=1 (set by .ci/run)
makes that a failure.
"""

import importlib.util
import os

import pytest
import torch
from cuda_paths import planned_path, widest_block_row

import mosx
from mosx import Groups, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = torch.ops.mosx

ACC_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def E():
    spec = importlib.util.spec_from_file_location("cuda_emu_build", os.path.join(ROOT, "tools", "cuda_emu", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        build.build(asan=os.environ.get("MOSX_EMU_ASAN") == "1")
    except build.NoCudaHeaders as e:
        if os.environ.get("MOSX_REQUIRE_CUDA_EMU") == "1":
            raise
        pytest.skip(str(e))
    return torch.ops.mosx_emu


@pytest.fixture(params=["fast", "chunked"])
def kernels(request, monkeypatch):
    # the emulated build reads MOSX_CUDA_KERNELS at every launch (the GPU build once per process)
    if request.param == "chunked":
        monkeypatch.setenv("MOSX_CUDA_KERNELS", "chunked")
    else:
        monkeypatch.delenv("MOSX_CUDA_KERNELS", raising=False)
    return request.param


def close(a, b, tol, what="", atol=None):
    """a == b to a relative tol (and an absolute tol, by default the same; the scores and
    probabilities, often tiny, pass a much smaller one)."""
    if atol == "scale":  # sums that cancel (gradients, losses): rounding relative to the largest entry
        finite = b[torch.isfinite(b)]
        scale = finite.abs().max().item() if finite.numel() else 1.0
        atol = (1e-14 if b.dtype == torch.float64 else 1e-6) * scale
    atol = tol if atol is None else atol
    torch.testing.assert_close(
        a.double(), b.double(), rtol=tol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def fits(E, L, K, dtype, want_arg=False):
    optin = int(os.environ.get("MOSX_EMU_SMEM_OPTIN", "232448"))
    return E._cuda_block_smem_bytes(K, L, dtype, want_arg) <= optin


def expect_path(E, want, what):
    got = E._cuda_last_path()
    assert got == want, f"{what}: ran on {got}, the test meant {want}"


def rows(gen, n, L, dtype, shift=0, stride=None, scale=4.0):
    """[n, L] rows `stride` apart (default packed) starting `shift` elements into an allocation
    that ends at the last logit."""
    stride = L if stride is None else stride
    flat = torch.zeros((n - 1) * stride + shift + L if n else shift, dtype=dtype)
    x = flat.as_strided((n, L), (stride, 1), shift)
    x.copy_((torch.randn(n, L, generator=gen, dtype=torch.float64) * scale).to(dtype))
    return x


def group_probs(x, g):
    """(others probability [n, K], best class probability [n, K]) of every group, in float64."""
    t = g.tensors("cpu")
    y = C.group_softmax(x.double(), t["offsets"], False)
    gid = torch.repeat_interleave(torch.arange(g.num_groups), g.slices[:, 1] - g.slices[:, 0])
    others = y[:, g.slices[:, 0]]
    cls = y.clone()
    cls[:, g.slices[:, 0]] = -1.0
    best = torch.full_like(others, -1.0).scatter_reduce_(1, gid.expand_as(y), cls, "amax")
    return others, best


def clear_rows(values, largest, margin=1e-4):
    """Rows whose winning group is ahead of the runner-up by a relative margin (near-ties may go
    either way)."""
    top = values.topk(2, dim=1, largest=largest).values
    return (top[:, 0] - top[:, 1]).abs() > margin * top.abs().max(1).values


def check_every_op(E, x, g, gen, path, what):
    """Every op of the emulated CUDA build against the CPU kernels on x, and the path they ran."""
    t = g.tensors("cpu")
    dtype = x.dtype
    n, L = x.shape
    acc_tol, out_tol = ACC_TOL[dtype], OUT_TOL[dtype]
    others, best = group_probs(x, g)
    s, mg, ml = E.group_softmax_score(x, t["offsets"])
    expect_path(E, path(False), f"{what} score")
    rs, rmg, rml = C.group_softmax_score(x, t["offsets"])
    close(s, rs, acc_tol, f"{what} score", atol=1e-30)
    clear = clear_rows(others, largest=False)  # else shifted copies of a group may swap the group
    assert torch.equal(mg[clear], rmg[clear]), what
    close(ml[clear], rml[clear], acc_tol * 5, f"{what} min_lse", atol=acc_tol * 5 * 1e-3)
    c, p, grp = E.group_predict(x, t["offsets"], t["logit_class"])
    expect_path(E, path(True), f"{what} predict")
    rc, rp, rg = C.group_predict(x, t["offsets"], t["logit_class"])
    close(p, rp, acc_tol, f"{what} predict", atol=1e-30)
    clear = clear_rows(best, largest=True)
    assert torch.equal(c[clear], rc[clear]) and torch.equal(grp[clear], rg[clear]), what
    # Absolute tolerances far below the values: a probability is checked relatively however
    # small it is (down to the dtype's subnormals); gradients and losses (sums that cancel:
    # atol="scale") and log-probabilities near 0 keep a small one.
    subnormal = 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    gs = torch.randn(n, generator=gen, dtype=torch.float64).to(rs.dtype)
    close(
        E.group_softmax_score_backward(gs, x, t["offsets"], rmg, rml),
        C.group_softmax_score_backward(gs, x, t["offsets"], rmg, rml),
        out_tol,
        f"{what} score backward",
        atol="scale",
    )
    for log in (False, True):
        y = E.group_softmax(x, t["offsets"], log)
        ry = C.group_softmax(x, t["offsets"], log)
        close(y, ry, out_tol, f"{what} softmax log={log}", atol=out_tol if log else subnormal)
        go = torch.randn(n, L, generator=gen, dtype=torch.float64).to(dtype)
        close(
            E.group_softmax_backward(go, ry, t["offsets"], log),
            C.group_softmax_backward(go, ry, t["offsets"], log),
            out_tol,
            f"{what} softmax backward log={log}",
            atol="scale",
        )
    cls = torch.randint(0, g.num_classes, (2, n), generator=gen)
    cls[:, ::5] = -100
    # class ids [2, n] (mixup), and per-group labels [1, n, K] (0: others, j + 1: the group's
    # class j); some ignored in both
    sizes = (g.slices[:, 1] - g.slices[:, 0] - 1).double()
    per_group = (torch.rand(1, n, g.num_groups, generator=gen, dtype=torch.float64) * (sizes + 1)).long()
    per_group[:, ::4, ::3] = -100
    for targets, kind in ((cls, "class ids"), (per_group, "per-group labels")):
        losses, lse = E.group_cross_entropy(x, t["offsets"], targets, t["class_logit"], -100)
        rl, rlse = C.group_cross_entropy(x, t["offsets"], targets, t["class_logit"], -100)
        close(losses, rl, acc_tol * 5, f"{what} cross-entropy, {kind}", atol="scale")
        close(lse, rlse, acc_tol * 5, f"{what} lse, {kind}")
        gl = torch.rand(*losses.shape, generator=gen, dtype=torch.float64).to(rl.dtype)
        close(
            E.group_cross_entropy_backward(gl, x, t["offsets"], targets, t["class_logit"], rlse, -100),
            C.group_cross_entropy_backward(gl, x, t["offsets"], targets, t["class_logit"], rlse, -100),
            out_tol,
            f"{what} cross-entropy backward, {kind}",
            atol="scale",
        )
    # an invalid class id: NaN in its row (CUDA cannot raise without a sync; the CPU raises), the
    # other rows exact
    bad = cls[:1].clone()
    bad[0, 1::7] = g.num_classes + 3
    hit = bad[0] == g.num_classes + 3
    losses, _ = E.group_cross_entropy(x, t["offsets"], bad, t["class_logit"], -100)
    assert losses[0, hit].isnan().all() and not losses[0, ~hit].isnan().any(), what
    close(
        losses[0, ~hit],
        C.group_cross_entropy(x[~hit], t["offsets"], bad[:, ~hit], t["class_logit"], -100)[0][0],
        acc_tol * 5,
    )


# Layouts by the path they take (fast kernels, float32, packed rows sharing a shift): every register
# tier, block layouts with segment-size edges, >32 and >256 groups, warp-merged groups (more than a
# block has warps), the 10k benchmark layout; chunked ones by group count.
LAYOUTS = {
    "L48_four_rows_per_warp": [11] * 4,
    "L100_two_rows_per_warp": [9, 30, 1, 56],
    "L168": [20] * 8,
    "imagenet": list(mosx.IMAGENET_TAXONOMY_SIZES),
    "L1200": [99] * 12,
    "block_segment_edges": [n - 1 for n in (2, 62, 63, 64, 126, 127, 128, 503, 504, 505, 1000)],
    "block_40_groups": [n - 1 for n in (2, 62, 63, 64, 3)] * 8,
    "block_wide_groups_between_narrow": [s for i in range(11) for s in (504 + 61 * i, 2)],
    "block_10k": [100] * 100,
    "block_2047_groups": [1] * 2047,
    "chunked_40_small_groups": [10] * 40,
    "chunked_2100_groups": [1] * 2100,
}
HUGE = ("block_2047_groups", "chunked_2100_groups")  # thousands of groups: one dtype, one placement
CASES = [
    (name, placement, dtype)
    for name in LAYOUTS
    for placement in ("packed", "shift3_strided")
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
    if name not in HUGE or (placement, dtype) == ("shift3_strided", torch.float32)
] + [(name, "shift3_strided", torch.float16) for name in LAYOUTS if name not in HUGE]


@pytest.mark.parametrize("name,placement,dtype", CASES, ids=[f"{n}-{p}-{str(d)[6:]}" for n, p, d in CASES])
def test_every_op_matches_the_cpu_kernels(E, kernels, name, placement, dtype, gen):
    g = Groups.from_sizes(LAYOUTS[name])
    L, K = g.num_logits, g.num_groups
    es = torch.empty(0, dtype=dtype).element_size()
    if placement == "packed":
        shift, stride = 0, L
    else:
        shift, stride = 3, (L + 3 + 7) // 8 * 8
    x = rows(gen, 37, L, dtype, shift, stride)
    uniform = stride * es % 16 == 0

    def path(want_arg):
        return planned_path(L, K, dtype, shift, uniform, kernels, lambda: fits(E, L, K, dtype, want_arg))

    check_every_op(E, x, g, gen, path, f"{name} {placement} {dtype} {kernels}")


TIER_WIDTHS = [63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049]


@pytest.mark.parametrize("width", TIER_WIDTHS)
def test_tier_boundaries(E, kernels, width, gen):
    # row widths (L + shift) one below, at and one above every register tier and the block tier's
    # minimum; rows sharing one shift
    for dtype in (torch.float32, torch.bfloat16):
        for shift, k in ((0, 2), (1, 8)):
            L = width - shift
            g = Groups.from_sizes([(L - k) // k + (L - k) % k] + [(L - k) // k] * (k - 1))
            x = rows(gen, 13, L, dtype, shift, (width + 7) // 8 * 8)

            def path(want_arg):
                return planned_path(L, k, dtype, shift, True, kernels, lambda: fits(E, L, k, dtype, want_arg))

            check_every_op(E, x, g, gen, path, f"width={width} shift={shift} K={k} {dtype}")


@pytest.mark.parametrize(
    "size,k",
    [(12, 4), (30, 4), (100, 12), (10, 30), (10, 120), (40, 60), (1100, 3), (600, 5), (520, 11), (2, 2100)],
)
def test_identical_groups_tie_to_the_first(E, kernels, size, k, gen):
    g = Groups.from_sizes([size - 1] * k)
    t = g.tensors("cpu")
    for dtype, shift in ((torch.float32, 0), (torch.bfloat16, 3)):
        L = g.num_logits
        x = rows(gen, 9, L, dtype, shift, (L + shift + 7) // 8 * 8)
        x.copy_(x[:, :size].repeat(1, k))
        _, mg, _ = E.group_softmax_score(x, t["offsets"])
        assert (mg == 0).all(), (dtype, shift, mg)
        c, p, grp = E.group_predict(x, t["offsets"], t["logit_class"])
        assert (grp == 0).all(), (dtype, shift, grp)
        ref_cls, ref_prob, _ = C.group_predict(x, t["offsets"], t["logit_class"])
        assert torch.equal(c, ref_cls)
        close(p, ref_prob, ACC_TOL[dtype])


def nan_rows(g, spots, gen):
    L = g.num_logits
    out = []
    for pos in spots:
        for v in (float("nan"), float("inf")):
            r = torch.randn(L, generator=gen)
            r[pos] = v
            out.append(r)
    return out


@pytest.mark.parametrize("layout", ["register", "block", "block_300_groups", "chunked"])
def test_nan_and_inf_follow_the_reference(E, kernels, layout, gen):
    # The first group whose softmax is NaN wins, at its first class. block_300_groups: NaN groups
    # offered by different warps of the block (groups 40 and 260: threads 40 and 4), where a merge
    # in warp order instead of group order would pick the wrong one.
    sizes = {"register": [3, 2, 4], "block": [200, 1700, 300], "block_300_groups": [3] * 300, "chunked": [10] * 40}
    g = Groups.from_sizes(sizes[layout])
    sl = g.slices.tolist()
    spots = sorted({a for a, _ in sl[:3]} | {a + 1 for a, _ in sl[:3]} | {b - 1 for _, b in sl[-2:]})
    if layout == "block":
        spots += [sl[1][0] + 63, sl[1][0] + 900]
    rs = nan_rows(g, spots, gen)
    if layout == "block_300_groups":
        for v in (float("nan"), float("inf")):
            for groups in ((260, 40), (260,), (40, 260, 299)):
                r = torch.randn(g.num_logits, generator=gen)
                for k in groups:
                    r[sl[k][0] + 1 + k % 2] = v
                rs.append(r)
    r = torch.randn(g.num_logits, generator=gen)
    r[sl[0][0] : sl[0][1]] = float("-inf")  # a group of only -inf
    rs.append(r)
    x = torch.stack(rs)
    t = g.tensors("cpu")
    ref_cls, ref_prob, ref_group = reference.group_predict(x.double(), g)
    ref_score = reference.group_softmax_score(x.double(), g)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        c, p, grp = E.group_predict(xd, t["offsets"], t["logit_class"])
        assert torch.equal(c, ref_cls), (dtype, c, ref_cls)
        assert torch.equal(grp, ref_group), (dtype, grp, ref_group)
        assert torch.equal(p.isnan(), ref_prob.isnan())
        s, mg, _ = E.group_softmax_score(xd, t["offsets"])
        assert torch.equal(s.isnan(), ref_score.isnan())
        assert torch.equal(mg, C.group_softmax_score(xd, t["offsets"])[1])


def test_block_tier_at_the_shared_memory_limit(E, monkeypatch, gen):
    # A device with 64 KiB of opt-in shared memory per block: the widest row whose layout fits runs
    # on the block tier (launched with exactly that much), one logit more on the chunked kernels.
    smem = 65536
    monkeypatch.setenv("MOSX_EMU_SMEM_OPTIN", str(smem))
    monkeypatch.delenv("MOSX_CUDA_KERNELS", raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for want_arg in (False, True):
            widest = widest_block_row(E._cuda_block_smem_bytes, 2, dtype, want_arg, smem)
            for L, want in ((widest, "block"), (widest + 1, "chunked")):
                g = Groups.from_sizes([L // 2 - 1, L - L // 2 - 1])
                t = g.tensors("cpu")
                x = rows(gen, 3, L, dtype)
                if want_arg:
                    got = E.group_predict(x, t["offsets"], t["logit_class"])[1]
                    ref = C.group_predict(x, t["offsets"], t["logit_class"])[1]
                else:
                    got = E.group_softmax_score(x, t["offsets"])[0]
                    ref = C.group_softmax_score(x, t["offsets"])[0]
                expect_path(E, want, f"L={L} {dtype} want_arg={want_arg}")
                close(got, ref, ACC_TOL[dtype])


def test_an_empty_batch_launches_nothing(E, kernels):
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    t = g.tensors("cpu")
    x = torch.randn(3, g.num_logits)
    E.group_softmax_score(x, t["offsets"])
    s, mg, ml = E.group_softmax_score(x[:0], t["offsets"])
    expect_path(E, "none", "score on no rows")
    assert s.shape == mg.shape == ml.shape == (0,)
    losses, lse = E.group_cross_entropy(
        x[:0], t["offsets"], torch.zeros(1, 0, dtype=torch.long), t["class_logit"], -100
    )
    assert losses.shape == (1, 0, g.num_groups) and lse.shape == (0, g.num_groups)
    gx = E.group_cross_entropy_backward(
        losses, x[:0], t["offsets"], torch.zeros(1, 0, dtype=torch.long), t["class_logit"], lse, -100
    )
    expect_path(E, "none", "cross-entropy backward on no rows")
    assert gx.shape == (0, g.num_logits)


@pytest.mark.parametrize("L", [12, 3000], ids=["register", "block"])
def test_bad_offsets_never_fault(E, kernels, L):
    # Offsets are not read on the host: bad ones give garbage, never an access outside the tensors
    # (the emulated build under AddressSanitizer, tools/cuda_emu/build.py --asan, would report it).
    x = torch.randn(4, L)
    for bad in ([0, 20, 12], [0, -5, 12], [0, 9, 3, 12], [5, 6, 7, 12], [0, 2, 4, 6, 8, 10, 12]):
        off = torch.tensor(bad) * (L // 12)
        E.group_softmax_score(x, off)
        E.group_softmax(x, off, True)
        E.group_predict(x, off, torch.zeros(L, dtype=torch.long))
        t = torch.tensor([[0, 1, 2, 3]])
        class_logit = torch.arange(L - (len(bad) - 1))
        losses, lse = E.group_cross_entropy(x, off, t, class_logit, -100)
        E.group_cross_entropy_backward(torch.ones_like(losses), x, off, t, class_logit, lse, -100)
    x = torch.randn(2, 5000)
    off = torch.arange(0, 5001, 2)
    off[7], off[100] = 4999, -3
    E.group_softmax_score(x, off)
    E.group_softmax(x, off, False)


@pytest.mark.parametrize("n", [1, 37, 5000])
def test_masked_weight_matches_the_cpu(E, n, gen):
    w = torch.randn(n, generator=gen)
    scores = torch.randn(n, generator=gen)
    scores[::7] = scores[0]  # ties go to the lower index
    for keep in (0.01, 0.3, 1.0):
        ew, em = E.masked_weight(w, scores, keep)
        cw, cm = C.masked_weight(w, scores, keep)
        assert torch.equal(em, cm) and torch.equal(ew, cw), keep
        grad = torch.randn(n, generator=gen)
        for a, b in zip(
            E.masked_weight_backward(grad, w, scores, em, True, True),
            C.masked_weight_backward(grad, w, scores, cm, True, True),
        ):
            close(a, b, 1e-6, f"masked_weight backward keep={keep}")
