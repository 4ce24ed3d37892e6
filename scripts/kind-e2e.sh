#!/usr/bin/env bash
# The kind workflow behind `make kind-up`, `make kind-deploy`, `make kind-e2e` and `make kind-down`:
#   up      create the kind cluster from kind-config.yaml (no-op if it exists)
#   deploy  build the operator image, load it into the cluster, `helm upgrade --install` the chart
#   e2e     up + deploy, then apply examples/tiny-cpu.yaml, wait for the LlamaServer to be Ready and call its
#           OpenAI-compatible endpoint from inside the cluster
#   down    delete the cluster
# Needs Docker, kind and kubectl; without them it stops at once with a message saying what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step="${1:?usage: scripts/kind-e2e.sh up|deploy|e2e|down}"
CLUSTER="${KIND_CLUSTER:-llama-operator}"
OPERATOR_NS="${OPERATOR_NS:-llama-system}"
E2E_NS="${E2E_NS:-llama-e2e}"
RELEASE="${RELEASE:-llama-operator}"
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/llama-operator/llama-operator}"
IMAGE_TAG="${IMAGE_TAG:-dev}"
EXAMPLE="${EXAMPLE:-examples/tiny-cpu.yaml}"
READY_TIMEOUT="${READY_TIMEOUT:-20m}"
CURL_IMAGE="${CURL_IMAGE:-docker.io/curlimages/curl:8.11.1}"

die() { echo "kind-e2e: $*" >&2; exit 2; }

require() {
  command -v docker >/dev/null 2>&1 || die "make kind-$step needs Docker: the docker command is not installed."
  docker info >/dev/null 2>&1 || die "make kind-$step needs Docker: no Docker engine answers 'docker info' (start dockerd, or run this on a machine that has one)."
  command -v kind >/dev/null 2>&1 || die "make kind-$step needs kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)."
  command -v kubectl >/dev/null 2>&1 || die "make kind-$step needs kubectl."
}

helm_bin() {
  if [ -n "${HELM:-}" ]; then echo "$HELM"; else PYTHON="${PYTHON:-python3}" scripts/get-helm.sh; fi
}

up() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "kind cluster $CLUSTER exists"
  else
    args=(create cluster --name "$CLUSTER" --config kind-config.yaml --wait 120s)
    [ -n "${KIND_NODE_IMAGE:-}" ] && args+=(--image "$KIND_NODE_IMAGE")
    kind "${args[@]}"
  fi
  kubectl config use-context "kind-$CLUSTER" >/dev/null
}

deploy() {
  local helm
  helm="$(helm_bin)"
  docker build -t "$IMAGE_REPO:$IMAGE_TAG" .
  kind load docker-image --name "$CLUSTER" "$IMAGE_REPO:$IMAGE_TAG"
  # The operator's namespace enforces the restricted Pod Security Standard: the chart's pod must pass it for real.
  kubectl create namespace "$OPERATOR_NS" --dry-run=client -o yaml | kubectl apply -f -
  kubectl label namespace "$OPERATOR_NS" --overwrite pod-security.kubernetes.io/enforce=restricted
  # pullPolicy Never: the image was loaded into the nodes above and exists in no registry.
  "$helm" upgrade --install "$RELEASE" charts/llama-operator --namespace "$OPERATOR_NS" \
    --set image.repository="$IMAGE_REPO" --set image.tag="$IMAGE_TAG" --set image.pullPolicy=Never \
    --wait --timeout 5m
  kubectl -n "$OPERATOR_NS" rollout status "deployment/$RELEASE" --timeout 3m
}

e2e() {
  [ -f "$EXAMPLE" ] || die "$EXAMPLE is missing"
  up
  deploy
  kubectl create namespace "$E2E_NS" --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$E2E_NS" apply -f "$EXAMPLE"
  if ! kubectl -n "$E2E_NS" wait lserver --all --for=jsonpath='{.status.phase}'=Ready --timeout "$READY_TIMEOUT"; then
    kubectl -n "$E2E_NS" get llama,deploy,pods -o wide || true
    kubectl -n "$E2E_NS" describe lserver || true
    kubectl -n "$OPERATOR_NS" logs "deployment/$RELEASE" --tail 200 || true
    die "the LlamaServer did not become Ready within $READY_TIMEOUT"
  fi
  local endpoint model
  endpoint="$(kubectl -n "$E2E_NS" get lserver -o jsonpath='{.items[0].status.endpoint}')"
  model="$(kubectl -n "$E2E_NS" get lserver -o jsonpath='{.items[0].status.modelName}')"
  [ -n "$endpoint" ] || die "the LlamaServer is Ready but has no status.endpoint"
  echo "calling $endpoint (model $model) from inside the cluster"
  kubectl -n "$E2E_NS" run e2e-curl --rm -i --restart=Never --image "$CURL_IMAGE" --command -- sh -c "
    set -e
    curl -sSf --max-time 30 '$endpoint/models'
    echo
    curl -sSf --max-time 120 '$endpoint/chat/completions' -H 'Content-Type: application/json' \
      -d '{\"model\": \"$model\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}]}'
    echo"
  echo "kind e2e passed"
}

down() { kind delete cluster --name "$CLUSTER"; }

case "$step" in
  up) require; up ;;
  deploy) require; up; deploy ;;
  e2e) require; e2e ;;
  down) require; down ;;
  *) die "unknown step $step (up, deploy, e2e, down)" ;;
esac
