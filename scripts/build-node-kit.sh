#!/usr/bin/env bash
# Builds the real-node kit from Go modules and committed source (no binary download is reachable from CI; the Go
# module proxy is): kubelet and kube-proxy from the same Kubernetes wrapper module as the control plane, containerd
# with its runc shim and ctr, CoreDNS, a distribution registry, kube-router as the NetworkPolicy enforcer, and a
# static pause program for the sandbox image; plus versions.json naming each part. The Debian tools the nodes use
# (runc, the CNI plugins, image tools, conntrack, iptables, ipset) are checked, not copied. The kit is cached
# outside the repo keyed by the versions and a hash of the inputs, so a second call is instant. Prints the
# directory as the last line; `--cached` prints it only when built before (exit 3 otherwise: the tests never build).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib/versions.sh
source "$here/scripts/lib/versions.sh"  # KUBERNETES_VERSION and its -ldflags, shared with the control plane
CONTAINERD_VERSION=v2.2.9
COREDNS_VERSION=v1.15.0
REGISTRY_VERSION=v3.1.2
# kube-router, not sigs.k8s.io/kube-network-policies (issue 19's choice): the Go proxy serves only its v0.7.0 and
# v0.8.0, both program an nftables `queue` expression, and these kernels have CONFIG_NFT_QUEUE unset (`nft add rule
# inet t c meta l4proto tcp queue num 100` -> "Error: Could not process rule: No such file or directory");
# kube-router's firewall uses iptables + ipset, which work. The Go proxy flags v2.1.0 for reported security flaws:
# it only enforces NetworkPolicies in the tests and the sandbox, on nodes that reach nothing off the machine.
KUBE_ROUTER_VERSION=v2.1.0
PAUSE_VERSION=1.0  # hack/node/pause/pause.c: ours, not upstream's pause, so a version of its own

mods="$here/hack/control-plane"
pause_src="$here/hack/node/pause/pause.c"
# Debian packages the nodes need, with the file that shows each is installed (bookworm paths).
DEBIAN_TOOLS="runc:/usr/sbin/runc containernetworking-plugins:/usr/lib/cni/bridge
containernetworking-plugins:/usr/lib/cni/host-local containernetworking-plugins:/usr/lib/cni/loopback
containernetworking-plugins:/usr/lib/cni/portmap umoci:/usr/bin/umoci skopeo:/usr/bin/skopeo
buildah:/usr/bin/buildah mmdebstrap:/usr/bin/mmdebstrap conntrack:/usr/sbin/conntrack iptables:/usr/sbin/iptables
ipset:/usr/sbin/ipset"
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
# Every pinned version and every input file: a change to any is a new cache entry (a comment edit here is not).
inputs_hash=$( { echo "$KUBERNETES_VERSION $CONTAINERD_VERSION $COREDNS_VERSION $REGISTRY_VERSION" \
  "$KUBE_ROUTER_VERSION $PAUSE_VERSION"; k8s_version_ldflags
  cat "$mods"/kubernetes/go.mod "$mods"/kubernetes/go.sum "$pause_src"; } | sha256sum | cut -c1-12)
DEST="$CACHE_ROOT/node-kit-$KUBERNETES_VERSION-containerd-$CONTAINERD_VERSION-$inputs_hash"
COMMANDS="containerd containerd-shim-runc-v2 ctr pause kubelet kube-proxy coredns registry kube-router"

host_tools_missing() {
  local entry packages=""
  for entry in $DEBIAN_TOOLS; do
    [ -x "${entry#*:}" ] || case " $packages " in *" ${entry%%:*} "*) ;; *) packages="$packages ${entry%%:*}" ;; esac
  done
  [ -z "$packages" ] && return 1
  echo "the node kit needs Debian packages that are missing: apt-get install -y --no-install-recommends$packages" >&2
}

complete() { for c in $COMMANDS; do [ -x "$1/$c" ] || return 1; done; [ -f "$1/versions.json" ]; }
if complete "$DEST"; then
  if host_tools_missing; then exit 2; fi
  echo "$DEST"
  exit 0
fi
[ "${1:-}" != --cached ] || { echo "the node kit is not built yet: \`make node-kit\` builds it" >&2; exit 3; }
if host_tools_missing; then exit 2; fi
command -v go >/dev/null 2>&1 || { echo "make node-kit needs Go (>= 1.25) on PATH" >&2; exit 2; }
command -v cc >/dev/null 2>&1 || { echo "make node-kit needs a C compiler (cc) for the pause program" >&2; exit 2; }

start=$(date +%s)
tmp="$DEST.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
echo "building the node kit (Kubernetes $KUBERNETES_VERSION, containerd $CONTAINERD_VERSION) into $DEST;" \
  "cold this takes 10-20 minutes on 2 cores" >&2
part_start=$start
built() { echo "  $1 built in $(( $(date +%s) - part_start )) s" >&2; part_start=$(date +%s); }
# `go install pkg@version` builds a module as released, with its own go.mod and go.sum (none of these modules
# has replace directives, which this form refuses).
install() { GOBIN="$tmp" go install -trimpath "$@"; }

# containerd and pause first: they are what a node needs before the kubelet.
for c in containerd containerd-shim-runc-v2 ctr; do
  install -tags "urfave_cli_no_docs no_btrfs" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/$c@$CONTAINERD_VERSION"
  built "$c"
done
cc -static -Os -s -Wall -Wextra -Werror -DPAUSE_VERSION="\"$PAUSE_VERSION\"" -o "$tmp/pause" "$pause_src"
built pause
for c in kubelet kube-proxy; do
  (cd "$mods/kubernetes" && go build -trimpath -ldflags "-s -w $(k8s_version_ldflags)" -o "$tmp/$c" \
    "k8s.io/kubernetes/cmd/$c")
  built "$c"
done
install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
built coredns
install -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
  "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
built registry
install -ldflags "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
  "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
built kube-router

cat >"$tmp/versions.json" <<JSON
{
  "kubernetes": "$KUBERNETES_VERSION",
  "parts": {
    "kubelet": "$KUBERNETES_VERSION",
    "kube-proxy": "$KUBERNETES_VERSION",
    "containerd": "$CONTAINERD_VERSION",
    "containerd-shim-runc-v2": "$CONTAINERD_VERSION",
    "ctr": "$CONTAINERD_VERSION",
    "coredns": "$COREDNS_VERSION",
    "registry": "$REGISTRY_VERSION",
    "kube-router": "$KUBE_ROUTER_VERSION",
    "pause": "$PAUSE_VERSION"
  },
  "debian_packages": [$(for e in $DEBIAN_TOOLS; do echo "${e%%:*}"; done | uniq | sed 's/.*/"&"/' | paste -sd, | sed 's/,/, /g')]
}
JSON
# Each part runs and says its version (a whole output is read: `| head -1` would end the build on SIGPIPE).
first_line() { local out; out=$("$@" 2>&1); out=${out//$tmp\//}; echo "  ${out%%$'\n'*}" >&2; }
for c in kubelet kube-proxy containerd ctr pause registry kube-router; do first_line "$tmp/$c" --version; done
first_line "$tmp/coredns" -version
shim=$("$tmp/containerd-shim-runc-v2" -v)
[[ $shim =~ Version:\ *([^[:space:]]+) ]] && echo "  containerd-shim-runc-v2 ${BASH_REMATCH[1]}" >&2
mkdir -p "$CACHE_ROOT"
# rename makes the cache entry appear only once it is complete
mv -T "$tmp" "$DEST" 2>/dev/null || rm -rf "$tmp"
echo "node kit built in $(( $(date +%s) - start )) s" >&2
echo "$DEST"
