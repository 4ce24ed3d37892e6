"""Computes a LlamaServer's phase, message and conditions from its Deployment and pods (pure).

Phases: Pending (no model yet / nothing scheduled), Downloading (the fetch-model init container runs),
Loading (llama-server starting or started, /health not yet 200), Ready, Degraded (some replicas ready, others not),
Failed (bad spec, a failed download, or a crash-looping server; the message says which and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..contract import DRAIN_CONTAINER, SERVER_CONTAINER, fetch_subject, is_fetch_container
from ..fetch import command as fetch_command

_CRASH_REASONS = {"CrashLoopBackOff", "Error", "OOMKilled", "CreateContainerConfigError", "InvalidImageName"}
_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff"}


@dataclass(frozen=True)
class OomKill:
    """The kernel killed llama-server at its cgroup memory limit (reason OOMKilled, now or as its last state)."""

    pod: str
    limit: str | None
    """The container's resources.limits.memory as the pod has it (None: no limit, the node ran out)."""


@dataclass(frozen=True)
class PodSummary:
    """What one pod says about the fleet."""

    phase: str  # Downloading | Loading | Ready | Failed | Pending
    message: str = ""
    oom: OomKill | None = None


@dataclass(frozen=True)
class FleetStatus:
    phase: str
    message: str
    replicas: int
    ready_replicas: int
    updated_replicas: int
    rollout: str = ""
    """How a spec change replaces this server's pods, when it costs capacity (GPU servers): for the Progressing
    condition's message (the trade-off: docs/architecture.md, "The pods")."""
    oom: OomKill | None = None
    """A replica whose llama-server was OOM-killed (the first found): the Fits condition says so with numbers."""


def _terminated_message(name: str, state: dict[str, Any]) -> str:
    term = state.get("terminated") or {}
    text = (term.get("message") or "").strip().splitlines()
    detail = text[-1] if text else term.get("reason") or "no message"
    return f"{name} exited with code {term.get('exitCode')}: {detail}"


def _container_failure(status: dict[str, Any]) -> str | None:
    """A failure message when this container is failing, else None."""
    name = status.get("name", "?")
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason")
    if reason in _PULL_REASONS:
        return f"cannot pull the image of {name}: {waiting.get('message') or reason}"
    if reason in _CRASH_REASONS:
        last = status.get("lastState") or {}
        if last.get("terminated"):
            return _terminated_message(name, last) + f" (restarting: {reason})"
        return f"{name}: {reason}: {waiting.get('message', '')}".rstrip(": ")
    term = state.get("terminated")
    if term and term.get("exitCode", 0) != 0:
        return _terminated_message(name, state)
    return None


def _oom_kill(pod: dict[str, Any], status: dict[str, Any]) -> OomKill | None:
    """The OOM kill of this container, now or as the termination before its restart."""
    reasons = {((status.get(key) or {}).get("terminated") or {}).get("reason") for key in ("state", "lastState")}
    if "OOMKilled" not in reasons:
        return None
    spec = next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == status.get("name")),
                {})
    limit = ((spec.get("resources") or {}).get("limits") or {}).get("memory")
    return OomKill(pod.get("metadata", {}).get("name", "?"), str(limit) if limit is not None else None)


def _cache_key(pod: dict[str, Any], container: str) -> str | None:
    """The --cache-key of an init container in the pod's spec (names the model a router pod downloads)."""
    for spec in (pod.get("spec") or {}).get("initContainers") or []:
        if spec.get("name") == container:
            command = fetch_command.parse([str(arg) for arg in spec.get("args") or []])
            return command.cache_key if command is not None else None
    return None


def summarize_pod(pod: dict[str, Any]) -> PodSummary:
    status = pod.get("status") or {}
    name = pod.get("metadata", {}).get("name", "?")
    for init in status.get("initContainerStatuses") or []:
        failure = _container_failure(init)
        if failure:
            return PodSummary("Failed", f"pod {name}: {failure}")
        if init.get("name") == DRAIN_CONTAINER:  # a native sidecar: it runs for the pod's whole life
            continue
        state = init.get("state") or {}
        if "running" in state:
            if is_fetch_container(init.get("name", "")):
                subject = fetch_subject(init["name"], _cache_key(pod, init["name"]))
                return PodSummary("Downloading", f"pod {name}: downloading {subject}")
            return PodSummary("Loading", f"pod {name}: running {init.get('name')}")
        if "terminated" not in state:  # waiting to start
            return PodSummary("Downloading", f"pod {name}: waiting for {init.get('name')}")
    for container in status.get("containerStatuses") or []:
        if container.get("name") != SERVER_CONTAINER:
            continue
        failure = _container_failure(container)
        oom = _oom_kill(pod, container)
        if failure:
            return PodSummary("Failed", f"pod {name}: {failure}", oom)
        if container.get("ready"):
            return PodSummary("Ready", oom=oom)
        if "running" in (container.get("state") or {}):
            return PodSummary("Loading", f"pod {name}: llama-server is loading the model", oom)
    if status.get("initContainerStatuses"):
        # Every init container is done (the loop above returned otherwise) and llama-server is not running yet,
        # or has no status yet: the kubelet is starting it. Saying Pending here would step the phase (and its
        # Events) back between Downloading and Loading.
        return PodSummary("Loading", f"pod {name}: starting llama-server")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return PodSummary("Pending", f"pod {name} cannot be scheduled: {cond.get('message', '')}".strip())
    return PodSummary("Pending", f"pod {name} is {status.get('phase', 'Pending')}")


def rollout_note(deployment: dict[str, Any] | None) -> str:
    """What the Deployment's strategy costs during a rollout; "" for surge-first (no capacity lost)."""
    strategy = ((deployment or {}).get("spec") or {}).get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return "rollouts replace the only replica (Recreate): unavailable until the new pod is ready"
    if (strategy.get("rollingUpdate") or {}).get("maxSurge") == 0:
        return "rollouts replace one replica at a time (no spare GPU for a surge pod): one replica's capacity less"
    return ""


def fleet_status(desired: int, deployment: dict[str, Any] | None, pods: Sequence[dict[str, Any]]) -> FleetStatus:
    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    oom = next((s.oom for s in map(summarize_pod, live) if s.oom is not None), None)
    return replace(_fleet_status(desired, deployment, pods), rollout=rollout_note(deployment), oom=oom)


def _fleet_status(desired: int, deployment: dict[str, Any] | None, pods: Sequence[dict[str, Any]]) -> FleetStatus:
    dep_status = (deployment or {}).get("status") or {}
    live_pods = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    ready = int(dep_status.get("readyReplicas") or 0)
    replicas = int(dep_status.get("replicas") or len(live_pods))
    updated = int(dep_status.get("updatedReplicas") or 0)
    summaries = [summarize_pod(p) for p in live_pods]
    failed = [s for s in summaries if s.phase == "Failed"]
    if desired == 0:
        return FleetStatus("Ready", "scaled to zero replicas", replicas, ready, updated)
    if ready >= desired and not failed:
        return FleetStatus("Ready", "", replicas, ready, updated)
    if failed:
        phase = "Degraded" if ready > 0 else "Failed"
        return FleetStatus(phase, failed[0].message, replicas, ready, updated)
    if ready > 0:
        waiting = next((s.message for s in summaries if s.phase != "Ready"), "")
        message = f"{ready}/{desired} replicas ready; {waiting}".rstrip("; ")
        return FleetStatus("Degraded", message, replicas, ready, updated)
    for phase in ("Loading", "Downloading", "Pending"):
        found = [s for s in summaries if s.phase == phase]
        if found:
            return FleetStatus(phase, found[0].message, replicas, ready, updated)
    return FleetStatus("Pending", "waiting for pods to be created", replicas, ready, updated)
