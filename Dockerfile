# syntax=docker/dockerfile:1
# One image for the operator and for the init container that downloads GGUF files (`llama-operator fetch`).
# The base is pinned to an exact Python patch release and Debian suite; bump both stages together.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

# --- build: install the package and its (pure-Python or wheel-only) dependencies into a self-contained venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# Metadata first, sources second: edits to the code do not invalidate the layer cache of the base venv.
COPY pyproject.toml README.md ./
COPY operator/ ./operator/
# --only-binary: every dependency ships wheels, so the build stage needs no compiler and cannot pull in one.
RUN /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: --no-binary=llama-operator . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# --- runtime: the venv and nothing else (no pip cache, no sources, no build tools).
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llama-operator" \
      org.opencontainers.image.description="Kubernetes operator for llama.cpp llama-server fleets, and its model downloader" \
      org.opencontainers.image.source="https://github.com/llama-operator/llama-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A numeric user (65532, the conventional "nonroot") lets Kubernetes verify runAsNonRoot without /etc/passwd lookups;
# the chart runs the root filesystem read-only, so nothing here needs to be writable.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8000 9443
ENTRYPOINT ["llama-operator"]
CMD ["--help"]
