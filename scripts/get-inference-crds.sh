#!/usr/bin/env bash
# Fetches the InferencePool CRD (inference.networking.k8s.io/v1) of the Gateway API Inference Extension from its Go
# module (the Go module proxy is reachable from CI; nothing else upstream is) and prints the path of the YAML.
# Cached outside the repo keyed by the module version, so a second call is instant. The integration test
# tests/integration/test_inference_pool.py installs it into the real API server.
set -euo pipefail

MODULE=sigs.k8s.io/gateway-api-inference-extension
VERSION=v1.6.0
CRD=config/crd/bases/inference.networking.k8s.io_inferencepools.yaml
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
DEST="$CACHE_ROOT/inference-extension-crds-$VERSION"
OUT="$DEST/inferencepools.yaml"
PYTHON="${PYTHON:-python3}"
# Absolute: the download below runs in a temporary directory, and make passes a relative .venv/bin/python.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac

if [ -s "$OUT" ]; then
  echo "$OUT"
  exit 0
fi
# --cached: the path only when fetched before (the tests ask this way: they never download).
[ "${1:-}" != --cached ] || { echo "the InferencePool CRD is not fetched yet: scripts/get-inference-crds.sh" \
  "fetches it from the Go module proxy" >&2; exit 3; }
command -v go >/dev/null 2>&1 || { echo "scripts/get-inference-crds.sh needs Go on PATH (the module proxy)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching $MODULE@$VERSION from the Go module proxy" >&2
# Outside any module: go mod download verifies the zip against the checksum database and prints where it is.
zip=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION" \
  | "$PYTHON" -c 'import json, sys; info = json.load(sys.stdin); print(info.get("Zip") or sys.exit(info.get("Error")))')
"$PYTHON" - "$zip" "$MODULE@$VERSION/$CRD" "$work/inferencepools.yaml" <<'PY'
import sys, zipfile

archive, member, out = sys.argv[1:]
with zipfile.ZipFile(archive) as zf, open(out, "wb") as fh:
    fh.write(zf.read(member))
PY
mkdir -p "$DEST.tmp.$$"
mv "$work/inferencepools.yaml" "$DEST.tmp.$$/inferencepools.yaml"
mkdir -p "$CACHE_ROOT"
# rename makes the cache entry appear only once it is complete (concurrent callers race safely)
mv -T "$DEST.tmp.$$" "$DEST" 2>/dev/null || rm -rf "$DEST.tmp.$$"
echo "$OUT"
