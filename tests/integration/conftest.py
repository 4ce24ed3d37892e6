"""Integration-test harness: the API emulator, a kubeconfig pointing at it, and a kopf operator runner.

Fixtures:
- `apiserver` -> EmulatorThread: a fresh emulator per test on 127.0.0.1 (random port) serving the
  built-in resources and the CRDs in crds/*.yaml. Direct access for arranging and asserting:
  `apiserver.read/list/create/patch/delete(api_version, plural, namespace, [name, ...])`,
  `apiserver.wait_for(predicate)`, and `apiserver.emulator` (the kmock object: `.objects`, `.requests`,
  reactions for fault injection).
- `kubeconfig` -> pathlib.Path: a kubeconfig for the emulator, exported as KUBECONFIG for this test, so
  kopf's login and `kubernetes.config.load_kube_config()` find it.
- `k8s_api` -> kubernetes.client.ApiClient configured from that kubeconfig (not the global default).
- `run_operator(*targets, namespace=None, args=(), settings=None)` -> a context manager, sync or async,
  running `kopf run --standalone --verbose` on module names or file paths in a KopfRunner thread.
  `async with` enters and leaves it through asyncio.to_thread, so the test's loop never blocks on it
  and kopf never runs inside the pytest loop.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner

from llama_operator.emulator import EmulatorThread, write_kubeconfig

REPO = pathlib.Path(__file__).resolve().parents[2]


def _repo_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted((REPO / "crds").glob("*.yaml"))]


@pytest.fixture
def apiserver() -> Iterator[EmulatorThread]:
    with EmulatorThread(crds=_repo_crds()) as server:
        yield server


@pytest.fixture
def kubeconfig(apiserver: EmulatorThread, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
               ) -> pathlib.Path:
    path = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The kubernetes client reads KUBECONFIG once, at import; point its default at this file too.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    # Keep kopf (and the kubernetes client's in-cluster detection) away from any real cluster.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@pytest.fixture
def k8s_api(kubeconfig: pathlib.Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


class OperatorRun:
    """One `kopf run` in a KopfRunner thread; usable with `with` and with `async with`."""

    def __init__(self, targets: tuple[str | pathlib.Path, ...], *, namespace: str | None,
                 args: tuple[str, ...], settings: kopf.OperatorSettings | None, timeout: float) -> None:
        cli = ["run", "--standalone", "--verbose"]
        cli += ["--namespace", namespace] if namespace else ["--all-namespaces"]
        for target in targets:
            if isinstance(target, pathlib.Path) or str(target).endswith(".py"):
                cli.append(str(target))
            else:
                # kopf imports `-m` modules; a module imported by an earlier run would be served from
                # sys.modules and register nothing into this run's fresh registry.
                sys.modules.pop(str(target), None)
                cli += ["-m", str(target)]
        cli += list(args)
        # A fresh registry per run: handlers of a previous test (or a previous run) never leak in. A bare
        # registry lacks kopf's implicit login, so the kubeconfig login is registered explicitly.
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(kopf.login_via_client)
        self.runner = KopfRunner(cli, timeout=timeout, registry=registry, settings=settings)

    def __enter__(self) -> KopfRunner:
        return self.runner.__enter__()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: types.TracebackType | None) -> None:
        self.runner.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> KopfRunner:
        return await asyncio.to_thread(self.runner.__enter__)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: types.TracebackType | None
                        ) -> None:
        await asyncio.to_thread(self.runner.__exit__, exc_type, exc, tb)


class OperatorRunnerFactory:
    def __call__(self, *targets: str | pathlib.Path, namespace: str | None = None, args: tuple[str, ...] = (),
                 settings: kopf.OperatorSettings | None = None, timeout: float = 30) -> OperatorRun:
        return OperatorRun(targets, namespace=namespace, args=args, settings=settings, timeout=timeout)


@pytest.fixture
def run_operator(kubeconfig: pathlib.Path) -> OperatorRunnerFactory:
    return OperatorRunnerFactory()
