"""The previous release, for the upgrade test: which commit it is (the one place that says so), its operator image
built from that commit's own Dockerfile, and its chart.

`PREVIOUS_RELEASE` names the commit by hash: a CI clone may carry no tags (the tag `v0.1.0` on the same commit is
for people). `previous_release()` returns the chart directory and the operator image (an OCI archive) of that
commit, built once and cached outside the repo in `<cache>/previous-release-<commit>/` (a name the image
builder's pruning never matches). The build is that commit's own scripts/build-images.sh run on a `git archive`
of it, with a cache root of its own: the cache entries it shares with this checkout's build (base, llama-server,
client, pause, coredns: same inputs, same keys) are hard-linked in first, so only the operator image is built
(about a minute; its pip install reaches PyPI), and the old script's pruning never touches this checkout's cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llama_operator.nodes.kit import cache_root
from tests.tiers import REPO

PREVIOUS_RELEASE = ("0.1.0", "1f20aad299ac81e28f7ad7e80a506175e172b053")
"""(version, commit) of the release an upgrade starts from: CHANGELOG.md's 0.1.0 (tag v0.1.0). Bump both with
the next release."""


@dataclass(frozen=True)
class PreviousRelease:
    version: str
    commit: str
    chart: Path
    """That commit's charts/llama-operator."""
    operator_archive: Path
    """Its operator image, built from its Dockerfile (OCI archive)."""


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, timeout=120).stdout


def _extract(commit: str, into: Path) -> None:
    """The commit's tree, as `git archive` writes it."""
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}")
    except subprocess.CalledProcessError:
        raise RuntimeError(f"the previous release's commit {commit} is not in this clone (a shallow clone?): "
                           f"`git fetch origin {commit}` or a full clone") from None
    archive = into / "tree.tar"
    archive.write_bytes(_git("archive", "--format=tar", commit))
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="tar")
    archive.unlink()


def _build_operator(tree: Path, cache: Path, tools: dict[str, str]) -> Path:
    """That tree's scripts/build-images.sh with `cache` as its cache root and `tools` (LLAMA_SERVER_BIN, the node
    kit) in its environment; the operator image's archive."""
    env = {**os.environ, **tools, "LLAMA_OPERATOR_CACHE": str(cache), "PYTHON": "python3"}
    script = str(tree / "scripts" / "build-images.sh")
    plan = subprocess.run([script, "--plan"], env=env, check=True, capture_output=True, text=True,
                          timeout=120).stdout.splitlines()
    for line in plan[:-1]:  # name, ref, cache entry; the last line is the output directory
        entry = Path(line.split("\t")[2])
        ours = cache_root() / entry.name
        if (ours / "image.oci.tar").is_file() and not entry.exists():
            entry.mkdir(parents=True)
            os.link(ours / "image.oci.tar", entry / "image.oci.tar")
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"building the previous release's images failed:\n{done.stderr[-3000:]}")
    images = Path(done.stdout.strip().splitlines()[-1])
    table = json.loads((images / "images.json").read_text())
    return images / table["operator"]["archive"]


def previous_release(tools: dict[str, str]) -> PreviousRelease:
    """The previous release's chart and operator image, built on first use (see the module docstring)."""
    version, commit = PREVIOUS_RELEASE
    home = cache_root() / f"previous-release-{commit}"
    home.mkdir(parents=True, exist_ok=True)
    release = PreviousRelease(version, commit, home / "chart", home / "operator.oci.tar")
    with (home / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs build it once
        if release.operator_archive.is_file() and (release.chart / "Chart.yaml").is_file():
            return release
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            work = Path(tmp)
            _extract(commit, work)
            archive = _build_operator(work / "tree", work / "cache", tools)
            shutil.rmtree(release.chart, ignore_errors=True)
            shutil.copytree(work / "tree" / "charts" / "llama-operator", release.chart)
            shutil.copyfile(archive, home / "operator.oci.tar.tmp")
            (home / "operator.oci.tar.tmp").rename(release.operator_archive)  # present only once complete
    return release
