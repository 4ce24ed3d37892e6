"""The restricted Pod Security Standard checker (tests/pss.py) can fail: each violation is reported."""

from __future__ import annotations

import json

from tests.pss import violations


def test_pss_checker_catches_what_it_should() -> None:
    """The checker itself must be able to fail: each mutation of a compliant spec is reported."""
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    assert violations(good) == []
    c = "containers"
    mutations = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPID": lambda s: s.update(hostPID=True),
        "hostIPC": lambda s: s.update(hostIPC=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/etc"}}),
        "privileged": lambda s: s[c][0]["securityContext"].update(privileged=True),
        "escalation": lambda s: s[c][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "root": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "uid0": lambda s: s[c][0]["securityContext"].update(runAsUser=0),
        "seccomp": lambda s: s["securityContext"].pop("seccompProfile"),
        "unconfined": lambda s: s[c][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "drop": lambda s: s[c][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        "add": lambda s: s[c][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPort": lambda s: s[c][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        "init": lambda s: s.update(initContainers=[{"name": "i", "image": "x"}]),
        "sysctl": lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for name, mutate in mutations.items():
        spec = json.loads(json.dumps(good))
        mutate(spec)
        assert violations(spec), f"checker missed: {name}"
    # The documented HostPath-cache exception, and only under its root.
    spec = json.loads(json.dumps(good))
    spec["volumes"].append({"name": "cache", "hostPath": {"path": "/var/lib/llama-operator/models/x"}})
    assert violations(spec, allowed_host_paths=["/var/lib/llama-operator/models"]) == []
    spec["volumes"][-1]["hostPath"]["path"] = "/var/lib/llama-operator/models/../../../etc"
    assert violations(spec, allowed_host_paths=["/var/lib/llama-operator/models"])
