"""What the upgrade test (tests/e2e/test_upgrade.py) needs besides the sandbox: the registry's images for an
install of the previous release, helm upgrade and rollback against the sandbox, the operator's takeover, and what
changed in a pod template.

The sandbox pushes every image of its images directory and installs its chart with the image named `operator`:
`upgrade_images` writes an images.json whose `operator` is the previous release's image (tag = its version) and
whose `head-operator` is this checkout's (tag `<version>-head`: the two must not share a tag in one registry), the
other images being this checkout's. Archives are named by absolute path (the registry joins them to the
directory, which keeps an absolute path as it is).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from llama_operator import __version__
from tests.e2e.harness import SandboxProcess, wait_for
from tests.e2e.previous_release import PreviousRelease
from tests.tiers import REPO

SYSTEM = "llama-system"
RELEASE = "llama-operator"
HEAD_OPERATOR = "head-operator"
OPERATOR_PODS = "app.kubernetes.io/name=llama-operator"
LEASE = f"{RELEASE}-leader"


def upgrade_images(head_images: Path, release: PreviousRelease, into: Path) -> Path:
    """An images directory for the sandbox: see the module docstring."""
    table = json.loads((head_images / "images.json").read_text())
    images = {name: {"archive": str(head_images / image["archive"]), "ref": image["ref"]}
              for name, image in table.items()}
    repository = table["operator"]["ref"].rpartition(":")[0]
    images[HEAD_OPERATOR] = {**images["operator"], "ref": f"{repository}:{__version__}-head"}
    images["operator"] = {"archive": str(release.operator_archive), "ref": f"{repository}:{release.version}"}
    into.mkdir(parents=True, exist_ok=True)
    (into / "images.json").write_text(json.dumps(images, indent=2) + "\n")
    return into


def registry_ref(sandbox: SandboxProcess, name: str) -> str:
    """The registry reference of image `name` (`host:port/repo:tag`), as the sandbox pushed it."""
    return str(json.loads((sandbox.state_dir / "nodes.json").read_text())["images"][name])


def helm(sandbox: SandboxProcess, *args: str, timeout: float = 300) -> str:
    """helm against the sandbox's cluster (its own cache and config dirs, as the sandbox's install)."""
    home = sandbox.state_dir / "helm"
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data"), "KUBECACHEDIR": str(home / "kube-cache")}
    done = subprocess.run([sandbox.env["HELM"], *args, "--namespace", SYSTEM, "--kubeconfig",
                           str(sandbox.kubeconfig)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def helm_upgrade_to_head(sandbox: SandboxProcess) -> str:
    """`helm upgrade` to this checkout's chart and operator image, with the values the install used."""
    repository, _, tag = registry_ref(sandbox, HEAD_OPERATOR).rpartition(":")
    return helm(sandbox, "upgrade", RELEASE, str(REPO / "charts" / "llama-operator"), "-f",
                str(sandbox.state_dir / "values.yaml"), "--set", f"image.repository={repository}",
                "--set-string", f"image.tag={tag}")


def get_json(sandbox: SandboxProcess, namespace: str, *what: str) -> Any:
    return json.loads(sandbox.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def operator_images(sandbox: SandboxProcess) -> set[str]:
    """The images of the operator pods that exist (the chart's Deployment)."""
    pods = get_json(sandbox, SYSTEM, "pods", "-l", OPERATOR_PODS)["items"]
    return {c["image"] for p in pods for c in p["spec"]["containers"] if c["name"] == "operator"}


def leader(sandbox: SandboxProcess) -> tuple[str, str]:
    """(the pod holding the operator's Lease, its operator image); ("", "") when none holds it."""
    holder = get_json(sandbox, SYSTEM, "lease", LEASE)["spec"].get("holderIdentity") or ""
    pod = holder.rpartition("_")[0]
    if not pod:
        return "", ""
    found = sandbox.kubectl("get", "pod", pod, "-n", SYSTEM, "-o", "json", check=False)
    if found.returncode != 0:
        return pod, ""
    containers = json.loads(found.stdout)["spec"]["containers"]
    return pod, next(c["image"] for c in containers if c["name"] == "operator")


def takeover(sandbox: SandboxProcess, image: str, server: str, started: float, timeout: float = 240
             ) -> dict[str, float]:
    """Seconds from `started` until: every operator pod runs `image` and is ready; a pod of `image` holds the
    Lease; that leader has run its LlamaServer handler (kopf's resume: its log says "Handler 'server_changed'
    succeeded.", naming no object: the sandbox must hold one LlamaServer, `server`)."""
    times: dict[str, float] = {}
    sandbox.kubectl("rollout", "status", f"deployment/{RELEASE}", "-n", SYSTEM, f"--timeout={timeout}s",
                    timeout=timeout + 20)
    wait_for(lambda: operator_images(sandbox) == {image}, timeout=60, message=f"only operator pods of {image}")
    times["operator pods ready"] = time.monotonic() - started
    pod = wait_for(lambda: (held := leader(sandbox))[1] == image and held[0], timeout=60,
                   message=f"a pod of {image} leading")
    times["leader elected"] = time.monotonic() - started

    def handled() -> bool:
        log = sandbox.kubectl("logs", pod, "-n", SYSTEM, "-c", "operator", check=False).stdout
        return "Handler 'server_changed' succeeded." in log
    try:
        wait_for(handled, timeout=60, message=f"the new leader reconciling {server}")
    except TimeoutError:
        tail = sandbox.kubectl("logs", pod, "-n", SYSTEM, "-c", "operator", check=False).stdout[-3000:]
        raise AssertionError(f"the new leader {pod} never said it reconciled {server}:\n{tail}") from None
    times["server reconciled"] = time.monotonic() - started
    return times


_ABSENT = object()


def changed_fields(before: Any, after: Any, path: str = "") -> list[str]:
    """Every leaf that differs between two objects, as `path: before -> after`; lists of named items (containers,
    volumes, env) are matched by name."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [line for key in sorted(set(before) | set(after))
                for line in changed_fields(before.get(key, _ABSENT), after.get(key, _ABSENT), f"{path}.{key}")]
    if isinstance(before, list) and isinstance(after, list):
        named = all(isinstance(item, dict) and "name" in item for item in [*before, *after])
        if named and before and after:
            old, new = ({item["name"]: item for item in items} for items in (before, after))
            order = [*old, *(name for name in new if name not in old)]
            return [line for name in order
                    for line in changed_fields(old.get(name, _ABSENT), new.get(name, _ABSENT), f"{path}[{name}]")]
        if len(before) == len(after):
            return [line for index, (a, b) in enumerate(zip(before, after, strict=True))
                    for line in changed_fields(a, b, f"{path}[{index}]")]
    if before == after:
        return []
    show = {id(_ABSENT): "(absent)"}
    return [f"{path or '.'}: {show.get(id(before), repr(before))} -> {show.get(id(after), repr(after))}"]


class Phases:
    """Samples a LlamaServer's (phase, readyReplicas) every half second while in use: every pair seen, in order."""

    def __init__(self, sandbox: SandboxProcess, namespace: str, name: str) -> None:
        self.seen: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sandbox, namespace, name), daemon=True)

    def _run(self, sandbox: SandboxProcess, namespace: str, name: str) -> None:
        while not self._stop.wait(0.5):
            status = sandbox.custom.get_namespaced_custom_object(
                "llamacpp.dev", "v1alpha1", namespace, "llamaservers", name).get("status") or {}
            sample = (str(status.get("phase")), int(status.get("readyReplicas") or 0))
            if not self.seen or self.seen[-1] != sample:
                self.seen.append(sample)

    def __enter__(self) -> Phases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


STORED_BACK = (("llamamodels.llamacpp.dev", "llamamodels.v1alpha1.llamacpp.dev"),
               ("llamaservers.llamacpp.dev", "llamaservers.v1alpha1.llamacpp.dev"))


def store_v1alpha1_again(sandbox: SandboxProcess) -> None:
    """docs/upgrading.md's way back before `helm rollback` to 0.1.0, as a user types it: v1alpha1 the storage
    version again, every object rewritten through it, then status.storedVersions recorded (0.1.0's CRDs know only
    v1alpha1, and the API server refuses a CRD that drops a stored version)."""
    patch = ('[{"op":"replace","path":"/spec/versions/0/storage","value":false},'
             '{"op":"replace","path":"/spec/versions/1/storage","value":true}]')
    for crd, _ in STORED_BACK:
        sandbox.kubectl("patch", "crd", crd, "--type", "json", "-p", patch)
    for _, resource in STORED_BACK:
        for attempt in range(3):  # the running operator may write a status between get and replace: 409, again
            objects = sandbox.kubectl("get", resource, "-A", "-o", "json").stdout
            done = sandbox.kubectl("replace", "-f", "-", input=objects, check=attempt == 2)
            if done.returncode == 0:
                break
    for crd, _ in STORED_BACK:
        sandbox.kubectl("patch", "crd", crd, "--subresource=status", "--type=merge",
                        "-p", '{"status":{"storedVersions":["v1alpha1"]}}')
