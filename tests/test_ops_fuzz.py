"""Fuzz target over the raw torch.ops.mosx.* arguments: no argument may crash the process.

Each batch of cases runs in a subprocess (in a temporary working directory) that prints, for every
case, "ok" or the type of the Python exception it raised; a crash (a signal, an abort) ends that
subprocess and fails the test with the last case it started.
"""

import json
import os
import subprocess
import sys

import pytest

ALLOWED = {"ok", "RuntimeError", "ValueError", "TypeError", "IndexError"}

_DRIVER = r"""
import json, random, sys
import torch, mosx

ops = torch.ops.mosx
seed, count = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
HUGE = [6917529027641081856, -6917529027641081856, 2**63 - 1, -2**63, 2**31, -1, 2**62]
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int64, torch.int32, torch.bool, torch.uint8]

def offsets_for(L):
    kind = rng.choice(["good"] * 12 + ["huge", "unsorted", "short", "random", "wrong_dtype", "meta", "2d"])
    if L >= 2 and kind in ("good", "wrong_dtype", "meta", "2d"):
        cuts, o = sorted(rng.sample(range(2, L - 1), k=min(rng.randint(0, 3), max(L - 3, 0)))), [0]
        for c in cuts:
            if c - o[-1] >= 2 and L - c >= 2:
                o.append(c)
        o.append(L)
        t = torch.tensor(o)
        if kind == "wrong_dtype":
            t = t.to(rng.choice([torch.int32, torch.float32, torch.uint8]))
        elif kind == "meta":
            t = t.to("meta")
        elif kind == "2d":
            t = t.unsqueeze(0)
        return t
    if kind == "huge":
        return torch.tensor([0, rng.choice(HUGE), rng.choice(HUGE), L])
    if kind == "unsorted":
        return torch.tensor([0, L, max(L - 2, 0), L])
    if kind == "short":
        return torch.tensor(rng.choice([[], [0], [L]]), dtype=torch.long)
    return torch.tensor([rng.choice([0, 0] + HUGE) for _ in range(rng.randint(2, 5))])

def tensor(shape, dtype=None):
    dtype = dtype or rng.choice(FLOATS)
    if any(s < 0 for s in shape):
        shape = [abs(s) for s in shape]
    if dtype.is_floating_point:
        t = torch.randn(*shape, dtype=torch.float64).to(dtype)
        if t.numel() and rng.random() < 0.4:
            flat = t.view(-1)
            for _ in range(rng.randint(1, 3)):
                flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    elif dtype == torch.bool:
        t = torch.rand(*shape) < 0.5
    else:
        t = torch.randint(-3, 8, shape, dtype=torch.int64).to(dtype)
    return odd(t)

def odd(t):
    r = rng.random()
    if r < 0.15 and t.dim() == 2 and t.numel():
        return t.t().contiguous().t()  # column-major
    if r < 0.3 and t.dim() >= 1 and t.numel():
        big = torch.cat([t, t], dim=0)
        return big[::2]  # a stride-2 view
    if r < 0.32:
        return t.to("meta")
    if r < 0.35 and t.dim() >= 1 and t.shape[0] > 0:
        return t.expand(*t.shape) if rng.random() < 0.5 else t[:0]
    return t

def shape_near(shape):
    shape = list(shape)
    r = rng.random()
    if r < 0.04 and shape:
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 3])
    elif r < 0.06:
        shape = shape + [1]
    elif r < 0.08 and shape:
        shape = shape[:-1]
    return shape

def long_tensor(shape, lo, hi):
    if rng.random() < 0.05:
        return torch.tensor([rng.choice(HUGE) for _ in range(max(1, int(torch.tensor(shape).prod())))]).reshape(shape) if shape else torch.tensor(rng.choice(HUGE))
    t = torch.randint(lo, hi, shape or [1])
    if rng.random() < 0.05:
        t = t.to(rng.choice([torch.int32, torch.float32]))
    return odd(t)

def case():
    n = rng.choice([0, 0, 1, 2, 3, 5, 17])
    L = rng.choice([0, 1, 2, 3, 4, 7, 9, 33])
    x = tensor(shape_near([n, L]), rng.choice(DTYPES) if rng.random() < 0.1 else None)
    off = offsets_for(L)
    k = max(off.numel() - 1, 1)
    acc = rng.choice(FLOATS)
    op = rng.choice(["softmax", "softmax_backward", "score", "score_backward", "predict",
                     "ce", "ce_backward", "masked_weight", "masked_weight_backward"])
    if op == "softmax":
        return lambda: ops.group_softmax(x, off, rng.random() < 0.5)
    if op == "softmax_backward":
        g, y = tensor(shape_near([n, L])), tensor(shape_near([n, L]))
        return lambda: ops.group_softmax_backward(g, y, off, rng.random() < 0.5)
    if op == "score":
        return lambda: ops.group_softmax_score(x, off)
    if op == "score_backward":
        gs = tensor(shape_near([n]), acc)
        mg = long_tensor(shape_near([n]), -2, k + 2)
        ml = tensor(shape_near([n]), acc)
        return lambda: ops.group_softmax_score_backward(gs, x, off, mg, ml)
    if op == "predict":
        lc = long_tensor(shape_near([L]), -2, L + 2)
        return lambda: ops.group_predict(x, off, lc)
    m = rng.choice([1, 2, 2, 3, 0])
    c = max(L - k, 0)
    if rng.random() < 0.5:
        t = long_tensor(shape_near([m, n]), -3, c + 2)
    else:
        t = long_tensor(shape_near([m, n, k]), -3, 6)
    cl = long_tensor(shape_near([c]), -2, L + 2)
    ii = rng.choice([-100, -1, 0, 1, 2**63 - 1, -2**63])
    if op == "ce":
        return lambda: ops.group_cross_entropy(x, off, t, cl, ii)
    if op == "ce_backward":
        gl = tensor(shape_near([m, n, k]), acc)
        lse = tensor(shape_near([n, k]), acc)
        return lambda: ops.group_cross_entropy_backward(gl, x, off, t, cl, lse, ii)
    w = tensor(shape_near([n, L]))
    s = tensor(shape_near([n, L]))
    keep = rng.choice([0.0, 0.5, 1.0, -1.0, 2.0, float("nan"), float("inf"), 1e-30])
    if op == "masked_weight":
        return lambda: ops.masked_weight(w, s, keep)
    g = tensor(shape_near([n, L]))
    mask = tensor(shape_near([n, L]), rng.choice([torch.bool, torch.bool, torch.float32]))
    return lambda: ops.masked_weight_backward(g, w, s, mask, rng.random() < 0.5, rng.random() < 0.5)

for i in range(count):
    print(json.dumps({"case": i, "start": True}), flush=True)
    try:
        fn = case()
    except Exception as e:  # building the arguments (a bad shape for torch itself): not a case
        print(json.dumps({"case": i, "result": "skipped:" + type(e).__name__}), flush=True)
        continue
    try:
        out = fn()
        # touch the results, so uninitialised or out-of-bounds memory would be read here
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if o.device.type != "meta":
                o.sum().item() if o.numel() and o.dtype != torch.bool else None
        result = "ok"
    except Exception as e:
        result = type(e).__name__
    print(json.dumps({"case": i, "result": result}), flush=True)
print("END", flush=True)
"""


def _run(seed: int, count: int, tmp_path, timeout: int, env_extra=None, driver=_DRIVER):
    env = {**os.environ, **(env_extra or {})}
    r = subprocess.run(
        [sys.executable, "-c", driver, str(seed), str(count)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = r.stdout.splitlines()
    last = lines[-2] if len(lines) >= 2 else r.stdout
    assert r.returncode == 0, f"seed {seed}: exit {r.returncode} after {last}\n{r.stderr[-3000:]}"
    assert lines and lines[-1] == "END", r.stdout[-2000:]
    results = [json.loads(line) for line in lines[:-1]]
    done = [e for e in results if "result" in e]
    assert len(done) == count
    bad = [e for e in done if e["result"] not in ALLOWED and not e["result"].startswith("skipped:")]
    assert not bad, f"seed {seed}: unexpected exception types {bad[:10]}"
    ran = [e for e in done if not e["result"].startswith("skipped:")]
    assert len(ran) >= count // 2, f"seed {seed}: too many cases could not be built"
    return done


def test_fuzz_raw_ops_fast(tmp_path):
    done = _run(12, 200, tmp_path, timeout=300)
    kinds = {e["result"] for e in done}
    assert "ok" in kinds and "RuntimeError" in kinds  # the generator reaches both sides


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "baseline"])
@pytest.mark.parametrize("seed", range(8))
def test_fuzz_raw_ops_many(tmp_path, seed, variant):
    env = {"MOSX_CPU_KERNELS": "baseline"} if variant == "baseline" else None
    _run(1000 + seed, 1500, tmp_path, timeout=900, env_extra=env)


def test_fuzz_harness_fails_on_a_crash(tmp_path):
    # The harness must fail when a case kills the subprocess (here: a case that aborts).
    crashing = _DRIVER.replace("        out = fn()\n", "        out = fn()\n        os.abort() if i >= 3 else None\n")
    crashing = "import os\n" + crashing
    assert crashing != "import os\n" + _DRIVER
    with pytest.raises(AssertionError, match="exit -6"):
        _run(12, 20, tmp_path, timeout=120, driver=crashing)
