"""Frees the disk a finished cluster of the tests held: its nodes' unpacked images (containerd's content and
snapshots, ~600 MiB a node) and the local registry's copy. One CI run starts about twenty clusters; kept, they
filled the CI machine's disk until the kubelets tainted their nodes with DiskPressure and the last tests timed out.

Logs stay (nodes/*/logs, nodes/*/pod-logs, the control plane's): they are what a failed test is read by.
Nothing is removed while anything is still mounted under the state directory: a leftover mount (a pod's rootfs, a
bind mount) would let a recursive delete reach through it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llama_operator.nodes.host import mounts_under


def drop_node_images(state_dir: Path) -> list[Path]:
    """Remove the unpacked images of every node under `state_dir` (a sandbox's state or a RealNodes directory, at
    any depth); returns what was removed, nothing when a mount is left below `state_dir`."""
    if not state_dir.is_dir() or mounts_under([str(state_dir.resolve())]):
        return []
    found = [*state_dir.glob("**/nodes/*/containerd"), *state_dir.glob("**/nodes/registry/storage")]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found
