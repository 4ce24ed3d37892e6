"""scripts/build-node-kit.sh (the real-node kit) and the pause program it builds: the `--cached` contract, a whole
build run against a stand-in `go` and `cc` (order, flags, versions.json, the atomic cache entry), the Kubernetes
version written once, the Debian packages CI installs, and pause's signals and reaping."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.tiers import REPO, in_ci

SCRIPT = REPO / "scripts" / "build-node-kit.sh"
MISSING_PACKAGES = "Debian packages that are missing"
COMMANDS = ["containerd", "containerd-shim-runc-v2", "ctr", "pause", "kubelet", "kube-proxy", "coredns", "registry",
            "kube-router"]

# Stand-ins for `go` and `cc`: each logs its call and writes an executable that answers any flag with its name
# and a long tail (the script must read a whole --version output: a closed pipe would stop it).
FAKE_TOOL = r"""#!/bin/sh
echo "$(basename "$0") CGO_ENABLED=$CGO_ENABLED PWD=$PWD $*" >>"$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done
if [ -z "$out" ]; then
  for a in "$@"; do pkg=$a; done
  name=${pkg%@*}; out="$GOBIN/${name##*/}"
fi
printf '#!/bin/sh\necho "%s 0.0-fake"\necho "  Version: 0.0-fake"\nseq 100000\n' "$(basename "$out")" >"$out"
chmod +x "$out"
"""


def _run(*args: str, cache: Path, path: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "LLAMA_OPERATOR_CACHE": str(cache), **env}
    if path is not None:
        environ["PATH"] = path
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=120)


def _skip_without_debian_tools(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode == 2 and MISSING_PACKAGES in proc.stderr:
        message = proc.stderr.strip()
        if in_ci():  # .ci/run installs them
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def test_cached_without_a_kit_exits_3_with_one_line_saying_how(tmp_path: Path) -> None:
    proc = _run("--cached", cache=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["the node kit is not built yet: `make node-kit` builds it"]
    assert list(tmp_path.iterdir()) == [], "--cached never builds"


def test_a_build_with_stand_in_compilers_fills_one_cache_entry(tmp_path: Path) -> None:
    bin_dir, cache, log = tmp_path / "bin", tmp_path / "cache", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("go", "cc"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    proc = _run(cache=cache, path=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    _skip_without_debian_tools(proc)
    assert proc.returncode == 0, proc.stderr
    kit = Path(proc.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"node-kit-v1\.\d+\.\d+-containerd-v2\.\d+\.\d+-[0-9a-f]{12}", kit.name)
    assert kit.parent == cache and [p.name for p in cache.iterdir()] == [kit.name], "the tmp dir is renamed"
    versions = json.loads((kit / "versions.json").read_text())
    assert sorted(versions["parts"]) == sorted(COMMANDS)
    assert sorted(p.name for p in kit.iterdir()) == sorted([*COMMANDS, "versions.json"])
    assert versions["parts"]["kubelet"] == versions["parts"]["kube-proxy"] == versions["kubernetes"]
    assert "runc" in versions["debian_packages"] and "containernetworking-plugins" in versions["debian_packages"]

    calls = log.read_text().splitlines()
    built = [re.search(r"(\S+)$", call).group(1) for call in calls]  # type: ignore[union-attr]
    order = [name.split("@")[0].rsplit("/", 1)[-1] for name in built]
    assert order == ["containerd", "containerd-shim-runc-v2", "ctr", "pause.c", "kubelet", "kube-proxy", "coredns",
                     "registry", "kube-router"], "containerd and pause first: a node needs them before the kubelet"
    assert all("CGO_ENABLED=0" in call for call in calls if call.startswith("go "))
    (kubelet,) = [call for call in calls if call.endswith("k8s.io/kubernetes/cmd/kubelet")]
    assert f"gitVersion={versions['kubernetes']} " in kubelet
    assert f"PWD={REPO}/hack/control-plane/kubernetes " in kubelet, "built from the control plane's wrapper module"
    containerd = calls[0]
    assert "urfave_cli_no_docs no_btrfs" in containerd
    assert f"version.Version={versions['parts']['containerd']}" in containerd
    assert "-static" in calls[3]
    timings = [line.split()[0] for line in proc.stderr.splitlines() if re.fullmatch(r"  \S+ built in \d+ s", line)]
    assert timings == COMMANDS, "one timing line per part"
    assert all(f"  {c} 0.0-fake" in proc.stderr.splitlines() for c in COMMANDS), "each part says its version"

    again = _run("--cached", cache=cache)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(kit)


def test_the_kubernetes_version_is_written_once() -> None:
    versions = (REPO / "scripts" / "lib" / "versions.sh").read_text()
    (version,) = re.findall(r"^KUBERNETES_VERSION=(v\S+)$", versions, re.M)
    for script in (REPO / "scripts").rglob("*.sh"):
        text = script.read_text()
        if script.name != "versions.sh":
            assert version not in text, f"{script} repeats {version}: source scripts/lib/versions.sh"
            assert "component-base/version" not in text, f"{script} repeats the version -ldflags"
    for script in ("build-control-plane.sh", "build-node-kit.sh"):
        assert 'source "$here/scripts/lib/versions.sh"' in (REPO / "scripts" / script).read_text()


def test_ci_installs_exactly_the_debian_packages_the_kit_checks() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    (listed,) = re.findall(r'^node_packages="([^"]+)"$', ci, re.M)
    script = SCRIPT.read_text()
    (tools,) = re.findall(r'^DEBIAN_TOOLS="([^"]+)"$', script, re.M)
    assert sorted(listed.split()) == sorted({entry.split(":")[0] for entry in tools.split()})
    assert "dpkg -s $node_packages" in ci and "apt-get install -y --no-install-recommends $node_packages" in ci


@pytest.fixture(scope="module")
def pause(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pause program, compiled as the script does (a C compiler is part of what `make test` needs)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler (cc) to build hack/node/pause/pause.c")
    out = tmp_path_factory.mktemp("pause") / "pause"
    subprocess.run([cc, "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-DPAUSE_VERSION=\"9.9\"", "-o", str(out),
                    str(REPO / "hack" / "node" / "pause" / "pause.c")], check=True, timeout=120)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pause_reaps_its_children_and_exits_0_on_a_stop_signal(pause: Path, sig: signal.Signals) -> None:
    # The shell starts a child and becomes pause: the child's exit must not leave a zombie behind.
    proc = subprocess.Popen(["sh", "-c", f"sleep 0.3 & echo $!; exec {pause}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        child = Path(f"/proc/{int(proc.stdout.readline())}")
        deadline = time.monotonic() + 10
        while child.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = child.joinpath("stat").read_text().split(") ")[-1][0] if child.exists() else "reaped"
        assert state == "reaped", f"the child is still there in state {state}"
        assert proc.poll() is None, "pause returned before a stop signal"
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_pause_prints_its_version(pause: Path) -> None:
    proc = subprocess.run([str(pause), "--version"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0 and proc.stdout.startswith("pause 9.9 ")
