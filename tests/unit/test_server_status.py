"""reconcile/server_status.py: phase and message from pods and the Deployment, one row per situation."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.reconcile.server_status import fleet_status, summarize_pod


def pod(name: str = "p", *, init: list[dict[str, Any]] | None = None, main: dict[str, Any] | None = None,
        phase: str = "Pending", conditions: list[dict[str, Any]] | None = None, deleting: bool = False
        ) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if init is not None:
        status["initContainerStatuses"] = init
    if main is not None:
        status["containerStatuses"] = [{"name": "llama-server", **main}]
    if conditions is not None:
        status["conditions"] = conditions
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": status}


RUNNING = {"running": {"startedAt": "t"}}
DONE = {"terminated": {"exitCode": 0, "reason": "Completed"}}


def failed(code: int, message: str = "") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": "Error", "message": message}}


POD_CASES = {
    "nothing yet": (pod(), "Pending", "pod p is Pending"),
    "unschedulable": (pod(conditions=[{"type": "PodScheduled", "status": "False",
                                       "message": "0/3 nodes: insufficient nvidia.com/gpu"}]),
                      "Pending", "pod p cannot be scheduled: 0/3 nodes: insufficient nvidia.com/gpu"),
    "fetch waiting": (pod(init=[{"name": "fetch-model", "state": {"waiting": {"reason": "PodInitializing"}}}]),
                      "Downloading", "pod p: waiting for fetch-model"),
    "fetch running": (pod(init=[{"name": "fetch-model", "state": RUNNING}]),
                      "Downloading", "pod p: downloading the model"),
    "fetch failed": (pod(init=[{"name": "fetch-model", "state": failed(13, "ChecksumMismatch: m.gguf: sha256")}]),
                     "Failed", "pod p: fetch-model exited with code 13: ChecksumMismatch: m.gguf: sha256"),
    "fetch crash loop": (pod(init=[{"name": "fetch-model", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": failed(11, "Unauthorized: needs a token")}]),
                         "Failed", "pod p: fetch-model exited with code 11: Unauthorized: needs a token "
                                   "(restarting: CrashLoopBackOff)"),
    "draft fetch running": (pod(init=[{"name": "fetch-model", "state": DONE},
                                      {"name": "fetch-draft-model", "state": RUNNING}]),
                            "Downloading", "pod p: downloading the draft model"),
    "dry run running": (pod(init=[{"name": "fetch-model", "state": DONE},
                                  {"name": "validate-args", "state": RUNNING}]),
                        "Loading", "pod p: running validate-args"),
    "image pull": (pod(init=[{"name": "fetch-model", "state": DONE}],
                       main={"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}),
                   "Failed", "pod p: cannot pull the image of llama-server: not found"),
    # Between the last init container and llama-server's start: Loading, not back to Pending.
    "starting": (pod(init=[{"name": "fetch-model", "state": DONE}],
                     main={"state": {"waiting": {"reason": "PodInitializing"}}, "ready": False}),
                 "Loading", "pod p: starting llama-server"),
    "starting, no status of llama-server yet": (pod(init=[{"name": "fetch-model", "state": DONE}]),
                                                "Loading", "pod p: starting llama-server"),
    "loading": (pod(init=[{"name": "fetch-model", "state": DONE}], main={"state": RUNNING, "ready": False}),
                "Loading", "pod p: llama-server is loading the model"),
    "ready": (pod(init=[{"name": "fetch-model", "state": DONE}], main={"state": RUNNING, "ready": True}),
              "Ready", ""),
    "server crash loop": (pod(main={"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": failed(1, "load\nerror: invalid argument: --bogus")}),
                          "Failed", "pod p: llama-server exited with code 1: error: invalid argument: --bogus "
                                    "(restarting: CrashLoopBackOff)"),
    "oom": (pod(main={"state": {"waiting": {"reason": "OOMKilled"}}}), "Failed", "pod p: llama-server: OOMKilled"),
}


@pytest.mark.parametrize(("body", "phase", "message"), POD_CASES.values(), ids=POD_CASES.keys())
def test_summarize_pod(body: dict[str, Any], phase: str, message: str) -> None:
    summary = summarize_pod(body)
    assert (summary.phase, summary.message) == (phase, message)


def deployment(ready: int = 0, replicas: int = 0, updated: int = 0) -> dict[str, Any]:
    return {"status": {"readyReplicas": ready, "replicas": replicas, "updatedReplicas": updated}}


READY_POD = POD_CASES["ready"][0]
LOADING = POD_CASES["loading"][0]
BROKEN = POD_CASES["fetch failed"][0]

FLEET_CASES = {
    "scaled to zero": (0, deployment(), [], ("Ready", "scaled to zero replicas")),
    "no deployment": (1, None, [], ("Pending", "waiting for pods to be created")),
    "all ready": (2, deployment(2, 2, 2), [READY_POD, READY_POD], ("Ready", "")),
    "one of two ready": (2, deployment(1, 2, 2), [READY_POD, LOADING],
                         ("Degraded", "1/2 replicas ready; pod p: llama-server is loading the model")),
    "ready but one failing": (2, deployment(1, 2, 2), [READY_POD, BROKEN],
                              ("Degraded", POD_CASES["fetch failed"][2])),
    "none ready, one failing": (1, deployment(0, 1, 1), [BROKEN], ("Failed", POD_CASES["fetch failed"][2])),
    "loading beats downloading": (2, deployment(0, 2), [POD_CASES["fetch running"][0], LOADING],
                                  ("Loading", "pod p: llama-server is loading the model")),
    "terminating pods do not count": (1, deployment(0, 1), [pod(deleting=True, main={"state": RUNNING}), LOADING],
                                      ("Loading", "pod p: llama-server is loading the model")),
}


@pytest.mark.parametrize(("desired", "dep", "pods", "expected"), FLEET_CASES.values(), ids=FLEET_CASES.keys())
def test_fleet_status(desired: int, dep: dict[str, Any] | None, pods: list[dict[str, Any]],
                      expected: tuple[str, str]) -> None:
    fleet = fleet_status(desired, dep, pods)
    assert (fleet.phase, fleet.message) == expected


def _oom_pod(name: str, main: dict[str, Any], limit: str | None = "64Mi") -> dict[str, Any]:
    body = pod(name, main=main, phase="Running")
    resources = {"limits": {"memory": limit}} if limit else {}
    body["spec"] = {"containers": [{"name": "llama-server", "resources": resources}, {"name": "sidecar"}]}
    return body


OOM_TERMINATED = {"terminated": {"reason": "OOMKilled", "exitCode": 137}}


@pytest.mark.parametrize("main", [
    {"state": OOM_TERMINATED},  # the kill itself, before the kubelet restarts it
    {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": OOM_TERMINATED},
    {"state": {"running": {}}, "lastState": OOM_TERMINATED, "ready": False},  # restarted, loading again
    {"state": {"running": {}}, "lastState": OOM_TERMINATED, "ready": True},  # and ready until the next long prompt
], ids=["terminated", "crash-loop", "restarted", "ready-again"])
def test_an_oom_kill_of_llama_server_is_reported_with_the_pods_limit(main: dict[str, Any]) -> None:
    fleet = fleet_status(2, None, [pod("ok", main={"ready": True, "state": {"running": {}}}), _oom_pod("p", main)])
    assert fleet.oom is not None and (fleet.oom.pod, fleet.oom.limit) == ("p", "64Mi")


def test_no_oom_kill_without_the_reason_and_no_limit_is_none() -> None:
    error = {"state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}
    assert fleet_status(1, None, [_oom_pod("p", error)]).oom is None
    unlimited = fleet_status(1, None, [_oom_pod("p", {"state": OOM_TERMINATED}, limit=None)]).oom
    assert unlimited is not None and unlimited.limit is None
