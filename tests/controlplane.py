"""The integration tests' control plane: the product's `ControlPlane` plus two hooks only tests use, an audit log of
every request a ServiceAccount makes (what the operator really asked for) and the restart of one component."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import yaml

from llama_operator.controlplane import ControlPlane


class AuditedControlPlane(ControlPlane):
    """`ControlPlane` whose API server writes ServiceAccounts' requests (metadata level) to `audit_log`."""

    @property
    def audit_log(self) -> pathlib.Path:
        return self.logs / "audit.jsonl"

    def start(self, timeout: float = 90.0) -> AuditedControlPlane:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        policy = self.state_dir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}]}))
        # blocking: an event is on disk before the response, so a test reads what just happened.
        self.extra_apiserver_args = [*self.extra_apiserver_args, "--audit-policy-file", str(policy),
                                     "--audit-log-path", str(self.audit_log), "--audit-log-mode", "blocking",
                                     "--audit-log-format", "json"]
        super().start(timeout)
        return self

    def audit_events(self) -> list[dict[str, Any]]:
        """Every audited request so far (ServiceAccounts only), oldest first."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def restart(self, name: str, *, down_for: float = 0.0, timeout: float = 90.0) -> None:
        """Stop one component (`etcd`, `kube-apiserver` ...), wait `down_for` seconds, start it again."""
        process = self._processes[name]
        process.stop()
        time.sleep(down_for)
        process.start()
        if name == "kube-apiserver":
            self._wait_ready(process, timeout)
        elif name == "etcd":
            self._wait_etcd(process, timeout)
