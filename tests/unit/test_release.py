"""scripts/release.py without a registry: the repository is releasable as it stands (one version everywhere, a
CHANGELOG section for it), and the checks and rewrites a release makes. The push and the install from the
registry run on real nodes (tests/nodes/test_real_nodes.py)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import yaml

from llama_operator import __version__
from tests.tiers import REPO

CHART = REPO / "charts" / "llama-operator"


def _release() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release", REPO / "scripts" / "release.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = _release()


def test_one_version_everywhere_and_its_changelog_section() -> None:
    assert release.chart_versions(CHART) == {"Chart.yaml version": __version__,
                                             "Chart.yaml appVersion": __version__,
                                             "values.yaml image.tag": __version__}
    release.check_versions(__version__, __version__, CHART)
    assert release.changelog_section(__version__, (REPO / "CHANGELOG.md").read_text()).strip()


def test_a_version_that_was_not_bumped_everywhere_is_refused_naming_each_place() -> None:
    with pytest.raises(release.ReleaseError, match=r"Chart.yaml version is .*appVersion is .*image.tag is"):
        release.check_versions("9.9.9", "9.9.9", CHART)
    with pytest.raises(release.ReleaseError, match="not a semantic version"):
        release.check_versions("latest", "latest", CHART)
    with pytest.raises(release.ReleaseError, match="no section '## 9.9.9'"):
        release.changelog_section("9.9.9", (REPO / "CHANGELOG.md").read_text())


def test_the_changelog_section_ends_at_the_next_release() -> None:
    text = "# Changelog\n\n## 0.2.0\n\n- new\n\n## 0.1.0\n\n- old\n"
    assert release.changelog_section("0.2.0", text) == "- new\n"
    assert release.changelog_section("0.1.0", text) == "- old\n"


def test_the_packaged_values_name_the_pushed_image_by_digest_and_keep_the_rest() -> None:
    values = (CHART / "values.yaml").read_text()
    digest = "sha256:" + "ab" * 32
    rewritten = release.set_image(values, "127.0.0.1:5000/llama-operator/llama-operator", "0.1.0", digest)
    before, after = yaml.safe_load(values), yaml.safe_load(rewritten)
    assert after["image"] == {**before["image"], "repository": "127.0.0.1:5000/llama-operator/llama-operator",
                              "tag": "0.1.0", "digest": digest}
    assert {k: v for k, v in after.items() if k != "image"} == {k: v for k, v in before.items() if k != "image"}
    assert rewritten.count("\n# ") == values.count("\n# ")  # the documented values keep their comments


@pytest.mark.parametrize(("registry", "plain"), [("127.0.0.1:5000", True), ("localhost:5000/team", True),
                                                 ("registry.example.com/team", False), ("ghcr.io", False)])
def test_only_a_loopback_registry_is_spoken_to_over_plain_http(registry: str, plain: bool) -> None:
    assert release.plain_http(registry) is plain


def test_the_default_operator_image_is_the_package_version() -> None:
    from llama_operator.config import DEFAULT_OPERATOR_IMAGE

    assert DEFAULT_OPERATOR_IMAGE.endswith(f":{__version__}")
