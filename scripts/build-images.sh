#!/usr/bin/env bash
# Builds every image a real-node cluster runs, on this machine, with no Docker daemon and no registry (only
# Debian's archive and PyPI are reached): a Debian base (mmdebstrap), the operator from the repo's own Dockerfile
# on that base (buildah), llama-server with upstream's layout from the pinned build and its libraries (and the
# ggml-rpc-server built beside it, the workers of a distributed LlamaServer), an in-cluster OpenAI client, and the
# node kit's pause and CoreDNS programs (hack/images/*/Containerfile). Each image is saved as an OCI archive and
# cached outside the repo keyed by a hash of its inputs: the slow base by its package list alone, the operator (new
# with every commit) on top of it in about a minute. The output directory holds the archives and images.json
# ({name: {"archive": file, "ref": "repo/path:tag"}}, refs without a registry host: the node harness pushes them to
# a registry on loopback). Prints that directory as the last line; `--cached` prints it only when built before
# (exit 3 otherwise: the tests never build); `--plan` prints each image's ref and cache entry, building nothing.
#
# Inputs: LLAMA_SERVER_BIN (else scripts/build-llama-server.sh --cached; ggml-rpc-server is taken from its
# directory), LLAMA_OPERATOR_NODE_KIT_DIR (else scripts/build-node-kit.sh --cached). Needs root (mmdebstrap,
# buildah's chroot isolation), buildah, mmdebstrap, skopeo. See docs/images.md.
set -euo pipefail

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
# Debian's suites move (point releases, security updates) and no snapshot archive is reachable from CI, so the
# base is keyed by this date, not by what the mirror serves today: bump it to take Debian's newer packages.
BASE_SERIAL=2026-12-03

here="$(cd "$(dirname "$0")/.." && pwd)"
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
PYTHON="${PYTHON:-python3}"
cached=false
[ "${1:-}" != --cached ] || cached=true

not_built() { echo "the images are not built yet: \`make images\` builds them (after make llama-server node-kit)" >&2
  exit 3; }
# A missing input: --cached cannot have built anything without it either.
missing() { $cached && not_built; echo "$*" >&2; exit 2; }
sha() { sha256sum | cut -c1-12; }

# --- inputs ------------------------------------------------------------------------------------------------------
llama_bin="${LLAMA_SERVER_BIN:-$("$here/scripts/build-llama-server.sh" --cached 2>/dev/null | tail -n 1 || true)}"
[ -n "$llama_bin" ] && [ -x "$llama_bin" ] || missing "make images needs the llama-server binary:" \
  "\`make llama-server\` builds it, or set LLAMA_SERVER_BIN (now: '${LLAMA_SERVER_BIN:-unset}')"
rpc_bin="$(dirname "$llama_bin")/ggml-rpc-server"
[ -x "$rpc_bin" ] || missing "make images needs ggml-rpc-server beside llama-server ($rpc_bin):" \
  "\`make llama-server\` builds both (a build from before the RPC backend has llama-server alone)"
kit="${LLAMA_OPERATOR_NODE_KIT_DIR:-}"
if [ -z "$kit" ] && [ -x "$here/scripts/build-node-kit.sh" ]; then
  kit=$("$here/scripts/build-node-kit.sh" --cached 2>/dev/null | tail -n 1 || true)
fi
[ -n "$kit" ] && [ -x "$kit/pause" ] && [ -x "$kit/coredns" ] && [ -f "$kit/versions.json" ] || missing \
  "make images needs the node kit (pause, coredns, versions.json): \`make node-kit\` builds it, or set" \
  "LLAMA_OPERATOR_NODE_KIT_DIR (now: '${kit:-unset}')"
# Versions live in the kit's versions.json only; the chart's tags in the chart only; openai's range in pyproject.
read -r pause_version coredns_version < <("$PYTHON" -c 'import json, sys
parts = json.load(open(sys.argv[1]))["parts"]
print(parts["pause"], parts["coredns"])' "$kit/versions.json") || missing "cannot read $kit/versions.json"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^" ]*\)"\{0,1\} *$/\1/p' "$here/charts/llama-operator/Chart.yaml")
llama_image=$(awk '/^llamaServerImages:/ {in_block = 1; next} in_block && /^[^ #]/ {in_block = 0}
  in_block && $1 == "cpu:" {print $2; exit}' "$here/charts/llama-operator/values.yaml")
openai_requirement=$(grep -o '"openai[^"]*"' "$here/pyproject.toml" | sed -n 1p | tr -d '"')
[ -n "$app_version" ] && [ -n "$llama_image" ] && [ -n "$openai_requirement" ] || missing \
  "cannot read appVersion (Chart.yaml), llamaServerImages.cpu (values.yaml) or openai (pyproject.toml)"
# The chart's reference without its registry host (the first component when it names a host).
strip_host() { case "${1%%/*}" in *.*|*:*|localhost) echo "${1#*/}" ;; *) echo "$1" ;; esac; }
declare -A REF=(
  [base]="llama-operator/base:$DEBIAN_SUITE"
  [operator]="llama-operator/llama-operator:$app_version"
  [llama-server]="$(strip_host "$llama_image")"
  [client]="llama-operator/client:$app_version"
  [pause]="llama-operator/pause:$pause_version"
  [coredns]="coredns/coredns:$coredns_version"
)
NAMES="base operator llama-server client pause coredns"

# --- the builders (their own text is part of their cache key: `declare -f`) ----------------------------------------
# buildah with a private storage (vfs: no overlay mounts left behind), temp dir and containers.conf that live for
# one run. The conf picks the CNI backend with its config in the run's dir: netavark (the default) makes
# /etc/containers/networks and /run/containers/networks on the host even for --network host; CNI makes nothing.
bah() { CONTAINERS_CONF="$work/containers.conf" TMPDIR="$work/tmp" buildah --root "$work/storage" \
  --runroot "$work/run" --storage-driver vfs "$@"; }
push() { bah push --quiet "localhost/$1" "oci-archive:$2:$1"; }
# A TLS-inspecting proxy's CA is in the host's trust store, not in the image's: the build steps that reach PyPI
# see the host's bundle through a read-only bind mount, which no layer keeps.
ca_bundle="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
ca_mount=()
[ ! -f "$ca_bundle" ] || ca_mount=(--volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
bud() { bah bud --isolation chroot --network host --pull=never --layers=false "${ca_mount[@]}" "$@"; }

build_base() {
  local c
  # minbase + the packages, no recommends; merged /usr without the usrmerge package (it drags perl in); no man
  # pages, docs (but copyrights) or translations, as Debian's own slim images; no device nodes (runtimes make /dev).
  SOURCE_DATE_EPOCH=$(date -d "$BASE_SERIAL" +%s) mmdebstrap --variant=minbase --include="$BASE_PACKAGES" \
    --aptopt='APT::Install-Recommends "false"' --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --skip=output/dev \
    "$DEBIAN_SUITE" "$work/rootfs.tar" "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main"
  c=$(bah from scratch)
  bah add --quiet "$c" "$work/rootfs.tar" /
  rm -f "$work/rootfs.tar"
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --created-by "mmdebstrap --variant=minbase $DEBIAN_SUITE $BASE_PACKAGES ($BASE_SERIAL)" \
    --label org.opencontainers.image.title=llama-operator-base \
    --label "org.opencontainers.image.description=Debian $DEBIAN_SUITE minbase with Debian's python3" "$c"
  bah commit --quiet --rm "$c" "localhost/${REF[base]}" >/dev/null
  push "${REF[base]}" "$1"
}

base_loaded=false
load_base() {
  $base_loaded && return 0
  bah pull --quiet "oci-archive:$CACHE_ROOT/image-base-${KEY[base]}/image.oci.tar" >"$work/base.id"
  bah tag "$(cat "$work/base.id")" "localhost/${REF[base]}"
  base_loaded=true
}

# Runs a command in a fresh container of an image (as the image's user): a smoke test before the archive is kept.
# Its first line of output is shown with the build time.
smoke() {
  local c
  c=$(bah from --pull=never "localhost/$1")
  shift
  bah run --isolation chroot --network host "$c" -- "$@" >"$work/smoke" 2>&1 || { cat "$work/smoke"; return 1; }
  echo "smoke: $* -> $(head -n 1 "$work/smoke" | cut -c1-60)"
  bah rm "$c" >/dev/null
}

build_operator() {
  load_base
  # The repo's Dockerfile as it is, its pip install reaching PyPI; only the base differs (docs/images.md).
  bud --build-arg PYTHON_IMAGE="localhost/${REF[base]}" -t "localhost/${REF[operator]}" -f "$here/Dockerfile" \
    "$here"
  smoke "${REF[operator]}" llama-operator --help
  push "${REF[operator]}" "$1"
}

# hack/images/<name>/Containerfile with a context holding just the file it copies.
containerfile() {
  local name=$1 file=$2 out=$3
  shift 3
  mkdir -p "$work/context-$name"
  cp "$file" "$work/context-$name/"
  bud "$@" -t "localhost/${REF[$name]}" -f "$here/hack/images/$name/Containerfile" "$work/context-$name"
  push "${REF[$name]}" "$out"
}

# llama-server and ggml-rpc-server (an RPC worker of a distributed LlamaServer: docs/images.md) on an empty image
# with the shared libraries they link (ldd), at the paths ldd resolves them to: 20 MB unpacked, where the Debian
# base would add 130 MB and still lack libgomp.
llama_libs() { { ldd "$llama_bin"; ldd "$rpc_bin"; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' \
  | LC_ALL=C sort -u; }
build_llama_server() {
  local root="$work/context-llama-server/rootfs" lib
  mkdir -p "$root/app"
  cp "$llama_bin" "$root/app/llama-server"
  cp "$rpc_bin" "$root/app/ggml-rpc-server"
  for lib in $(llama_libs); do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
  bud -t "localhost/${REF[llama-server]}" -f "$here/hack/images/llama-server/Containerfile" \
    "$work/context-llama-server"
  smoke "${REF[llama-server]}" /app/llama-server --version
  # --help exits 0 (so does an unknown option: the run shows that the worker loads, not that its flags parse)
  smoke "${REF[llama-server]}" /app/ggml-rpc-server --help
  push "${REF[llama-server]}" "$1"
}

build_client() {
  load_base
  bud --build-arg BASE="localhost/${REF[base]}" --build-arg OPENAI_REQUIREMENT="$openai_requirement" \
    -t "localhost/${REF[client]}" -f "$here/hack/images/client/Containerfile" "$here/hack/images/client"
  smoke "${REF[client]}" python -c 'import openai; print("openai", openai.__version__)'
  push "${REF[client]}" "$1"
}

# pause and coredns go on an empty image: a dynamically linked build would find nothing to load there.
static() { ! ldd "$1" 2>&1 | grep -q '=>' || { echo "$1 is dynamically linked: a scratch image holds nothing else"
  return 1; }; }
build_pause() { static "$kit/pause"; containerfile pause "$kit/pause" "$1"; }
build_coredns() { static "$kit/coredns"; containerfile coredns "$kit/coredns" "$1"; }

# --- cache keys: every input of an image, and the text of the functions that build it ----------------------------
# The files under the given repo paths, with their hashes (what a COPY would copy: no caches, no egg-info).
files() { (cd "$here" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' \
  | LC_ALL=C sort | xargs -d '\n' sha256sum); }
common=$(declare -f bah push bud smoke load_base containerfile static | sha)
declare -A KEY
KEY[base]=$( { declare -f build_base; echo "$DEBIAN_SUITE $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR $BASE_PACKAGES"
  echo "$BASE_SERIAL ${REF[base]}"; } | sha)
# What the Dockerfile copies (.dockerignore: pyproject.toml, README.md, operator/ without caches and egg-info).
KEY[operator]=$( { echo "${KEY[base]} $common ${REF[operator]}"; declare -f build_operator
  files Dockerfile .dockerignore pyproject.toml README.md operator; } | sha)
KEY[llama-server]=$( { echo "$common ${REF[llama-server]}"; declare -f build_llama_server llama_libs
  sha256sum "$llama_bin" "$rpc_bin" $(llama_libs) | cut -c1-64; files hack/images/llama-server; } | sha)
KEY[client]=$( { echo "${KEY[base]} $common ${REF[client]} $openai_requirement"; declare -f build_client
  files hack/images/client; } | sha)
KEY[pause]=$( { echo "$common ${REF[pause]}"; declare -f build_pause; sha256sum <"$kit/pause"
  files hack/images/pause; } | sha)
KEY[coredns]=$( { echo "$common ${REF[coredns]}"; declare -f build_coredns; sha256sum <"$kit/coredns"
  files hack/images/coredns; } | sha)
DEST="$CACHE_ROOT/images-$app_version-$(for n in $NAMES; do echo "$n ${KEY[$n]} ${REF[$n]}"; done | sha)"

# --plan: what a build would make (name, ref, cache entry; then the output directory), building nothing.
if [ "${1:-}" = --plan ]; then
  for n in $NAMES; do printf '%s\t%s\t%s\n' "$n" "${REF[$n]}" "$CACHE_ROOT/image-$n-${KEY[$n]}"; done
  echo "$DEST"
  exit 0
fi
if [ -f "$DEST/images.json" ]; then
  echo "$DEST"
  exit 0
fi
$cached && not_built
[ "$(id -u)" = 0 ] || { echo "make images runs as root (mmdebstrap, buildah's chroot isolation)" >&2; exit 2; }
for tool in buildah mmdebstrap skopeo; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make images needs $tool: apt-get install -y $tool" >&2; exit 2; }
done

# --- build what the cache lacks, then the output directory ---------------------------------------------------------
start=$(date +%s)
mkdir -p "$CACHE_ROOT"
work=$(mktemp -d "$CACHE_ROOT/.images-work.XXXXXX")
mkdir "$work/tmp" "$work/cni"  # no CNI plugin runs: every step has --network host
printf '[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["%s/cni"]\nnetwork_config_dir = "%s/networks"\n' \
  "$work" "$work" >"$work/containers.conf"
cleanup() { bah rm --all >/dev/null 2>&1 || true; rm -rf "$work" "$CACHE_ROOT"/image*-*.tmp.$$; }
trap cleanup EXIT
echo "building the images into $DEST (cold: about 3 minutes on 2 cores)" >&2
for name in $NAMES; do
  part="$CACHE_ROOT/image-$name-${KEY[$name]}"
  [ ! -f "$part/image.oci.tar" ] || continue
  t0=$(date +%s)
  mkdir -p "$part.tmp.$$"
  # The builder stops at its first failing step (its log says which): set -e in a subshell that is not itself
  # tested by || or if (there bash ignores set -e, inside functions too).
  set +e
  ( set -e; "build_${name//-/_}" "$part.tmp.$$/image.oci.tar" ) >"$work/$name.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    tail -n 25 "$work/$name.log" >&2
    echo "building the $name image failed (exit $rc; its log's end is above)" >&2
    exit 1
  fi
  # rename makes the cache entry appear only once it is complete
  mv -T "$part.tmp.$$" "$part" 2>/dev/null || rm -rf "$part.tmp.$$"
  echo "  $name built in $(( $(date +%s) - t0 )) s  $(sed -n 's/^smoke: //p' "$work/$name.log" | paste -sd ';' \
    | sed 's/;/; /g')" >&2
done

# Every archive must load, with the config the chart relies on.
tmp="$DEST.tmp.$$"
mkdir -p "$tmp"
for name in $NAMES; do
  ln "$CACHE_ROOT/image-$name-${KEY[$name]}/image.oci.tar" "$tmp/$name.oci.tar" 2>/dev/null \
    || cp "$CACHE_ROOT/image-$name-${KEY[$name]}/image.oci.tar" "$tmp/$name.oci.tar"
  skopeo inspect --config "oci-archive:$tmp/$name.oci.tar" >"$work/$name.config.json"
done
pairs=()
for name in $NAMES; do pairs+=("$name=${REF[$name]}"); done
"$PYTHON" - "$work" "$tmp" "${pairs[@]}" <<'PY' || exit 1
import json, os, sys

work, out, *pairs = sys.argv[1:]
# What each image must say about itself (the chart runs them as non-root, by their entrypoints).
expect = {"operator": ("65532:65532", ["llama-operator"]), "llama-server": ("65532:65532", ["/app/llama-server"]),
          "client": ("65532:65532", None), "pause": ("65535:65535", ["/pause"]),
          "coredns": ("65532:65532", ["/coredns"])}
images = {}
for pair in pairs:
    name, ref = pair.split("=", 1)
    config = json.load(open(os.path.join(work, name + ".config.json"))).get("config", {})
    got = (config.get("User") or "", config.get("Entrypoint"))
    user, entrypoint = expect.get(name, got)
    if got[0] != user or (entrypoint is not None and got[1] != entrypoint):
        sys.exit(f"{name}: user {got[0]!r}, entrypoint {got[1]} (expected {user!r}, {entrypoint})")
    archive = name + ".oci.tar"
    images[name] = {"archive": archive, "ref": ref}
    size = os.path.getsize(os.path.join(out, archive)) / 2**20
    print(f"  {name:13} {ref:42} {size:6.1f} MiB  user {got[0] or 'root'}  entrypoint {got[1]}", file=sys.stderr)
with open(os.path.join(out, "images.json"), "w") as f:
    json.dump(images, f, indent=2)
    f.write("\n")
PY
mv -T "$tmp" "$DEST" 2>/dev/null || rm -rf "$tmp"
# Every commit makes a new operator entry (80 MiB): the three newest of each image and of the output stay (a
# branch switch stays warm), older ones go. The output's archives are hard links, so pruning a part breaks none.
prune() { find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -name "$1-*" ! -name '*.tmp.*' -printf '%T@ %p\n' \
  | sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r -d '\n' rm -rf; }
for name in $NAMES; do prune "image-$name"; done
prune images
echo "images built in $(( $(date +%s) - start )) s" >&2
echo "$DEST"
