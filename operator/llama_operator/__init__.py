"""llama-operator: run llama.cpp `llama-server` fleets for GGUF models on Kubernetes."""

__version__ = "0.1.0"
