"""The dry-run init container: parses the rendered arguments with the pod's own llama-server before it starts.

A user-supplied image may carry a llama.cpp whose flags differ from the pinned catalog. `llama-server <args>
-h` parses every argument and exits 0 only if all of them are valid (printing the usage), so running it as an
init container turns a flag that would crash-loop the server into one failed init container whose
termination message (the parse error, via FallbackToLogsOnError) the operator copies into status.
"""

from __future__ import annotations

from typing import Any

from ..contract import DRY_RUN_CONTAINER

LLAMA_SERVER_PATH = "/app/llama-server"
# Both spellings: if the image's llama.cpp treats the last user flag as taking a value, it swallows the
# first and the second still ends the parse (instead of starting a server inside an init container).
HELP_FLAGS = ["-h", "--help"]


def dry_run_init_container(
    *, image: str, args: list[str], security_context: dict[str, Any], volume_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The init container (a core/v1 Container dict) that dry-runs `args` in `image`.

    `volume_mounts` should match the main container's, so path arguments resolve the same way. Only
    requests are set: parsing is instant, but GPU images load their backend libraries (no memory limit
    that could OOM-kill a valid dry run).
    """
    return {
        "name": DRY_RUN_CONTAINER,
        "image": image,
        "command": [LLAMA_SERVER_PATH],
        "args": [*args, *HELP_FLAGS],
        "securityContext": security_context,
        "volumeMounts": volume_mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
    }
