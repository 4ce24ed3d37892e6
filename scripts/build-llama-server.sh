#!/usr/bin/env bash
# Builds the pinned llama-server (llama.cpp b11312) from the llama-cpp-python sdist that vendors
# that exact commit, with the RPC backend (GGML_RPC=ON: llama-server gains --rpc, and
# ggml-rpc-server is built beside it for the workers of docs/distributed.md), and caches both
# binaries outside the repo keyed by the commit and that option. Prints llama-server's path as the
# last line; a second call is instant.
set -euo pipefail

LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f
SDIST_VERSION=0.3.36
CACHE_ROOT="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
DEST="$CACHE_ROOT/llama-server-$LLAMA_CPP_COMMIT-rpc"
BIN="$DEST/llama-server"
PYTHON="${PYTHON:-python3}"

if [ -x "$BIN" ] && [ -x "$DEST/ggml-rpc-server" ]; then
  echo "$BIN"
  exit 0
fi
# --cached: the path only when built before (the tests ask this way: they never build).
[ "${1:-}" != --cached ] || { echo "llama-server is not built yet: \`make llama-server\` builds it (minutes)" >&2; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama-server $LLAMA_CPP_COMMIT (takes a few minutes) in $work" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$SDIST_VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_CURL=OFF -DGGML_RPC=ON >&2
cmake --build "$work/build" --target llama-server ggml-rpc-server -j "$(nproc)" >&2
mkdir -p "$DEST.tmp.$$"
cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$DEST.tmp.$$/"
"$DEST.tmp.$$/llama-server" --version >&2 || true
# rename makes the cache entry appear only once it is complete
mv -T "$DEST.tmp.$$" "$DEST" 2>/dev/null || rm -rf "$DEST.tmp.$$"
echo "$BIN"
