#!/usr/bin/env bash
# Builds a real Kubernetes control plane from Go modules: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl, from the wrapper modules in hack/control-plane/ (no binary download is
# reachable from CI; the Go module proxy is). The binaries are cached outside the repo keyed by the
# versions and by a hash of the wrapper modules, so a second call is instant. Prints the directory
# holding them as the last line.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib/versions.sh
source "$here/scripts/lib/versions.sh"  # KUBERNETES_VERSION and its -ldflags, shared with the node kit
ETCD_VERSION=v3.6.13
mods="$here/hack/control-plane"
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
# The wrapper modules pin every dependency; a change to them is a new cache entry.
mods_hash=$(cat "$mods"/kubernetes/go.mod "$mods"/kubernetes/go.sum "$mods"/etcd/go.mod "$mods"/etcd/go.sum \
  | sha256sum | cut -c1-12)
DEST="$CACHE_ROOT/control-plane-kubernetes-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-$mods_hash"
COMMANDS="etcd kube-apiserver kube-controller-manager kube-scheduler kubectl"

complete() { for c in $COMMANDS; do [ -x "$1/$c" ] || return 1; done; }
if complete "$DEST"; then
  echo "$DEST"
  exit 0
fi
# --cached: the directory only when built before (the tests ask this way: they never build).
[ "${1:-}" != --cached ] || { echo "the control plane is not built yet: \`make control-plane\` builds it" >&2; exit 3; }
command -v go >/dev/null 2>&1 || { echo "make control-plane needs Go (>= 1.25) on PATH" >&2; exit 2; }

start=$(date +%s)
tmp="$DEST.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
version_flags=$(k8s_version_ldflags)
echo "building the control plane (Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION) into $DEST;" \
  "cold this takes 15-25 minutes on 2 cores" >&2
(cd "$mods/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
echo "  etcd built after $(( $(date +%s) - start )) s" >&2
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  (cd "$mods/kubernetes" && go build -trimpath -ldflags "-s -w $version_flags" -o "$tmp/$c" "k8s.io/kubernetes/cmd/$c")
  echo "  $c built after $(( $(date +%s) - start )) s" >&2
done
"$tmp/kube-apiserver" --version >&2
# The whole output is read: with pipefail, `| head -1` ended the build on SIGPIPE whenever etcd wrote its second
# line after head had gone (a cold CI run lost the control plane that way).
"$tmp/etcd" --version | sed -n 1p >&2
mkdir -p "$CACHE_ROOT"
# rename makes the cache entry appear only once it is complete
mv -T "$tmp" "$DEST" 2>/dev/null || rm -rf "$tmp"
echo "control plane built in $(( $(date +%s) - start )) s" >&2
echo "$DEST"
