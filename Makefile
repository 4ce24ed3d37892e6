# Developer entry points. `make test` works on a fresh machine: it builds the virtualenv and the pinned
# llama-server from scratch (both cached), then runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test venv lint crds llama-server unit integration runtime bench clean

test: venv
	@LLAMA_SERVER_BIN="$$(PYTHON=$(PY) scripts/build-llama-server.sh | tail -n 1)"; \
	  export LLAMA_SERVER_BIN; echo "llama-server: $$LLAMA_SERVER_BIN"; \
	  $(VENV)/bin/ruff check operator tests benchmarks && \
	  $(PY) -m pytest -q -ra $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Builds (once, cached outside the repo keyed by the llama.cpp commit) and prints the binary's path.
llama-server: venv
	@PYTHON=$(PY) scripts/build-llama-server.sh

lint: venv
	$(VENV)/bin/ruff check operator tests benchmarks

# Regenerates crds/ from the pydantic API models (a test fails when they drift).
crds: venv
	$(PY) -m llama_operator.cli crds --out-dir crds

unit: venv
	$(PY) -m pytest -q tests/unit

integration: venv
	$(PY) -m pytest -q tests/integration

bench: venv
	$(PY) benchmarks/reconcile.py

clean:
	rm -rf $(VENV) .pytest_cache
