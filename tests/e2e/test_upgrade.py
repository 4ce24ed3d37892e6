"""An upgrade from the previous release to this checkout and a rollback, under load, on two real nodes.

The sandbox (`--nodes 2 --gateway`) installs the previous release's chart (tests/e2e/previous_release.py: the
commit of CHANGELOG.md's last release, its operator image built from its own Dockerfile) with its operator image
from the nodes' registry. A 2-replica LlamaServer of a tiny model is Ready and routed by the gateway; the load of
test_no_request_lost (streamed chat completions through the gateway and straight to the Service, one connection
per request) runs while:
1. `helm upgrade` installs this checkout's chart (its CRDs are templates: helm upgrades them) and operator image,
   with the values of the install. The new operator takes over (its pods ready, its leader elected, the server
   handled: the times are printed); the model pods are replaced only if the Deployment's pod template changed, and
   the fields that changed are printed. No request fails, no stream is cut, the server stays Ready, the specs and
   the models' statuses are kept, the CRDs are this checkout's.
2. `helm rollback` to the install's revision: the previous operator takes over again, the objects are still
   readable with the same specs, the server still serves: again no request fails.
The numbers (requests sent/failed/cut, pods replaced and why, the takeover times) are printed (`pytest -s`) and
recorded in docs/upgrading.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.harness import SandboxProcess, serve_file
from tests.e2e.previous_release import PreviousRelease, previous_release
from tests.e2e.servers import apply_model, apply_server, pods, wait_server
from tests.e2e.test_gateway_load import GATEWAY, _wait_gateway
from tests.e2e.test_no_request_lost import SPEC, Load, _settled
from tests.e2e.upgrades import (
    HEAD_OPERATOR,
    RELEASE,
    SYSTEM,
    Phases,
    changed_fields,
    get_json,
    helm,
    helm_upgrade_to_head,
    operator_images,
    registry_ref,
    store_v1alpha1_again,
    takeover,
    upgrade_images,
)
from tests.tiers import REPO

pytestmark = pytest.mark.nodes

NS, NAME = "default", "steady"


@pytest.fixture(scope="module")
def release(sandbox_env: dict[str, str]) -> PreviousRelease:
    return previous_release(sandbox_env)


@pytest.fixture(scope="module")
def old(module_sandbox_factory: Any, sandbox_env: dict[str, str], release: PreviousRelease,
        tmp_path_factory: pytest.TempPathFactory) -> SandboxProcess:
    """The sandbox with the previous release installed (its chart, its operator image)."""
    images = upgrade_images(Path(sandbox_env["LLAMA_OPERATOR_IMAGES_DIR"]), release,
                            tmp_path_factory.mktemp("images"))
    return module_sandbox_factory(nodes="2", env={"LLAMA_OPERATOR_IMAGES_DIR": str(images)},
                                  args=("--gateway", "--chart", str(release.chart)))


@pytest.fixture(scope="module")
def urls(old: SandboxProcess, tiny_gguf: Path) -> Iterator[dict[str, str]]:
    """The server, Ready with 2 replicas under the previous release and routed by its gateway: the load's URLs."""
    assert operator_images(old) == {registry_ref(old, "operator")}
    host = json.loads((old.state_dir / "nodes.json").read_text())["hostAddress"]
    with serve_file(host, tiny_gguf) as url:
        apply_model(old, NS, NAME, url, version="v1alpha1")  # all 0.1.0 serves
        apply_server(old, NS, NAME, version="v1alpha1", **SPEC)
        wait_server(old, NS, NAME, lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2,
                    "Ready with 2 replicas", version="v1alpha1")
        _wait_gateway(old, NAME, 2)
        yield {"gateway": old.url(GATEWAY), "service": old.url(f"{NS}/{NAME}")}


@dataclass
class Snapshot:
    """What an upgrade must keep, or say it changed."""

    template: dict[str, Any]
    generation: int
    pods: dict[str, str]
    """uid -> name"""
    restarts: dict[str, int]
    """pod/container -> restartCount"""
    specs: dict[str, Any]
    server_conditions: set[tuple[str, str]]
    model_status: dict[str, Any]

    @classmethod
    def take(cls, sandbox: SandboxProcess) -> Snapshot:
        deployment = get_json(sandbox, NS, "deployment", NAME)
        live = [p for p in pods(sandbox, NS, NAME) if p.metadata.deletion_timestamp is None]
        objects = get_json(sandbox, NS, "llamaservers,llamamodels")["items"]  # readable: kubectl parses them
        server = next(o for o in objects if o["kind"] == "LlamaServer")
        model = next(o for o in objects if o["kind"] == "LlamaModel")
        return cls(
            template=deployment["spec"]["template"], generation=deployment["metadata"]["generation"],
            pods={p.metadata.uid: p.metadata.name for p in live},
            restarts={f"{p.metadata.name}/{c.name}": c.restart_count
                      for p in live for c in [*(p.status.container_statuses or []),
                                              *(p.status.init_container_statuses or [])]},
            specs={f"{o['kind']}/{o['metadata']['name']}": o["spec"] for o in objects},
            server_conditions={(c["type"], c["status"]) for c in server["status"].get("conditions") or []},
            model_status={k: model["status"].get(k) for k in ("phase", "sha256", "cacheKey", "gguf")})


def _served_crd_schemas(sandbox: SandboxProcess) -> dict[str, Any]:
    crds = get_json(sandbox, NS, "crd", "llamaservers.llamacpp.dev", "llamamodels.llamacpp.dev")["items"]
    return {c["metadata"]["name"]: [v["schema"] for v in c["spec"]["versions"]] for c in crds}


def _chart_crd_schemas(chart: Path) -> dict[str, Any]:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((chart / "files" / "crds").glob("*.yaml"))]
    return {c["metadata"]["name"]: [v["schema"] for v in c["spec"]["versions"]] for c in crds}


def _change(sandbox: SandboxProcess, urls: dict[str, str], what: str, act: Any, image: str) -> Snapshot:
    """Runs `act()` (a helm command) under load, waits for the operator of `image` to take over and the server's
    pods and the gateway to settle; prints and checks what the change did. Returns the snapshot before."""
    before = Snapshot.take(sandbox)
    with Load(urls, NAME) as load, Phases(sandbox, NS, NAME) as phases:
        load.wait_complete(1)
        started = time.monotonic()
        act()
        times = {f"helm {what}": time.monotonic() - started}
        times.update(takeover(sandbox, image, f"{NS}/{NAME}", started))
        sandbox.kubectl("rollout", "status", f"deployment/{RELEASE}-gateway", "-n", SYSTEM, "--timeout=180s",
                        timeout=200)
        deployment = get_json(sandbox, NS, "deployment", NAME)
        changed = changed_fields(before.template, deployment["spec"]["template"])
        if changed:  # the operator rolls the pods: wait until the rollout is done and only new ones serve
            sandbox.kubectl("rollout", "status", f"deployment/{NAME}", "-n", NS, "--timeout=240s", timeout=260)
            _settled(sandbox, NAME, 2, timeout=120)
            times["model pods replaced"] = time.monotonic() - started
        _wait_gateway(sandbox, NAME, 2)
        load.wait_complete(1, timeout=90)
    after = Snapshot.take(sandbox)
    replaced = sorted(name for uid, name in before.pods.items() if uid not in after.pods)
    load.report(f"helm {what} under load")
    print("  " + ", ".join(f"{step} after {seconds:.1f} s" for step, seconds in times.items()))
    print(f"  model pods replaced: {len(replaced)} of {len(before.pods)} {replaced}; the pod template "
          + (f"changed in {len(changed)} fields:" if changed else "did not change"))
    for line in changed:
        print(f"    {line}")
    print(f"  server (phase, readyReplicas) seen: {phases.seen}")
    for name, tally in load.tallies.items():
        assert tally.complete > 0 and tally.failed == 0 and tally.cut == 0, (name, tally, tally.errors)
    assert {phase for phase, _ in phases.seen} == {"Ready"}, phases.seen
    if not changed:
        assert replaced == [], replaced
        assert deployment["metadata"]["generation"] == before.generation
        assert {k: v for k, v in after.restarts.items() if k in before.restarts} == before.restarts
    assert after.specs == before.specs
    assert after.server_conditions == before.server_conditions
    assert after.model_status == before.model_status
    return before


def test_upgrade_to_this_checkout_keeps_serving(old: SandboxProcess, urls: dict[str, str],
                                                release: PreviousRelease) -> None:
    _change(old, urls, "upgrade", lambda: helm_upgrade_to_head(old), registry_ref(old, HEAD_OPERATOR))
    assert _served_crd_schemas(old) == _chart_crd_schemas(REPO / "charts" / "llama-operator")
    assert "deployed" in helm(old, "status", RELEASE)


def test_rollback_to_the_previous_release_keeps_serving(old: SandboxProcess, urls: dict[str, str],
                                                        release: PreviousRelease) -> None:
    def back() -> None:
        store_v1alpha1_again(old)  # this checkout stores v1beta1, which 0.1.0's CRDs do not know
        helm(old, "rollback", RELEASE, "1", "--force-conflicts")  # the storage patch owns .spec.versions

    _change(old, urls, "rollback", back, registry_ref(old, "operator"))
    assert _served_crd_schemas(old) == _chart_crd_schemas(release.chart)
    history = helm(old, "history", RELEASE, "-o", "json")
    assert [r["revision"] for r in json.loads(history)] == [1, 2, 3], history
