"""GPU speed of the fused mosx ops, as a fraction of the machine's copy bandwidth measured in the
same run, and against the reference loop and torch.compile of the reference.

    pytest bench/bench_cuda.py --benchmark-json=bench/results/cuda.json
Writes a markdown table (machine, torch version, date) to bench/results/cuda_<gpu>_<date>.md.
Skips without a GPU or without a CUDA build of mosx.

Timing: every sample is one call, bracketed by CUDA events on the current stream, after a 256 MiB
write that evicts the logits from L2 (so batch 4096 does not run from cache); the median of the
samples is used. Bandwidth = bytes the op must move (read the logits once, write the outputs;
for the cross-entropy forward + backward: read the logits twice, write the gradient, plus the
small per-group tensors) / median time. Copy bandwidth = (read + write bytes) / time of a 1 GiB
device-to-device copy. pytest-benchmark's own table times the fused call plus a synchronize.

Env: MOSX_BENCH_QUICK=1 (batch 1 and 4096, ImageNet layout only), MOSX_BENCH_COMPILE=0 (skip
torch.compile, which spends ~10-30 s compiling per shape), MOSX_BENCH_BATCHES=1,256 (override),
MOSX_BENCH_SAMPLES=7 (timed calls per case), MOSX_BENCH_COMPILE_BATCHES=65536 and
MOSX_BENCH_COMPILE_LAYOUTS=imagenet_1008 (time torch.compile of the reference only there: each
(op, layout, dtype) compiles once or twice), MOSX_BENCH_JSONL=path (append every result as one JSON
line as soon as it is measured, so a run cut short by a time limit keeps what it measured),
MOSX_BENCH_COMPILE_WARMUP_ONLY=1 (with -k compiled: compile and run each compiled case once,
untimed, so that a later run finds Inductor's on-disk caches warm).

torch.compile: Dynamo's recompile limit is raised (and, where torch has the switch, hitting it is
an error), so the compiled reference never silently falls back to eager after many shapes. The
compiled cases run after every fused / reference case (test_cuda_compiled below).
"""

import datetime
import functools
import json
import os
import platform
import statistics

import pytest
import torch
from conftest import QUICK

import mosx
from mosx import reference

HAVE_CUDA = torch.cuda.is_available() and mosx.cuda_built()
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and a CUDA build of mosx")

LAYOUTS = {
    "imagenet_1008": mosx.Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES),
    "10k_100x100": mosx.Groups.from_sizes([100] * 100),  # 10,000 classes, 10,100 logits
}
if QUICK:
    LAYOUTS = {"imagenet_1008": LAYOUTS["imagenet_1008"]}
BATCHES = [1, 4096] if QUICK else [1, 256, 4096, 65536, 1 << 20]
if os.environ.get("MOSX_BENCH_BATCHES"):
    BATCHES = [int(b) for b in os.environ["MOSX_BENCH_BATCHES"].split(",")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPS = ["score", "predict", "ce_fwd_bwd", "softmax"]
COMPILE = os.environ.get("MOSX_BENCH_COMPILE", "1") == "1"
SAMPLES = int(os.environ.get("MOSX_BENCH_SAMPLES", "5" if QUICK else "15"))
COMPILE_BATCHES = (
    [int(b) for b in os.environ["MOSX_BENCH_COMPILE_BATCHES"].split(",")]
    if os.environ.get("MOSX_BENCH_COMPILE_BATCHES")
    else None
)  # None: every batch
COMPILE_LAYOUTS = (
    os.environ["MOSX_BENCH_COMPILE_LAYOUTS"].split(",") if os.environ.get("MOSX_BENCH_COMPILE_LAYOUTS") else None
)
JSONL = os.environ.get("MOSX_BENCH_JSONL")
WARMUP_ONLY = os.environ.get("MOSX_BENCH_COMPILE_WARMUP_ONLY") == "1"

RESULTS = []  # one dict per (op, layout, dtype, batch), written out at the end of the module


# ------------------------------------------------------------------------------ timing
@functools.lru_cache(maxsize=1)
def _flush_buffer():
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def cuda_median_ms(fn, samples=SAMPLES, flush=True):
    """Median GPU time of one call of fn (ms), each call after an L2 flush."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        if flush:
            _flush_buffer().zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), samples=20, flush=False)  # noqa: F821 (runs before the del below)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


@pytest.fixture(scope="module", autouse=True)
def write_table(request):
    yield
    if RESULTS:
        path = write_markdown(RESULTS, request.config)
        print(f"\nbench_cuda: table written to {path}")


# ------------------------------------------------------------------------------ cases
def op_functions(op, x, groups, targets):
    """(fused, reference) callables for one op on fixed inputs."""
    if op == "score":
        return (lambda: mosx.group_softmax_score(x, groups), lambda: reference.group_softmax_score(x, groups))
    if op == "predict":
        return (lambda: mosx.group_predict(x, groups), lambda: reference.group_predict(x, groups))
    if op == "softmax":
        return (lambda: mosx.group_softmax(x, groups), lambda: reference.group_softmax(x, groups))
    xg = x.detach().requires_grad_()

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            fn(xg, targets, groups).backward()

        return run

    return fwd_bwd(mosx.group_cross_entropy), fwd_bwd(reference.group_cross_entropy)


def _raise_recompile_limits():
    """Every (op, layout, dtype, batch) is a new graph for Dynamo; past its recompile limit (8 by
    default) it would run the reference eagerly and the "compiled" time would be the eager one."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1024)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = 1 << 16
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 1 << 16
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


@functools.cache
def compiled_reference(op):
    _raise_recompile_limits()
    fn = {
        "score": reference.group_softmax_score,
        "predict": reference.group_predict,
        "softmax": reference.group_softmax,
        "ce_fwd_bwd": reference.group_cross_entropy,
    }[op]
    return torch.compile(fn)


def record(row):
    """Append one result to MOSX_BENCH_JSONL (if set) right away."""
    if JSONL:
        with open(JSONL, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def compiled_function(op, x, groups, targets):
    fn = compiled_reference(op)
    if op != "ce_fwd_bwd":
        return lambda: fn(x, groups)
    xg = x.detach().requires_grad_()

    def run():
        xg.grad = None
        fn(xg, targets, groups).backward()

    return run


def bytes_moved(op, n, groups, dtype):
    """Bytes the op cannot avoid moving: logits read (twice for forward + backward), [N, L]
    outputs written, and the small per-row / per-group outputs."""
    b, acc = torch.tensor([], dtype=dtype).element_size(), 4
    nl, k = n * groups.num_logits, groups.num_groups
    if op == "score":
        return nl * b + n * (acc + 8 + acc)
    if op == "predict":
        return nl * b + n * (8 + acc + 8)
    if op == "softmax":
        return 2 * nl * b
    # forward: logits, targets -> losses [N, K], lse [N, K]; backward: logits, grad [N, K], lse,
    # targets -> gradient [N, L]
    return 3 * nl * b + 2 * n * 8 + 4 * n * k * acc


def memory_needed(op, n, groups, dtype, impl):
    """Rough peak of extra GPU memory, in bytes (inputs included)."""
    logits = n * groups.num_logits * torch.tensor([], dtype=dtype).element_size()
    factor = {"score": 1.2, "predict": 1.2, "softmax": 2.2, "ce_fwd_bwd": 3.2}[op]
    if impl != "fused":
        factor += {"score": 2.5, "predict": 3.5, "softmax": 2.5, "ce_fwd_bwd": 4.0}[op]
    return int(logits * factor) + (512 << 20)


def free_memory():
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


# ------------------------------------------------------------------------------ the benchmark
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_op(benchmark, copy_bandwidth, op, batch, dtype, layout):
    groups, dt = LAYOUTS[layout], DTYPES[dtype]
    if memory_needed(op, batch, groups, dt, "fused") > free_memory():
        pytest.skip(f"not enough GPU memory for {op} at batch {batch} ({layout}, {dtype})")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(batch, groups.num_logits, dtype=dt, device="cuda")
    x.normal_(0.0, 4.0, generator=gen)  # in place: no float32 temporaries at 1M x 10k
    targets = torch.randint(0, groups.num_classes, (batch,), generator=gen, device="cuda")
    fused, ref = op_functions(op, x, groups, targets)

    row = {
        "op": op,
        "layout": layout,
        "dtype": dtype,
        "batch": batch,
        "num_logits": groups.num_logits,
        "bytes": bytes_moved(op, batch, groups, dt),
    }
    row["fused_ms"] = cuda_median_ms(fused)
    # the kernel path of the op (for ce_fwd_bwd, the backward's: it runs last)
    row["path"] = torch.ops.mosx._cuda_last_path()
    row["bandwidth"] = row["bytes"] / (row["fused_ms"] * 1e-3)
    row["fraction_of_copy"] = row["bandwidth"] / copy_bandwidth
    if memory_needed(op, batch, groups, dt, "reference") > free_memory():
        row["reference_ms"] = None  # not enough memory for the reference's intermediates
    else:
        try:
            row["reference_ms"] = cuda_median_ms(ref)
        except torch.OutOfMemoryError:
            row["reference_ms"] = None
        torch.cuda.empty_cache()

    # pytest-benchmark's record: one fused call plus a synchronize, wall clock.
    def fused_sync():
        fused()
        torch.cuda.synchronize()

    benchmark.group = f"cuda {op} {layout} {dtype}"
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "op"} | {"op": op})
    benchmark.pedantic(fused_sync, rounds=SAMPLES, warmup_rounds=1)
    row["copy_bandwidth"] = copy_bandwidth
    RESULTS.append(row)
    record(row)


def _compile_wanted(batch, layout):
    return (
        COMPILE
        and (COMPILE_BATCHES is None or batch in COMPILE_BATCHES)
        and (COMPILE_LAYOUTS is None or layout in COMPILE_LAYOUTS)
    )


# After every fused / reference case: compiling is what takes the time.
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_compiled(op, batch, dtype, layout):
    if not _compile_wanted(batch, layout):
        pytest.skip("torch.compile not timed for this case (MOSX_BENCH_COMPILE*)")
    groups, dt = LAYOUTS[layout], DTYPES[dtype]
    if memory_needed(op, batch, groups, dt, "compiled") > free_memory():
        pytest.skip(f"not enough GPU memory for the compiled reference at batch {batch}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(batch, groups.num_logits, dtype=dt, device="cuda")
    x.normal_(0.0, 4.0, generator=gen)
    targets = torch.randint(0, groups.num_classes, (batch,), generator=gen, device="cuda")
    if WARMUP_ONLY:  # fill Inductor's on-disk caches for a later timed run (tools/gpu_check.sh)
        compiled_function(op, x, groups, targets)()
        torch.cuda.synchronize()
        return
    try:
        ms = cuda_median_ms(compiled_function(op, x, groups, targets))
    except torch.OutOfMemoryError:
        ms = None
    torch.cuda.empty_cache()
    for r in RESULTS:
        if (r["op"], r["layout"], r["dtype"], r["batch"]) == (op, layout, dtype, batch):
            r["compiled_ms"] = ms
    record({"op": op, "layout": layout, "dtype": dtype, "batch": batch, "compiled_ms": ms})


# ------------------------------------------------------------------------------ report
def write_markdown(rows, config):
    props = torch.cuda.get_device_properties(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    gpu = props.name.replace(" ", "_").replace("/", "_")
    outdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"cuda_{gpu}_{now:%Y%m%d_%H%M%S}.md")
    copy_bw = rows[0]["copy_bandwidth"]

    def ms(v):
        return "n/a" if v is None else f"{v:.4f}"

    def ratio(v, f):
        return "n/a" if v is None else f"{v / f:.2f}x"

    lines = [
        "# mosx CUDA kernels: measured speed",
        "",
        f"- machine: {props.name} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB), host {platform.node() or '?'}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), mosx {mosx.__version__}, "
        f"python {platform.python_version()}",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- device copy bandwidth measured in this run: {copy_bw / 1e12:.3f} TB/s (read + write)",
        "- fraction = (bytes the op must move / median time) / copy bandwidth; ratios = time of the "
        "reference (or torch.compile of it) / time of the fused op; n/a = not run (memory or disabled).",
        "- each call is timed after an L2 flush; batch 1 and 256 measure latency, not bandwidth.",
        "",
        "| op | layout | dtype | batch | path | fused (ms) | GB/s | fraction of copy | reference (ms) | "
        "vs reference | compiled ref (ms) | vs compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (OPS.index(r["op"]), r["layout"], r["dtype"], r["batch"])):
        f = r["fused_ms"]
        lines.append(
            f"| {r['op']} | {r['layout']} | {r['dtype']} | {r['batch']} | {r.get('path', '?')} | {f:.4f} | "
            f"{r['bandwidth'] / 1e9:.0f} | {r['fraction_of_copy']:.2f} | {ms(r.get('reference_ms'))} | "
            f"{ratio(r.get('reference_ms'), f)} | {ms(r.get('compiled_ms'))} | {ratio(r.get('compiled_ms'), f)} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
