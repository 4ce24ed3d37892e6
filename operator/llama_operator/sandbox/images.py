"""Which local executable stands in for a container image, and how a container's view of the world is mapped.

The sandbox cannot run images, so it keeps a small table of images it knows how to run locally:

- `ghcr.io/ggml-org/llama.cpp:*` (any tag; CUDA/ROCm/... tags run the CPU build): `$LLAMA_SERVER_BIN`, else
  `llama-server` on PATH, else the build that `make llama-server` cached;
- `*/llama-operator:*` (the operator/fetcher image): the `llama-operator` of this Python environment;
- an image (or repository) given with `--image IMAGE=EXECUTABLE`: that executable, as the entrypoint.

Any other image fails like an image that cannot be pulled (`ErrImagePull`).

Containers see absolute paths (`/models/...`, `/tmp`, `/dev/termination-log`) that a local process cannot. Paths
are mapped by rewriting: every argument, environment value and probe command that equals a volume mount path
or starts with `<mountPath>/` is rewritten to the volume's sandbox directory (longest mount first); the
container's `terminationMessagePath` is mapped to a file in the pod directory the same way. Programs that
read a fixed path internally get it through the image's documented override (the fetcher's
`LLAMA_FETCH_TERMINATION_LOG`), as an image's ENV would.

Paths under /run (and /var/run), such as the service-account token directory, are not rewritten: every pod
has a private tmpfs on /run where those volumes are real bind mounts (network.py). Network identity needs no
mapping: every pod has a network namespace and IP of its own, so servers listen where their arguments say.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..llamacpp import LLAMA_CPP_COMMIT
from ..llamacpp import LLAMA_CPP_IMAGE_REPO as LLAMA_CPP_REPO

LLAMA_SERVER_PATH = "/app/llama-server"


class ImageError(Exception):
    """The image has no local stand-in (reported like an image pull failure)."""


@dataclass(frozen=True)
class LocalImage:
    """A runnable stand-in for an image: its entrypoint and the executables it contains."""

    entrypoint: tuple[str, ...]
    executables: Mapping[str, str]
    """Container path (or bare name found on the image's PATH) → local executable."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Image ENV; `{termination_log}` is replaced by the container's mapped termination message file."""

    def command(self, command: Sequence[str] | None, args: Sequence[str] | None) -> list[str]:
        """Kubernetes semantics: command replaces the entrypoint, args replace the image's CMD."""
        argv = list(command) if command else list(self.entrypoint)
        argv += list(args or [])
        if not argv:
            raise ImageError("no command and the image has no entrypoint")
        exe = self.executables.get(argv[0]) or self.executables.get(os.path.basename(argv[0]))
        if exe is None:
            raise ImageError(f'exec: "{argv[0]}": executable file not found in the sandbox image')
        return [exe, *argv[1:]]


def llama_server_binary() -> str | None:
    """$LLAMA_SERVER_BIN, `llama-server` on PATH, or the binary `make llama-server` built and cached."""
    env = os.environ.get("LLAMA_SERVER_BIN")
    if env:
        return env
    found = shutil.which("llama-server")
    if found:
        return found
    root = os.environ.get("LLAMA_OPERATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-operator")
    cached = Path(root) / f"llama-server-{LLAMA_CPP_COMMIT}" / "llama-server"
    return str(cached) if os.access(cached, os.X_OK) else None


def operator_executable() -> str:
    """The `llama-operator` console script of the running Python environment."""
    beside = Path(sys.executable).with_name("llama-operator")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("llama-operator")
    if found:
        return found
    raise ImageError("no llama-operator executable in this environment")


def _repository(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


class ImageTable:
    """Resolves images to local stand-ins; `overrides` maps an image (or its repository) to an executable."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self.overrides = dict(overrides or {})

    def resolve(self, image: str) -> LocalImage:
        repo = _repository(image)
        override = self.overrides.get(image) or self.overrides.get(repo)
        if override:
            return LocalImage(entrypoint=(override,), executables={override: override, LLAMA_SERVER_PATH: override})
        if repo == LLAMA_CPP_REPO:
            binary = llama_server_binary()
            if binary is None:
                raise ImageError(f"{image}: no llama-server binary (set LLAMA_SERVER_BIN, put llama-server on "
                                 "PATH, or run `make llama-server`)")
            return LocalImage(entrypoint=(LLAMA_SERVER_PATH,), executables={LLAMA_SERVER_PATH: binary})
        if repo.rsplit("/", 1)[-1] == "llama-operator":
            exe = operator_executable()
            return LocalImage(entrypoint=("llama-operator",),
                              executables={"llama-operator": exe, "/usr/local/bin/llama-operator": exe},
                              env={"LLAMA_FETCH_TERMINATION_LOG": "{termination_log}"})
        raise ImageError(f"{image}: not available in the sandbox (known: {LLAMA_CPP_REPO}:*, */llama-operator:*, "
                         "or map it with --image IMAGE=EXECUTABLE)")


class PathMap:
    """Container paths → sandbox directories/files, applied to strings by prefix."""

    def __init__(self, mounts: Mapping[str, str]) -> None:
        # Longest first, so /models/sub wins over /models.
        self._mounts = sorted(((p.rstrip("/") or "/", h) for p, h in mounts.items()), key=lambda m: -len(m[0]))

    def rewrite(self, value: str) -> str:
        for container_path, host_path in self._mounts:
            if value == container_path:
                return host_path
            if value.startswith(container_path + "/"):
                return host_path + value[len(container_path):]
        return value
