"""Shared test helpers (small factories for API objects), and the check that a test's tier has what it needs:
the tools named by its markers (tests/tiers.py), skipped locally or failed in CI when missing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.config import Settings
from tests import tiers


def model_body(name: str = "qwen", *, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
               uid: str | None = "uid-model") -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llamacpp.dev/v1beta1",
        "kind": "LlamaModel",
        "metadata": {"name": name, "namespace": "default", "generation": 1},
        "spec": spec or {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                                                     "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}}},
    }
    if uid:
        body["metadata"]["uid"] = uid
    if status is not None:
        body["status"] = status
    return body


def server_body(name: str = "chat", *, uid: str | None = "uid-server", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llamacpp.dev/v1beta1",
        "kind": "LlamaServer",
        "metadata": {"name": name, "namespace": "default", "generation": 1},
        "spec": {"modelRef": {"name": "qwen"}, **spec},
    }
    if uid:
        body["metadata"]["uid"] = uid
    return body


def resolved_model(**overrides: Any) -> LlamaModel:
    status = {"phase": "Ready", "cacheKey": "qwen2-5-0-5b-instruct-q4-k-m-0123456789ab",
              "files": [{"name": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}], **overrides.pop("status", {})}
    return LlamaModel.model_validate(model_body(status=status, **overrides))


def server(**spec: Any) -> LlamaServer:
    return LlamaServer.model_validate(server_body(**spec))


@pytest.fixture
def settings() -> Settings:
    return Settings()


def deep(obj: Any) -> Any:
    return copy.deepcopy(obj)


def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers.check(item)


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the real helm binary (tests/tiers.py; the test's tier needs `helm`)."""
    return tiers.require(tiers.HELM)
