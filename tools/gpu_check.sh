#!/usr/bin/env bash
# One-shot GPU check of mosx: build, CUDA tests on both kernel paths, compute-sanitizer, benchmark,
# summary. Run from anywhere on a machine with a GPU (no network needed):
#
#   tools/gpu_check.sh                 # everything under $OUT (default ./gpu-check-out)
#   tools/gpu_check.sh --rehearse      # (or GPU_CHECK_REHEARSE=1) no GPU: every step that does
#                                      # not need one, so the real run can fail only on GPU facts
#
# Steps, each with its own time limit (the whole script stays under 8 minutes):
#  1. build: MOSX_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=<all cores>
#     pip install --no-build-isolation --no-deps --no-index -e .   (against the installed torch;
#     falls back to setup.py build_ext --inplace if pip cannot do an editable install); then
#     checks that mosx imports from this checkout with mosx.cuda_built().
#  2. at the same time (one GPU, several processes):
#     - tests/test_cuda.py + the CUDA-parametrised tests of the other test files, on the fast
#       path and on MOSX_CUDA_KERNELS=chunked; no -x; a per-test alarm (tools/pytest_alarm.py,
#       MOSX_TEST_TIMEOUT) and a timeout per pytest run; JUnit XML + log per path;
#     - compute-sanitizer memcheck, racecheck, initcheck (tools/sanitize_cuda.sh) over a bounded
#       subset of test_cuda.py that runs every kernel and every tier (MOSX_TEST_SUBSET=sanitize);
#     - a warm-up that compiles the torch.compile baselines (Inductor's on-disk caches);
#  3. bench/bench_cuda.py alone on the GPU: batch 1, 4096, 65536, 1M; float32 and bfloat16;
#     ImageNet and 10k layouts; copy bandwidth in the same run; torch.compile of the reference at
#     batch 65536 on the ImageNet layout (recompile limit raised); results as JSON lines;
#  4. a summary: tests passed / failed per path, sanitizer verdicts, the bandwidth table
#     ($OUT/summary.txt). Exit status 0 only when the build, every test and every tool are clean.
#
# Env: OUT, PYTHON (default python3, else python), GPU_CHECK_BUILD_TIMEOUT (240),
# GPU_CHECK_TEST_TIMEOUT (200, per path), GPU_CHECK_SAN_TIMEOUT (200, per tool),
# GPU_CHECK_BENCH_TIMEOUT (170), MOSX_TEST_TIMEOUT (90, per test), GPU_CHECK_SKIP_BUILD=1 (use the
# mosx already importable).
set -uo pipefail

REHEARSE="${GPU_CHECK_REHEARSE:-0}"
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3 >/dev/null; then PYTHON=python3; else PYTHON=python; fi
fi
NPROC="$(nproc 2>/dev/null || echo 8)"
BUILD_TIMEOUT="${GPU_CHECK_BUILD_TIMEOUT:-240}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-200}"
SAN_TIMEOUT="${GPU_CHECK_SAN_TIMEOUT:-200}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-170}"
export MOSX_TEST_TIMEOUT="${MOSX_TEST_TIMEOUT:-90}"
export PYTHONPATH="$ROOT:$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
export MOSX_CUDA_PATHS_SEPARATE=1   # this script runs both kernel paths itself
# several processes share the cores in step 2
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( NPROC / 5 > 1 ? NPROC / 5 : 1 ))}"
START=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*" | tee -a "$OUT/gpu_check.log"; }
: >"$OUT/gpu_check.log"
say "repository $ROOT, output $OUT, python $(command -v "$PYTHON"), rehearse=$REHEARSE"
git -C "$ROOT" log -1 --format='commit %H %s' >"$OUT/commit.txt" 2>/dev/null || echo "not a git checkout" >"$OUT/commit.txt"
git -C "$ROOT" status --short >>"$OUT/commit.txt" 2>/dev/null || true
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } >"$OUT/gpu.txt"
"$PYTHON" - >>"$OUT/gpu.txt" 2>&1 <<'EOF'
import torch
print(f"torch {torch.__version__} CUDA {torch.version.cuda} available={torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}")
EOF
if [ "$REHEARSE" != 1 ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "FAILED: no GPU visible to torch (use --rehearse on a machine without one)"; exit 2; }
fi

# ------------------------------------------------------------------------------ 1. build
BUILD=ok
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  say "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ "$REHEARSE" = 1 ]; then
  # Never install into the rehearsal machine's environment: check the command's flags exist.
  say "build: rehearsal: pip install --no-build-isolation --no-deps --no-index -e . is not run"
  "$PYTHON" -m pip install --help >"$OUT/pip-help.txt" 2>&1 || say "build: WARNING: pip not usable"
  for flag in --no-build-isolation --no-deps --no-index --editable; do
    grep -q -- "$flag" "$OUT/pip-help.txt" || { say "build: pip lacks $flag"; BUILD=failed; }
  done
else
  say "build: MOSX_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC (timeout ${BUILD_TIMEOUT}s)"
  export MOSX_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$NPROC"
  if ! timeout "$BUILD_TIMEOUT" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
      >"$OUT/build.log" 2>&1; then
    say "build: pip editable install failed (tail of build.log below); trying setup.py build_ext --inplace"
    tail -n 15 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"
    left=$(( BUILD_TIMEOUT - ($(date +%s) - START) ))
    [ "$left" -lt 60 ] && left=60
    timeout "$left" "$PYTHON" setup.py build_ext --inplace >"$OUT/build-inplace.log" 2>&1 || BUILD=failed
  fi
  unset MOSX_CUDA
  grep -h '\[mosx setup\]' "$OUT"/build*.log 2>/dev/null | tee -a "$OUT/gpu_check.log"
fi
"$PYTHON" - "$ROOT" "$REHEARSE" >"$OUT/import.txt" 2>&1 <<'EOF'
import os, sys
root, rehearse = os.path.realpath(sys.argv[1]), sys.argv[2] == "1"
import torch, mosx
where = os.path.realpath(mosx.__file__)
print(f"mosx from {where}; cuda_built={mosx.cuda_built()}")
assert where.startswith(root + os.sep), f"imported mosx from {where}, not from {root}"
if not rehearse:
    assert mosx.cuda_built(), "mosx.cuda_built() is False after a MOSX_CUDA=1 build"
    print("CUDA kernel path by default:", torch.ops.mosx._cuda_kernels())
EOF
if [ $? -ne 0 ]; then BUILD=failed; fi
cat "$OUT/import.txt" | tee -a "$OUT/gpu_check.log"
say "build: $BUILD"
if [ "$BUILD" != ok ]; then
  say "FAILED: the build or the import failed; see $OUT/build*.log and $OUT/import.txt"
  exit 1
fi

# ------------------------------------------------------------------------------ 2. tests + sanitizers
OTHER_TESTS=""
for f in tests/test_*.py; do
  # test_cuda_emulated.py runs the kernels on the CPU (CI does that); no GPU time for it here
  case "$f" in tests/test_cuda.py|tests/test_cuda_emulated.py) ;; *) OTHER_TESTS="$OTHER_TESTS $f" ;; esac
done
run_tests() {  # path
  local path=$1 rc=0
  local env_path=""
  [ "$path" = chunked ] && env_path="MOSX_CUDA_KERNELS=chunked"
  # test_cuda.py whole, then the CUDA-parametrised tests of the other files
  # shellcheck disable=SC2086
  env $env_path timeout --kill-after=10 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -p pytest_alarm \
      -o junit_family=xunit2 --junitxml="$OUT/tests-$path-cuda.xml" tests/test_cuda.py \
      $REHEARSE_TEST_ARGS >"$OUT/tests-$path.log" 2>&1 || rc=$?
  # shellcheck disable=SC2086
  env $env_path timeout --kill-after=10 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -p pytest_alarm \
      -o junit_family=xunit2 --junitxml="$OUT/tests-$path-others.xml" $OTHER_TESTS -k "$OTHERS_K" \
      >>"$OUT/tests-$path.log" 2>&1 || { r=$?; [ $r -ne 5 ] && rc=$r; }  # 5: none selected
  echo "$rc" >"$OUT/tests-$path.rc"
}
REHEARSE_TEST_ARGS=""
OTHERS_K="cuda"
SAN_K="tier_and_chunk or block_tier_segments or different_warps or later_segments or packed_rows or softmax_backward_grad_and_out or empty_batch or identical_groups_tie_to_the_first_on_every_path or nan_and_inf_prediction or bad_offsets or several_rows_per_warp or custom_ignore_index or (match_cpu and (imagenet or over_2047 or wide or hundreds_small or many_medium))"
if [ "$REHEARSE" = 1 ]; then
  # the rehearsable tests of test_cuda.py run their code on the CPU
  export MOSX_TEST_CUDA_DEVICE=cpu
  OTHERS_K="cuda and not cuda_request_without_cuda"  # collection of every file, whatever selected
fi
say "tests: both kernel paths at once (timeout ${TEST_TIMEOUT}s each, ${MOSX_TEST_TIMEOUT}s per test)"
run_tests fast &
PID_FAST=$!
run_tests chunked &
PID_CHUNKED=$!
SAN_PIDS=""
for tool in memcheck racecheck initcheck; do
  if [ "$REHEARSE" = 1 ]; then
    # a stand-in that runs the command as the sanitizer would and reports no errors
    stub="$OUT/fake-compute-sanitizer"
    printf '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do case "$1" in --tool|--error-exitcode|--print-limit) shift 2;; *) shift;; esac; done\n"$@"; rc=$?\necho "========= ERROR SUMMARY: 0 errors (rehearsal stand-in)"\nexit $rc\n' >"$stub"
    chmod +x "$stub"
    SANITIZER="$stub" MOSX_TEST_SUBSET=sanitize TOOLS=$tool TESTS=tests/test_cuda.py KEXPR="$SAN_K" \
      TIMEOUT="$SAN_TIMEOUT" OUTDIR="$OUT" PYTHON="$PYTHON" tools/sanitize_cuda.sh >>"$OUT/sanitize.log" 2>&1 &
  else
    MOSX_TEST_SUBSET=sanitize TOOLS=$tool TESTS=tests/test_cuda.py KEXPR="$SAN_K" TIMEOUT="$SAN_TIMEOUT" \
      OUTDIR="$OUT" PYTHON="$PYTHON" tools/sanitize_cuda.sh >>"$OUT/sanitize.log" 2>&1 &
  fi
  SAN_PIDS="$SAN_PIDS $!"
done
PID_WARM=""
if [ "$REHEARSE" != 1 ]; then
  # Compile the torch.compile baselines now (CPU-bound), so the timed bench below finds Inductor's
  # on-disk caches warm instead of spending its time limit compiling.
  MOSX_BENCH_COMPILE_WARMUP_ONLY=1 MOSX_BENCH_BATCHES=65536 MOSX_BENCH_COMPILE_BATCHES=65536 \
    MOSX_BENCH_COMPILE_LAYOUTS=imagenet_1008 timeout --kill-after=10 "$SAN_TIMEOUT" "$PYTHON" -m pytest -q \
    -p no:cacheprovider bench/bench_cuda.py -k compiled >"$OUT/bench-compile-warmup.log" 2>&1 &
  PID_WARM=$!
fi
wait $PID_FAST $PID_CHUNKED
say "tests: done (fast rc=$(cat "$OUT/tests-fast.rc"), chunked rc=$(cat "$OUT/tests-chunked.rc"))"
# shellcheck disable=SC2086
wait $SAN_PIDS $PID_WARM
say "sanitizers: done ($(for t in memcheck racecheck initcheck; do printf '%s=%s ' $t "$(cat "$OUT/sanitize-$t.verdict" 2>/dev/null || echo missing)"; done))"

# ------------------------------------------------------------------------------ 3. benchmark
: >"$OUT/bench.jsonl"
if [ "$REHEARSE" = 1 ]; then
  say "bench: rehearsal: collection only, and a synthetic result line for the summary"
  timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only bench/bench_cuda.py >"$OUT/bench.log" 2>&1 \
    || say "bench: WARNING: collection failed (see bench.log)"
  echo '{"op": "score", "layout": "imagenet_1008", "dtype": "float32", "batch": 65536, "num_logits": 1008, "bytes": 1, "path": "register:32x32", "fused_ms": 1.0, "bandwidth": 1.0, "fraction_of_copy": 0.0, "reference_ms": 2.0, "copy_bandwidth": 1.0, "rehearsal": true}' >>"$OUT/bench.jsonl"
  echo '{"op": "score", "layout": "imagenet_1008", "dtype": "float32", "batch": 65536, "compiled_ms": 3.0, "rehearsal": true}' >>"$OUT/bench.jsonl"
else
  say "bench: bench/bench_cuda.py (timeout ${BENCH_TIMEOUT}s)"
  OMP_NUM_THREADS="$NPROC" MOSX_BENCH_BATCHES=1,4096,65536,1048576 MOSX_BENCH_SAMPLES=7 \
    MOSX_BENCH_COMPILE_BATCHES=65536 MOSX_BENCH_COMPILE_LAYOUTS=imagenet_1008 MOSX_BENCH_JSONL="$OUT/bench.jsonl" \
    timeout --kill-after=10 "$BENCH_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider bench/bench_cuda.py \
      --benchmark-json="$OUT/bench-pytest-benchmark.json" >"$OUT/bench.log" 2>&1
  echo "$?" >"$OUT/bench.rc"
  cp bench/results/cuda_*.md "$OUT/" 2>/dev/null || true
fi

# ------------------------------------------------------------------------------ 4. summary
"$PYTHON" - "$OUT" "$REHEARSE" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
import xml.etree.ElementTree as ET

out, rehearse = sys.argv[1], sys.argv[2] == "1"
ok = True
print("=" * 100)
print(f"mosx GPU check summary ({'REHEARSAL, no GPU' if rehearse else 'GPU run'}), output in {out}")
for line in open(os.path.join(out, "gpu.txt")).read().splitlines()[-2:]:
    print("  " + line)
print("  " + open(os.path.join(out, "commit.txt")).readline().strip())
print("-" * 100)
print("tests (passed / failed / errors / skipped):")
for path in ("fast", "chunked"):
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for f in sorted(glob.glob(os.path.join(out, f"tests-{path}-*.xml"))):
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            print(f"  {path}: unreadable {os.path.basename(f)}: {e}")
            ok = False
            continue
        for suite in root.iter("testsuite"):
            for k in tot:
                tot[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    rc = open(os.path.join(out, f"tests-{path}.rc")).read().strip() if os.path.exists(os.path.join(out, f"tests-{path}.rc")) else "?"
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    print(f"  {path:8s} {passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped (pytest rc {rc})")
    for name in failed[:25]:
        print(f"      FAILED {name}")
    if len(failed) > 25:
        print(f"      ... and {len(failed) - 25} more (tests-{path}.log)")
    if failed or passed == 0 or rc not in ("0", "5"):
        ok = False
        if rc in ("124", "137"):
            print(f"      the {path} run hit its time limit (GPU_CHECK_TEST_TIMEOUT)")
print("-" * 100)
print("compute-sanitizer (subset of test_cuda.py, MOSX_TEST_SUBSET=sanitize):")
for tool in ("memcheck", "racecheck", "initcheck"):
    p = os.path.join(out, f"sanitize-{tool}.verdict")
    v = open(p).read().strip() if os.path.exists(p) else "missing"
    print(f"  {tool:10s} {v}")
    ok = ok and v == "clean"
print("-" * 100)
rows, compiled = {}, {}
for line in open(os.path.join(out, "bench.jsonl")):
    if not line.strip():
        continue
    r = json.loads(line)
    key = (r["op"], r["layout"], r["dtype"], r["batch"])
    if "fused_ms" in r:
        rows[key] = r
    elif "compiled_ms" in r:
        compiled[key] = r["compiled_ms"]
if rows:
    copy = next(iter(rows.values()))["copy_bandwidth"]
    print(f"bandwidth (copy bandwidth measured in the same run: {copy / 1e12:.3f} TB/s, read + write)"
          + ("  [REHEARSAL: synthetic numbers]" if rehearse else ""))
    print(f"  {'op':11s} {'layout':14s} {'dtype':9s} {'batch':>8s} {'path':14s} {'fused ms':>9s} {'GB/s':>7s} {'of copy':>8s} {'vs ref':>7s} {'vs compiled':>11s}")
    def ratio(v, f):
        return "n/a" if v is None else f"{v / f:.2f}x"
    for key in sorted(rows):
        r = rows[key]
        f = r["fused_ms"]
        print(f"  {key[0]:11s} {key[1]:14s} {key[2]:9s} {key[3]:>8d} {r.get('path', '?'):14s} {f:9.4f} {r['bandwidth'] / 1e9:7.0f} "
              f"{r['fraction_of_copy']:8.2f} {ratio(r.get('reference_ms'), f):>7s} {ratio(compiled.get(key), f):>11s}")
else:
    print("bandwidth: no benchmark result (see bench.log)")
    ok = False
if not rehearse and os.path.exists(os.path.join(out, "bench.rc")):
    rc = open(os.path.join(out, "bench.rc")).read().strip()
    if rc != "0":
        print(f"  bench exit status {rc}" + (" (time limit: partial table)" if rc in ("124", "137") else ""))
print("=" * 100)
print("VERDICT:", "all clean" if ok else "NOT clean (details above)")
sys.exit(0 if ok else 1)
EOF
status=${PIPESTATUS[0]}
say "finished in $(( $(date +%s) - START )) s; summary in $OUT/summary.txt"
exit "$status"
