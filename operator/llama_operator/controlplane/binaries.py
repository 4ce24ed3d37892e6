"""Where the control-plane binaries are: an explicit directory, $LLAMA_OPERATOR_CONTROL_PLANE_DIR, or PATH."""

from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass

ENV_DIR = "LLAMA_OPERATOR_CONTROL_PLANE_DIR"
COMMANDS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


class BinariesMissing(RuntimeError):
    """Some control-plane binary was not found; the message says how to build it."""


@dataclass(frozen=True)
class ControlPlaneBinaries:
    etcd: pathlib.Path
    kube_apiserver: pathlib.Path
    kube_controller_manager: pathlib.Path
    kube_scheduler: pathlib.Path
    kubectl: pathlib.Path


def find_binaries(directory: str | os.PathLike[str] | None = None) -> ControlPlaneBinaries:
    """The five binaries from `directory`, else from $LLAMA_OPERATOR_CONTROL_PLANE_DIR, else from PATH."""
    directory = directory or os.environ.get(ENV_DIR) or None
    found: dict[str, pathlib.Path] = {}
    missing: list[str] = []
    for command in COMMANDS:
        if directory:
            candidate = pathlib.Path(directory) / command
            path = candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None
        else:
            located = shutil.which(command)
            path = pathlib.Path(located) if located else None
        if path is None:
            missing.append(command)
        else:
            found[command.replace("-", "_")] = path
    if missing:
        where = f"in {directory}" if directory else f"on PATH (and ${ENV_DIR} is not set)"
        raise BinariesMissing(
            f"control-plane binaries not found {where}: {', '.join(missing)}. Build them with "
            f"`make control-plane` (prints their directory) and set {ENV_DIR} to it."
        )
    return ControlPlaneBinaries(**found)
