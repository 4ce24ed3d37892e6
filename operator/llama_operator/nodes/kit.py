"""Where the node kit is (`make node-kit`, scripts/build-node-kit.sh) and what it holds: the binaries built from Go
modules, their versions (versions.json), and the Debian tools the nodes also need, looked up on this machine."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ENV_DIR = "LLAMA_OPERATOR_NODE_KIT_DIR"
HOW = "`make node-kit` builds it (prints its directory) and sets $" + ENV_DIR
KIT_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "registry")
OPTIONAL_BINARIES = ("coredns", "pause", "kube-router")
# Debian packages: runc, containernetworking-plugins, skopeo, conntrack, iptables, ipset (.ci/run installs them).
HOST_TOOLS = {"runc": "runc", "skopeo": "skopeo", "conntrack": "conntrack", "iptables": "iptables",
              "ip6tables": "iptables", "ipset": "ipset", "unshare": "util-linux", "nsenter": "util-linux",
              "ip": "iproute2", "mount": "mount"}
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


class KitMissing(RuntimeError):
    """The node kit or a tool it needs is missing; the message (one line) says what and how to get it."""


def cache_root() -> Path:
    if os.environ.get("LLAMA_OPERATOR_CACHE"):
        return Path(os.environ["LLAMA_OPERATOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-operator"


@dataclass(frozen=True)
class NodeKit:
    """Absolute paths of everything a real node runs, and the kit's versions ({"containerd": "v2.2.9", ...})."""

    directory: Path
    versions: dict[str, str]
    tools: dict[str, Path] = field(default_factory=dict)
    cni_dir: Path = CNI_DIR

    def binary(self, name: str) -> Path:
        return self.directory / name

    def tool(self, name: str) -> Path:
        return self.tools[name]

    @property
    def kube_router(self) -> Path | None:
        path = self.binary("kube-router")
        return path if _executable(path) else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _newest_cached() -> Path | None:
    root = cache_root()
    if not root.is_dir():
        return None
    kits = [p for p in root.glob("node-kit-*") if p.is_dir() and ".tmp." not in p.name]
    return max(kits, key=lambda p: p.stat().st_mtime, default=None)


def find_kit(directory: str | os.PathLike[str] | None = None) -> NodeKit:
    """The kit in `directory`, else in $LLAMA_OPERATOR_NODE_KIT_DIR, else the newest `node-kit-*` in the cache;
    KitMissing names the first thing absent."""
    chosen = directory or os.environ.get(ENV_DIR) or _newest_cached()
    if not chosen:
        raise KitMissing(f"no node kit: ${ENV_DIR} is not set and {cache_root()} holds no node-kit-*; {HOW}")
    kit_dir = Path(chosen).resolve()
    missing = [name for name in KIT_BINARIES if not _executable(kit_dir / name)]
    if missing:
        raise KitMissing(f"node kit {kit_dir} lacks {', '.join(missing)}; {HOW}")
    try:
        # {"kubernetes": ..., "parts": {"kubelet": "v1.35.4", "containerd": "v2.2.9", ...}, "debian_packages": [...]}
        parts = json.loads((kit_dir / "versions.json").read_text())["parts"]
        versions = {str(k): str(v) for k, v in parts.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KitMissing(f"node kit {kit_dir} has no readable versions.json ({exc}); {HOW}") from None
    tools: dict[str, Path] = {}
    for tool, package in HOST_TOOLS.items():
        found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if found is None:
            raise KitMissing(f"the nodes need `{tool}`: apt-get install {package}")
        tools[tool] = Path(found)
    absent = [p for p in CNI_PLUGINS if not _executable(CNI_DIR / p)]
    if absent:
        raise KitMissing(f"the nodes need the CNI plugins {', '.join(absent)} in {CNI_DIR}: "
                         "apt-get install containernetworking-plugins")
    return NodeKit(directory=kit_dir, versions=versions, tools=tools)
