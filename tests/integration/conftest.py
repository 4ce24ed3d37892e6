"""The integration tier (marker `integration`; needs the control plane and helm, tests/tiers.py) and its
harness: a real control plane (etcd, kube-apiserver, kube-controller-manager), the operator
running in-process with the chart's RBAC, one namespace per test.

Fixtures:
- `control_plane` (session) -> AuditedControlPlane (tests/controlplane.py: an audit log, restarts): built by
  `make control-plane` (found through $LLAMA_OPERATOR_CONTROL_PLANE_DIR, PATH or the build's cache), started
  once, CRDs from crds/ created through the API server (a schema the API server refuses fails the suite) before
  the controllers start, torn down at the end.
- `apiserver` -> ClusterApi (tests/cluster.py): the admin's client, bound to a fresh namespace
  (`apiserver.namespace`) that is deleted after the test.
- `operator_identity(watch_namespaces=None)` -> kubeconfig path of a ServiceAccount bound to exactly the
  RBAC objects `helm template` renders for the chart (cluster mode, or namespaced mode for the given
  namespaces).
- `kubeconfig` -> that kubeconfig for cluster mode, exported as KUBECONFIG for the test, so kopf's login and
  the operator's `load_api_client()` find it: the operator has the chart's permissions and nothing more.
- `run_operator(*targets, namespace=None, args=(), settings=None)` -> a context manager, sync or async,
  running `kopf run --standalone --verbose` on module names or file paths in a KopfRunner thread; with
  `namespace`, in namespaced mode with the chart's Role for that namespace.
- `kubectl(*args)` -> the control plane's own kubectl as the admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner

from llama_operator.controlplane import ControlPlane, find_binaries
from tests.cluster import ClusterApi, apply_objects, kubectl
from tests.controlplane import AuditedControlPlane
from tests.helm import helm_template
from tests.tiers import CONTROL_PLANE, mark_tier, require

REPO = pathlib.Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "llama-system"
RELEASE = "llama"
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, pathlib.Path(__file__).parent, "integration")


def _repo_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted((REPO / "crds").glob("*.yaml"))]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedControlPlane]:
    binaries = find_binaries(require(CONTROL_PLANE))  # the root check skipped or failed the test if missing
    # The CRDs go in through the API server: a schema it refuses fails the whole suite.
    cluster = AuditedControlPlane(tmp_path_factory.mktemp("control-plane"), binaries, controllers=True,
                                  crds=_repo_crds())
    with cluster:
        yield cluster


def _namespace_for(node_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"{slug}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def apiserver(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[ClusterApi]:
    api = ClusterApi(control_plane, _namespace_for(request.node.name))
    api.create("v1", "namespaces", None, {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": api.namespace}})
    try:
        yield api
    finally:
        # The test's own objects go first, so no operator of a later test sees them in a terminating namespace.
        for plural in ("llamaservers", "llamamodels"):
            for obj in api.list("llamacpp.dev/v1beta1", plural, api.namespace):
                api.delete("llamacpp.dev/v1beta1", plural, api.namespace, obj["metadata"]["name"])
        api.delete("v1", "namespaces", None, api.namespace)
        api.close()


class OperatorIdentities:
    """Kubeconfigs of ServiceAccounts with exactly the chart's RBAC, one per watch mode, made once."""

    def __init__(self, cluster: ControlPlane, helm: str, directory: pathlib.Path) -> None:
        self.cluster = cluster
        self.helm = helm
        self.directory = directory
        self._made: dict[tuple[str, ...], pathlib.Path] = {}
        self.admin = ClusterApi(cluster, OPERATOR_NAMESPACE)
        if self.admin.read("v1", "namespaces", None, OPERATOR_NAMESPACE) is None:
            self.admin.create("v1", "namespaces", None, {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": OPERATOR_NAMESPACE}})

    def __call__(self, watch_namespaces: list[str] | None = None) -> pathlib.Path:
        key = tuple(watch_namespaces or ())
        if key not in self._made:
            # Each mode is its own release, so its ServiceAccount holds only that mode's grants.
            release = RELEASE if not key else f"{RELEASE}-ns-{uuid.uuid4().hex[:5]}"
            objects = helm_template(self.helm, release, OPERATOR_NAMESPACE,
                                    {"watchNamespaces": list(key), "webhook": {"enabled": False}})
            rbac = [obj for obj in objects if obj["kind"] in RBAC_KINDS]
            (account,) = [obj for obj in rbac if obj["kind"] == "ServiceAccount"]
            apply_objects(self.admin, rbac)
            name = account["metadata"]["name"]
            token = self.admin.request(
                "POST", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{name}/token",
                body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                      "spec": {"expirationSeconds": 24 * 3600}})["status"]["token"]
            path = self.directory / f"{release}.kubeconfig"
            self._made[key] = self.cluster.kubeconfig_for_token(
                path, token, user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{name}")
        return self._made[key]


@pytest.fixture(scope="session")
def operator_identity(control_plane: ControlPlane, helm: str, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[OperatorIdentities]:
    identities = OperatorIdentities(control_plane, helm, tmp_path_factory.mktemp("identities"))
    yield identities
    identities.admin.close()


def _use_kubeconfig(path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The kubernetes client reads KUBECONFIG once, at import; point its default at this file too.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    # Keep kopf (and the kubernetes client's in-cluster detection) away from any real cluster.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture(autouse=True)
def operator_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """What every operator a test runs shares: no metrics port to collide on, no periodic resync in a test's
    lifetime (what the tests show must follow from events), no egress guard (the fake hubs listen on 127.0.0.1,
    docs/security.md#egress). Tests set their source endpoints themselves."""
    monkeypatch.setenv("LLAMA_OPERATOR_METRICS_PORT", "0")
    monkeypatch.setenv("LLAMA_OPERATOR_RESYNC_SECONDS", "3600")
    monkeypatch.setenv("LLAMA_OPERATOR_SOURCE_EGRESS_GUARD", "false")


@pytest.fixture
def kubeconfig(operator_identity: OperatorIdentities, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    path = operator_identity()
    _use_kubeconfig(path, monkeypatch)
    return path


def _registering_modules() -> list[str]:
    """The imported operator modules that register kopf handlers when imported (a `@kopf.` decorator)."""
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name.startswith("llama_operator.") and path.endswith(".py"):
            with contextlib.suppress(OSError):
                if "@kopf." in pathlib.Path(path).read_text():
                    found.append(name)
    return found


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
                # sys.modules and register nothing into this run's fresh registry. So would the modules it
                # imports that register handlers too (reconcile/indexes.py): without its indexes, a second run
                # in one pytest process would read nothing from the watches.
                for name in [str(target), *_registering_modules()]:
                    sys.modules.pop(name, None)
                    parent, _, child = name.rpartition(".")  # `from .reconcile import indexes` reads the package
                    with contextlib.suppress(AttributeError, KeyError):
                        delattr(sys.modules[parent], child)
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
    def __init__(self, identities: OperatorIdentities, monkeypatch: pytest.MonkeyPatch) -> None:
        self.identities = identities
        self.monkeypatch = monkeypatch

    def __call__(self, *targets: str | pathlib.Path, namespace: str | None = None, args: tuple[str, ...] = (),
                 settings: kopf.OperatorSettings | None = None, timeout: float = 30) -> OperatorRun:
        if namespace:
            # Namespaced mode, as the chart installs it: a Role in the watched namespace, nothing cluster-wide.
            _use_kubeconfig(self.identities([namespace]), self.monkeypatch)
            self.monkeypatch.setenv("LLAMA_OPERATOR_NAMESPACES", namespace)
        return OperatorRun(targets, namespace=namespace, args=args, settings=settings, timeout=timeout)


@pytest.fixture
def run_operator(kubeconfig: pathlib.Path, operator_identity: OperatorIdentities,
                 monkeypatch: pytest.MonkeyPatch) -> OperatorRunnerFactory:
    return OperatorRunnerFactory(operator_identity, monkeypatch)


@pytest.fixture
def kubectl_admin(control_plane: ControlPlane, apiserver: ClusterApi) -> Callable[..., Any]:
    """`kubectl_admin("get", "llama")`: the control plane's kubectl as the admin, in the test's namespace."""
    def run(*args: str, input: str | None = None, check: bool = False) -> Any:
        return kubectl(control_plane, "--namespace", apiserver.namespace, *args, input=input, check=check)
    return run

