#!/usr/bin/env bash
# Lint and docs checks: ruff (lint + format), clang-format over the C++/CUDA sources, and the API
# reference built in strict mode. Runs every check, then exits non-zero if any failed.
#
#   tools/lint.sh          # check only (what CI runs)
#   tools/lint.sh --fix    # apply ruff's safe fixes, ruff format and clang-format in place, then check
#
# Needs: pip install -r requirements-docs.txt ruff==0.17.6 clang-format==23.1.5
# (the docs build reads the source statically: no torch or compiled extension needed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The versions the configuration was written against; other versions may format differently.
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5

FIX=0
case "${1:-}" in
  --fix) FIX=1 ;;
  "") ;;
  *) echo "usage: tools/lint.sh [--fix]" >&2; exit 2 ;;
esac

PY_PATHS=(mosx tests bench tools)
mapfile -t CPP_FILES < <(find csrc cpp_test tools/cuda_emu -type f \( -name '*.h' -o -name '*.hpp' -o -name '*.cpp' \
                           -o -name '*.cu' -o -name '*.cuh' \) | sort)

failed=()
run() {  # run NAME CMD...: run one check, remember it when it fails
  local name="$1"; shift
  echo "=== lint: $name"
  if "$@"; then echo "--- ok: $name"; else echo "--- FAILED: $name"; failed+=("$name"); fi
}
need() {  # need TOOL PINNED_VERSION: the tool is on PATH; warn when its version differs
  if ! command -v "$1" >/dev/null; then
    echo "lint: $1 not found (pip install -r requirements-docs.txt ruff==$RUFF_VERSION clang-format==$CLANG_FORMAT_VERSION)" >&2
    exit 2
  fi
  local v; v="$("$1" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1)"
  [ "$v" = "$2" ] || echo "lint: warning: $1 $v, the configuration is pinned to $2" >&2
}
need ruff "$RUFF_VERSION"
need clang-format "$CLANG_FORMAT_VERSION"
need mkdocs 1.6.1

if [ "$FIX" = 1 ]; then
  echo "=== lint: applying fixes"
  ruff check --fix "${PY_PATHS[@]}" || true
  ruff format "${PY_PATHS[@]}"
  clang-format -i --style=file "${CPP_FILES[@]}"
fi

run "ruff check" ruff check --output-format concise "${PY_PATHS[@]}"
# One line per file (`ruff format --diff` and `clang-format FILE | diff FILE -` show the changes).
run "ruff format --check" ruff format --check --output-format concise "${PY_PATHS[@]}"
clang_format_check() {
  local f bad=0
  for f in "${CPP_FILES[@]}"; do
    if ! clang-format --dry-run -Werror --style=file "$f" 2>/dev/null; then
      echo "$f: would be reformatted ($(clang-format --dry-run --style=file "$f" 2>&1 | grep -c 'clang-format-violations') places)"
      bad=1
    fi
  done
  [ "$bad" = 0 ] && echo "${#CPP_FILES[@]} files formatted"
  return "$bad"
}
run "clang-format" clang_format_check

# Every top-level name has a row in the API reference's table (read statically, without importing).
api_table() {
  python3 - <<'EOF'
import ast, re, sys
tree = ast.parse(open("mosx/__init__.py").read())
names = next(ast.literal_eval(n.value) for n in tree.body
             if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets))
page = open("docs/api/index.md").read()
missing = [n for n in names if not re.search(rf"^\| `mosx\.{re.escape(n)}` \|", page, re.M)]
if missing:
    print("docs/api/index.md lacks a row for mosx." + ", mosx.".join(missing), file=sys.stderr)
    sys.exit(1)
print(f"{len(names)} names of mosx.__all__ in docs/api/index.md")
EOF
}
run "API table covers mosx.__all__" api_table

# No --quiet: it hides the warnings, and strict mode then passes whatever they say.
SITE="$(mktemp -d /tmp/mosx-site.XXXXXX)"
trap 'rm -rf "$SITE"' EXIT
run "mkdocs build --strict" env NO_MKDOCS_2_WARNING=1 mkdocs build --strict -d "$SITE"

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'lint: %d check(s) failed:' "${#failed[@]}"; printf ' [%s]' "${failed[@]}"; echo
  exit 1
fi
echo "lint: all checks passed"
