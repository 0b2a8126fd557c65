#!/usr/bin/env bash
# Runs compute-sanitizer (memcheck, then racecheck) over the CUDA tests. Needs a GPU, a CUDA
# build of mosx importable by PYTHON, and compute-sanitizer on PATH (or in $CUDA_HOME/bin).
#
#   tools/sanitize_cuda.sh                      # tests/test_cuda.py
#   TESTS="tests/test_ops.py -k cuda" tools/sanitize_cuda.sh
#   TOOLS="memcheck racecheck synccheck initcheck" tools/sanitize_cuda.sh
#
# The torch caching allocator is disabled so that every tensor is its own allocation and memcheck
# sees out-of-bounds accesses at tensor boundaries. The >2^31-element test is deselected (it
# allocates ~9 GiB and would take very long under the sanitizer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
TOOLS="${TOOLS:-memcheck racecheck}"
TESTS="${TESTS:-tests/test_cuda.py}"

fail() { echo "sanitize_cuda: FAILED: $*" >&2; exit 1; }

SAN="$(command -v compute-sanitizer || true)"
[ -z "$SAN" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN="$CUDA_HOME/bin/compute-sanitizer"
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
[ -n "$SAN" ] || fail "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
"$PYTHON" -c "import torch, mosx, sys; sys.exit(0 if torch.cuda.is_available() and mosx.cuda_built() else 1)" \
  || fail "needs a visible GPU and a CUDA build of mosx importable by $PYTHON"

cd "$ROOT"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in $TOOLS; do
  echo "sanitize_cuda: compute-sanitizer --tool $tool over: pytest $TESTS"
  # shellcheck disable=SC2086
  if "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      "$PYTHON" -m pytest $TESTS -x -q -p no:cacheprovider -k "not more_than_2_31"; then
    echo "sanitize_cuda: $tool clean"
  else
    echo "sanitize_cuda: $tool reported errors (or a test failed), exit status $?" >&2
    status=1
  fi
done
exit $status
