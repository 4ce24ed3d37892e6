"""helm lint --strict for every value set, and values.schema.json refusing typos (through helm)."""

from __future__ import annotations

import subprocess

import pytest

from tests.chart.chart import CHART, NAMESPACE, RELEASE, SCENARIOS, run_helm


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: str, scenario: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=SCENARIOS[scenario])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "replicaCont=2"], "replicaCont"),
        (["--set", "image.tagg=x"], "tagg"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "webhook.certManager.enabld=true"], "enabld"),
        (["--set", "webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (["--set", "llamaServerImages.cpu=llama.cpp:server"], "/llamaServerImages/cpu"),
        (["--set", "image.repository=llama-operator"], "/image/repository"),
        (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (["--set", "tolerations[0].efect=NoSchedule"], "efect"),
        (["--set", "defaultCacheType=Local"], "defaultCacheType"),
        (["--set", "gateway.holdTimeout=5"], "holdTimeout"),
        (["--set", "gateway.holdQueueLength=0"], "/gateway/holdQueueLength"),
    ],
)
def test_typo_in_values_fails_through_the_schema(helm: str, args: list[str], complaint: str) -> None:
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0, f"helm template {args} rendered instead of failing"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_valid_set_still_renders(helm: str) -> None:
    """Control for the typo test: the same mechanism with a real key succeeds."""
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--set", "image.tag=0.1.1", "--set", "watchNamespaces={a,b}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
