"""The CRDs the chart renders equal crds/ byte for byte, plus the keep annotation (by default) and the conversion
webhook (with the webhook, by default; tests/chart/test_webhook.py checks where it points)."""

from __future__ import annotations

import re

import yaml

from tests.chart.chart import REPO, render_text


def _rendered_crd_texts(text: str) -> dict[str, str]:
    """Rendered CRD documents as text, keyed by metadata.name (Helm's `# Source:` comment removed)."""
    crds = {}
    for doc in text.split("\n---\n"):
        body = "\n".join(line for line in doc.splitlines() if not line.startswith("# Source: ")).strip("-\n") + "\n"
        parsed = yaml.safe_load(body)
        if parsed and parsed.get("kind") == "CustomResourceDefinition":
            crds[parsed["metadata"]["name"]] = body
    return crds


def _repo_crds() -> dict[str, str]:
    return {yaml.safe_load(p.read_text())["metadata"]["name"]: p.read_text() for p in (REPO / "crds").glob("*.yaml")}


_KEEP_LINES = "  annotations:\n    helm.sh/resource-policy: keep\n"
_CONVERSION = re.compile(r"\nspec:\n  conversion:\n(    .*\n)+")


def _without_conversion(text: str) -> str:
    """The CRD text with the inserted spec.conversion block taken out (exactly one)."""
    stripped, count = _CONVERSION.subn("\nspec:\n", text)
    assert count == 1, text[:400]
    return stripped


def test_rendered_crds_equal_crds_dir_byte_for_byte(helm: str) -> None:
    repo = _repo_crds()
    # crds.keep: false renders the files untouched but for the conversion webhook.
    everything = _rendered_crd_texts(render_text(helm, "everything"))
    assert {name: _without_conversion(text) for name, text in everything.items()} == repo
    # Without the webhook, no conversion either.
    assert {name: text.replace(_KEEP_LINES, "", 1)
            for name, text in _rendered_crd_texts(render_text(helm, "webhook-off")).items()} == repo
    # crds.keep: true (default) adds exactly the keep annotation; removing it gives the file back byte for byte.
    kept = _rendered_crd_texts(render_text(helm, "default"))
    assert set(kept) == set(repo)
    for name, text in kept.items():
        assert text.count(_KEEP_LINES) == 1
        assert _without_conversion(text.replace(_KEEP_LINES, "", 1)) == repo[name]
        assert yaml.safe_load(text)["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # crds.install: false renders none.
    assert _rendered_crd_texts(render_text(helm, "minimal")) == {}
