"""The pinned llama.cpp build: its version, its images, (catalog.py) every flag of its llama-server and (ggml.py)
its tensor types, block sizes and limits.

The bottom of the house: it imports nothing of the project, so the API types (the chat template enum), the
settings (default images), the flag validator, the sandbox, the GGUF reader and the memory estimate may all
build on it.
"""

LLAMA_CPP_BUILD = "b11312"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_IMAGE_REPO = "ghcr.io/ggml-org/llama.cpp"
