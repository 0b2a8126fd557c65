#!/usr/bin/env bash
# Runs compute-sanitizer tools (default: memcheck, then racecheck) over CUDA tests. Needs a GPU, a
# CUDA build of mosx importable by PYTHON, and compute-sanitizer on PATH (or in $CUDA_HOME/bin or
# /usr/local/cuda/bin).
#
#   tools/sanitize_cuda.sh                                  # tests/test_cuda.py
#   TESTS="tests/test_ops.py" KEXPR="cuda" tools/sanitize_cuda.sh
#   TOOLS="memcheck racecheck synccheck initcheck" TIMEOUT=120 OUTDIR=out tools/sanitize_cuda.sh
#
# Every test of the selection runs (no -x): one failure does not hide the others. KEXPR (a pytest
# -k expression) is combined with the script's own deselection of the >2^31-element test (it
# allocates ~9 GiB and would take very long under the sanitizer): -k "(KEXPR) and not more_than_2_31".
# Each tool runs under `timeout TIMEOUT` (seconds, default 600). With OUTDIR, each tool's output
# goes to OUTDIR/sanitize-<tool>.log and its verdict (clean / errors / tests-failed / timeout) to
# OUTDIR/sanitize-<tool>.verdict. SANITIZER overrides the compute-sanitizer binary (the rehearsal
# of tools/gpu_check.sh uses a stand-in). Exit status: 0 when every tool is clean.
#
# The torch caching allocator is disabled so that every tensor is its own allocation and memcheck
# sees out-of-bounds accesses at tensor boundaries.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
TOOLS="${TOOLS:-memcheck racecheck}"
TESTS="${TESTS:-tests/test_cuda.py}"
KEXPR="${KEXPR:-}"
TIMEOUT="${TIMEOUT:-600}"
OUTDIR="${OUTDIR:-}"

fail() { echo "sanitize_cuda: FAILED: $*" >&2; exit 2; }

SAN="${SANITIZER:-$(command -v compute-sanitizer || true)}"
[ -z "$SAN" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN="$CUDA_HOME/bin/compute-sanitizer"
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
[ -n "$SAN" ] || fail "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
if [ -z "${SANITIZER:-}" ]; then
  "$PYTHON" -c "import torch, mosx, sys; sys.exit(0 if torch.cuda.is_available() and mosx.cuda_built() else 1)" \
    || fail "needs a visible GPU and a CUDA build of mosx importable by $PYTHON"
fi

if [ -n "$KEXPR" ]; then K="($KEXPR) and not more_than_2_31"; else K="not more_than_2_31"; fi
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"

cd "$ROOT"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in $TOOLS; do
  log=/dev/stdout
  [ -n "$OUTDIR" ] && log="$OUTDIR/sanitize-$tool.log"
  echo "sanitize_cuda: compute-sanitizer --tool $tool (timeout ${TIMEOUT}s) over: pytest $TESTS -k \"$K\""
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$TIMEOUT" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      "$PYTHON" -m pytest $TESTS -q -p no:cacheprovider -k "$K" >"$log" 2>&1
  rc=$?
  case $rc in
    0) verdict=clean ;;
    86) verdict=errors ;;
    124|137) verdict=timeout ;;
    *) verdict="tests-failed(rc=$rc)" ;;
  esac
  # a sanitizer error inside a test that also failed still counts as errors
  if [ "$verdict" != clean ] && [ -n "$OUTDIR" ] && grep -qE "ERROR SUMMARY: [1-9]" "$log"; then verdict=errors; fi
  [ -n "$OUTDIR" ] && echo "$verdict" >"$OUTDIR/sanitize-$tool.verdict"
  echo "sanitize_cuda: $tool: $verdict"
  [ "$verdict" = clean ] || status=1
done
exit $status
