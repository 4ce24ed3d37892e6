"""The pinned llama.cpp build: its version, its images and (catalog.py) every flag of its llama-server.

The bottom of the house: it imports nothing of the project, so the API types (the chat template enum), the
settings (default images), the flag validator and the sandbox may all build on it.
"""

LLAMA_CPP_BUILD = "b11312"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_IMAGE_REPO = "ghcr.io/ggml-org/llama.cpp"
