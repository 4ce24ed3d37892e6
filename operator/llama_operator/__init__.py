"""llama-operator: run llama.cpp `llama-server` fleets for GGUF models on Kubernetes."""

__version__ = "0.1.0"
"""The release: the package's version (pyproject reads it), the operator image's tag and the chart's version and
appVersion (tests/unit/test_release.py checks the chart; scripts/release.sh refuses a release where they differ)."""
