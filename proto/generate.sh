#!/usr/bin/env bash
# Generate the Python code of the tracefleet.v1 API into proto/python (committed).
#   proto/generate.sh          regenerate in place
#   proto/generate.sh --check  regenerate into a temporary directory and fail (exit 1) if the
#                              committed files differ (stale, missing or extra files)
# Uses grpc_tools.protoc from the venv (PYTHON overrides), so the output depends only on the
# pinned grpcio-tools version in tests/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
PROTO_DIR=$(pwd)
ROOT=$(cd .. && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=python
PKG=tracefleet/v1

mode=write
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
  *) echo "generate.sh: unknown argument '$1' (use --check or nothing)" >&2; exit 2 ;;
esac

if ! "$PY" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "generate.sh: grpc_tools not importable by $PY; run deploy/host/install-deps.sh" >&2
  exit 2
fi

generate() {  # $1 = output root
  local out=$1
  mkdir -p "$out/$PKG"
  # Sorted file list and a fixed include order keep the output byte-for-byte reproducible.
  local files
  mapfile -t files < <(cd "$PROTO_DIR" && LC_ALL=C ls "$PKG"/*.proto | LC_ALL=C sort)
  local wkt
  wkt=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
  (cd "$PROTO_DIR" && "$PY" -m grpc_tools.protoc -I. -I"$wkt" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${files[@]}")
}

generated_files() {  # $1 = directory holding tracefleet/v1; prints relative paths, sorted
  (cd "$1" && find "$PKG" -maxdepth 1 -type f \( -name '*_pb2.py' -o -name '*_pb2.pyi' \
    -o -name '*_pb2_grpc.py' \) | LC_ALL=C sort)
}

if [[ $mode == write ]]; then
  # Remove stale outputs first so a deleted .proto does not leave its module behind.
  while read -r f; do [[ -n $f ]] && rm -f "$OUT/$f"; done < <(generated_files "$OUT")
  generate "$OUT"
  touch "$OUT/$PKG/py.typed"
  echo "generate.sh: wrote $(generated_files "$OUT" | wc -l) files into proto/$OUT/$PKG" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
generate "$tmp"
drift=0
if ! diff -u <(generated_files "$OUT") <(generated_files "$tmp") >"$tmp/list.diff"; then
  drift=1
  echo "generate.sh --check: the set of generated files differs (- committed, + expected):" >&2
  grep -E '^[-+][^-+]' "$tmp/list.diff" >&2 || true
fi
while read -r f; do
  [[ -f $OUT/$f ]] || continue
  if ! diff -q "$OUT/$f" "$tmp/$f" >/dev/null; then
    drift=1
    echo "generate.sh --check: proto/$OUT/$f is out of date" >&2
  fi
done < <(generated_files "$tmp")
if [[ ! -f $OUT/$PKG/py.typed ]]; then
  drift=1
  echo "generate.sh --check: proto/$OUT/$PKG/py.typed is missing" >&2
fi
if ((drift)); then
  echo "generate.sh --check: generated code drifted from proto/$PKG/*.proto; run 'make proto' (proto/generate.sh) and commit the result" >&2
  exit 1
fi
echo "generate.sh --check: proto/$OUT/$PKG is up to date" >&2
