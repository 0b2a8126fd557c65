#!/usr/bin/env bash
# Proves that the CUDA sources of mosx compile and that the built extension loads (no GPU needed).
#
# Needs: a Python whose torch is a CUDA build (PYTHON, default `python`) and an nvcc of the same
# CUDA major version on PATH (or CUDA_HOME). Builds a copy of the project in a temp dir with
# MOSX_CUDA=1 (setup.py then fails instead of silently building CPU only), imports the built
# mosx from there and asserts mosx.cuda_built(). Exits non-zero, loudly, on any failure.
#
#   PYTHON=/work/venv/bin/python .ci/check_cuda_build.sh
# Env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), KEEP_BUILD=1 keeps the temp dir.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export MOSX_CUDA=1

fail() { echo "check_cuda_build: FAILED: $*" >&2; exit 1; }

"$PYTHON" - <<'EOF' || fail "torch is not a CUDA build (torch.version.cuda is None)"
import torch
print(f"check_cuda_build: torch {torch.__version__}, CUDA {torch.version.cuda}")
raise SystemExit(0 if torch.version.cuda else 1)
EOF
command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || fail "no nvcc on PATH and CUDA_HOME unset"
echo "check_cuda_build: nvcc: $(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mosx_cuda_build.XXXXXX")"
if [ "${KEEP_BUILD:-0}" != "1" ]; then trap 'rm -rf "$WORK"' EXIT; fi
echo "check_cuda_build: building in $WORK (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"

for f in setup.py pyproject.toml README.md; do
  [ -f "$ROOT/$f" ] && cp "$ROOT/$f" "$WORK/"
done
cp -r "$ROOT/csrc" "$ROOT/mosx" "$WORK/"
# Never pick up an extension built elsewhere (e.g. the editable CPU build of the checkout).
find "$WORK/mosx" \( -name '*.so' -o -name '*.pyd' -o -name '__pycache__' \) -prune -exec rm -rf {} +
ls "$WORK"/csrc/cuda/*.cu >/dev/null 2>&1 || fail "no CUDA sources in csrc/cuda/"

start=$(date +%s)
( cd "$WORK" && "$PYTHON" setup.py build_ext --inplace ) >"$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log" >&2
  fail "the CUDA build failed (log above)"
}
end=$(date +%s)
# setup.py prints its decision; show it.
grep '\[mosx setup\]' "$WORK/build.log" || true
echo "check_cuda_build: build took $((end - start)) s"

( cd "$WORK" && "$PYTHON" - "$WORK" <<'EOF' ) || fail "the built extension does not load or has no CUDA kernels"
import os, sys
work = os.path.realpath(sys.argv[1])
sys.path.insert(0, work)
import torch
import mosx
where = os.path.realpath(mosx.__file__)
assert where.startswith(work + os.sep), f"imported mosx from {where}, not from the build dir {work}"
assert mosx.cuda_built(), "mosx.cuda_built() is False: the CUDA kernels are not registered"
ops = ["group_softmax", "group_softmax_backward", "group_softmax_score",
       "group_softmax_score_backward", "group_predict", "group_cross_entropy",
       "group_cross_entropy_backward"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mosx::{o}", "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
path = torch.ops.mosx._cuda_kernels()
want = "chunked" if os.environ.get("MOSX_CUDA_KERNELS") == "chunked" else "fast"
assert path == want, f"torch.ops.mosx._cuda_kernels() is {path!r}, expected {want!r}"
print(f"check_cuda_build: OK: {where} loads, CUDA kernels registered for all {len(ops)} ops, "
      f"kernel path {path!r} (GPU present: {torch.cuda.is_available()})")
EOF
