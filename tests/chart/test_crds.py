"""The CRDs the chart renders equal crds/ byte for byte (plus the keep annotation by default)."""

from __future__ import annotations

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


def test_rendered_crds_equal_crds_dir_byte_for_byte(helm: str) -> None:
    repo = _repo_crds()
    # crds.keep: false renders the files untouched.
    assert _rendered_crd_texts(render_text(helm, "everything")) == repo
    # crds.keep: true (default) adds exactly the keep annotation; removing it gives the file back byte for byte.
    kept = _rendered_crd_texts(render_text(helm, "default"))
    assert set(kept) == set(repo)
    for name, text in kept.items():
        assert text.count(_KEEP_LINES) == 1
        assert text.replace(_KEEP_LINES, "", 1) == repo[name]
        assert yaml.safe_load(text)["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # crds.install: false renders none.
    assert _rendered_crd_texts(render_text(helm, "minimal")) == {}
