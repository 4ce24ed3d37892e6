"""The contract between the builders, the fetcher (`llama-operator fetch`), the status code and the gateway.

The builders write these names into every pod; the fetcher reads its inputs from them and reports through
them; `reconcile/server_status.py` reads the pods back with them; the watches and the gateway select by its
labels. Keeping them in one module means a rename cannot leave one side behind. Pure constants and small
formats: no I/O, no imports from the package.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- names, labels, ports

GROUP = "llamacpp.dev"
"""The API group; also the prefix of the operator's own labels and annotations (`llamacpp.dev/...`)."""
MANAGED_BY = "llama-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
NAME_LABEL = "app.kubernetes.io/name"
SERVER_NAME = "llama-server"
"""`app.kubernetes.io/name` of every llama-server pod (and of its Deployment and Service)."""
OPERATOR_VERSION_ANNOTATION = f"{GROUP}/operator-version"
"""On every object the operator makes (never on a pod template: an operator upgrade alone restarts no model pod),
the release that last wrote it."""
SERVER_LABEL = f"{GROUP}/server"
MODEL_LABEL = f"{GROUP}/model"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
"""The label selector of every object the operator manages (its watches of owned kinds)."""
SERVER_PODS_SELECTOR = f"{NAME_LABEL}={SERVER_NAME},{MANAGED_SELECTOR}"
"""The label selector of every LlamaServer's pods, Services and so EndpointSlices (what the gateway watches)."""
PORT_NAME = "http"
"""The name of llama-server's container port and of its Service's port: probes, the Service's targetPort and the
gateway's choice among an EndpointSlice's ports go by it."""

CACHE_RAM_FLAGS = ("-cram", "--cache-ram")
CACHE_RAM_ENV = "LLAMA_ARG_CACHE_RAM"


def adapters_cache_ram(args: Sequence[str], env_names: Iterable[str]) -> str | None:
    """The `--cache-ram` a server with LoRA adapters gets: 0 (llama-server's host prompt cache off), unless its
    args or env set one (None). The pinned build restores a cached prompt's KV into a slot by its tokens alone,
    whatever adapter computed it, so a request for the base model could continue from an adapter's KV.
    flags/render.py renders it, fit/ counts it."""
    if any(arg in CACHE_RAM_FLAGS for arg in args) or CACHE_RAM_ENV in env_names:
        return None
    return "0"

# ---------------------------------------------------------------------------------------------- containers

FETCH_CONTAINER = "fetch-model"
"""Init container that downloads the served model."""
FETCH_DRAFT_CONTAINER = "fetch-draft-model"
"""Init container that downloads the speculative draft model."""
DRY_RUN_CONTAINER = "validate-args"
"""Init container that parses the arguments with a user-supplied image (`llama-server <args> -h`)."""
FETCH_MMPROJ_CONTAINER = "fetch-mmproj"
"""Init container that downloads the served model's multimodal projector (LlamaModel spec.mmproj)."""
SERVER_CONTAINER = "llama-server"
FETCH_CONTAINERS = (FETCH_CONTAINER, FETCH_DRAFT_CONTAINER, FETCH_MMPROJ_CONTAINER)
_ROUTER_FETCH = re.compile(r"^(fetch-model|fetch-mmproj)-(\d+)$")
FETCH_ADAPTER_PREFIX = "fetch-adapter-"
_ADAPTER_FETCH = re.compile(rf"^{FETCH_ADAPTER_PREFIX}(\d+)$")


def adapter_fetch_container(index: int) -> str:
    """The fetcher of the server's index-th LoRA adapter (spec.adapters[index])."""
    return f"{FETCH_ADAPTER_PREFIX}{index}"


def router_fetch_container(index: int, *, mmproj: bool = False) -> str:
    """The fetcher of the index-th LlamaModel of a router-mode server (spec.models, distinct models in order)."""
    return f"{FETCH_MMPROJ_CONTAINER if mmproj else FETCH_CONTAINER}-{index}"


def is_fetch_container(name: str) -> bool:
    return name in FETCH_CONTAINERS or _ROUTER_FETCH.match(name) is not None or _ADAPTER_FETCH.match(name) is not None


def fetch_subject(name: str, cache_key: str | None = None) -> str:
    """What a fetch container downloads, for messages: `the model`, `the multimodal projector of <key>` ..."""
    if name == FETCH_DRAFT_CONTAINER:
        return "the draft model"
    adapter = _ADAPTER_FETCH.match(name)
    if adapter is not None:
        return f"adapter {cache_key or '#' + str(int(adapter.group(1)) + 1)}"
    router = _ROUTER_FETCH.match(name)
    what = "the multimodal projector" if name.startswith(FETCH_MMPROJ_CONTAINER) else "the model"
    if router is None:
        return what
    which = cache_key or f"#{int(router.group(2)) + 1}"
    return f"the multimodal projector of model {which}" if what != "the model" else f"model {which}"

# ---------------------------------------------------------------------------------------------- volumes, paths

CACHE_VOLUME = "model-cache"
CACHE_MOUNT = "/models"
"""Where the cache volume is mounted in the fetcher and in llama-server: `<mount>/<cacheKey>/<file>`."""
SOURCE_VOLUME = "model-source"
SOURCE_MOUNT = "/model-source"
"""Where a `volume` source's PVC is mounted (read-only) in llama-server."""
TMP_VOLUME = "tmp"
TMP_MOUNT = "/tmp"
TERMINATION_LOG = "/dev/termination-log"
"""The kubelet copies this file into `state.terminated.message` of the container (at most 4096 bytes)."""
TERMINATION_LIMIT = 4000

# ---------------------------------------------------------------------------------------------- environment

TOKEN_ENV = "HF_TOKEN"
"""The Hugging Face token (from `tokenSecretRef`)."""
HEADER_ENV_PREFIX = "LLAMA_FETCH_HEADER_"
"""`envFrom` prefix: every key of `headersSecretRef` becomes `LLAMA_FETCH_HEADER_<Header_Name>`."""
TRUSTED_ENV = "LLAMA_FETCH_TRUSTED_SHA256"
"""sha256sum-format lines (`<hex>  <file>`) recorded on the first verified download (trust on first use);
from the model's trust ConfigMap, optional: absent until the first download is recorded."""
TRUST_CONFIGMAP_KEY = "sha256sum"
TERMINATION_LOG_ENV = "LLAMA_FETCH_TERMINATION_LOG"
API_KEY_ENV = "LLAMA_API_KEY"
"""The server's `--api-key` value, from `apiKeySecretRef`: llama-server reads it as a comma-separated list of keys;
a call of our own sends the first (`first_key`)."""


def first_key(value: str) -> str:
    """The first key of an --api-key value (LLAMA_API_KEY), which llama-server reads as a comma-separated list
    (CSV quoting; empty fields skipped); "" when it holds none."""
    if "," not in value and '"' not in value:
        return value
    return next((field for field in next(csv.reader([value]), []) if field), "")


# ---------------------------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 10
EXIT_UNAUTHORIZED = 11
EXIT_FORBIDDEN = 12
EXIT_CHECKSUM = 13
EXIT_NOT_GGUF = 14
EXIT_DISK_FULL = 15
EXIT_UNREACHABLE = 16
EXIT_INTERRUPTED = 143

# ---------------------------------------------------------------------------------------------- files
# llama.cpp's name for the parts of a split GGUF (`gguf-split`): the source checks and the fetcher both read it.
SPLIT_GGUF_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file: the fetcher checks them on the first chunk, `gguf` parses on."""

# ---------------------------------------------------------------------------------------------- reports

VERIFIED_PREFIX = "Verified:"
"""First line of the fetcher's termination message on success (with --trust-on-first-use): `Verified: N file(s)
in <cache-key>`, then sha256sum-format lines."""
TRUSTED_HEADER = "# trust on first use, cache key "
"""First line of the trust ConfigMap's `sha256sum`: the sums below belong to this cache key only."""
_SUM_LINE = re.compile(r"^([a-f0-9]{64})  (\S.*)$")


def format_sums(sums: Mapping[str, str]) -> str:
    """`{file: sha256}` as sha256sum lines (`<hex>  <file>`), in file order."""
    return "".join(f"{sha}  {name}\n" for name, sha in sums.items())


def parse_sums(text: str) -> dict[str, str]:
    """sha256sum lines back into `{file: sha256}`; other lines are ignored."""
    sums = {}
    for line in text.splitlines():
        match = _SUM_LINE.match(line.strip())
        if match:
            sums[match.group(2)] = match.group(1)
    return sums


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def verified_message(cache_key: str, sums: Mapping[str, str]) -> str:
    """What a successful fetch leaves in its termination message: the sha256 of every file it vouches for."""
    return f"{VERIFIED_PREFIX} {len(sums)} file(s) in {cache_key}\n{format_sums(sums)}"


def parse_verified(message: str | None) -> tuple[str, dict[str, str]] | None:
    """(cache key, `{file: sha256}`) of a successful fetch's termination message; None when it is not one."""
    if not message or not message.startswith(VERIFIED_PREFIX):
        return None
    cache_key = _first_line(message).rpartition(" in ")[2]
    return (cache_key, parse_sums(message)) if cache_key else None


def trusted_sums_text(cache_key: str, sums: Mapping[str, str]) -> str:
    """The trust ConfigMap's `sha256sum` value."""
    return f"{TRUSTED_HEADER}{cache_key}\n{format_sums(sums)}"


def parse_trusted_sums(text: str | None, cache_key: str) -> dict[str, str]:
    """The recorded sums when they belong to `cache_key` (another source's are ignored), else {}."""
    if not text or _first_line(text) != f"{TRUSTED_HEADER}{cache_key}":
        return {}
    return parse_sums(text)


# ---------------------------------------------------------------------------------------------- progress lines

PROGRESS_INTERVAL_SECONDS = 5.0
"""How often the fetcher logs a progress line by default, and so how often the operator reads it."""

_PROGRESS_LINE = re.compile(
    r"Progress (?P<file>\S+): +(?P<percent>[\d.]+)% .*?\((?P<done>\d+) of (?P<total>\d+) bytes\), "
    r"(?P<rate>[\d.]+) MB/s")


@dataclass(frozen=True)
class Progress:
    """One progress report of a running fetch: the file, bytes so far and in all, bytes per second."""

    file: str
    done: int
    total: int
    rate: float


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human(n: float, *, places: int = 1, smallest: str = "B", largest: str = "TiB") -> str:
    """A byte count for people: `512 B`, `1.5 KiB` ... `2.0 TiB` (the fetcher's log, the operator's status), in the
    largest unit between `smallest` and `largest` that keeps it at least 1, to `places` decimal places."""
    index, last = _BYTE_UNITS.index(smallest), _BYTE_UNITS.index(largest)
    n /= 1024**index
    while abs(n) >= 1024 and index < last:
        n /= 1024
        index += 1
    unit = _BYTE_UNITS[index]
    return f"{int(n)} B" if unit == "B" else f"{n:.{places}f} {unit}"


def progress_line(file: str, done: int, total: int, rate: float, *, eta: str, connections: int) -> str:
    """The fetcher's progress line: readable, and with exact bytes for the operator (`parse_progress`)."""
    return (f"Progress {file}: {100 * done / total:5.1f}% {human(done)} / {human(total)} ({done} of {total} bytes), "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}, {connections} connection(s)")


def parse_progress(log_tail: str) -> Progress | None:
    """The newest progress line in the tail of a fetch container's log; None when there is none."""
    for line in reversed(log_tail.splitlines()):
        match = _PROGRESS_LINE.search(line)
        if match:
            return Progress(match["file"], int(match["done"]), int(match["total"]), float(match["rate"]) * 1e6)
    return None

# ---------------------------------------------------------------------------------------------- drain sidecar

DRAIN_CONTAINER = "drain"
"""The native sidecar (`llama-operator drain`) whose /drain answers llama-server's preStop hook once it is idle."""
DRAIN_PORT = 8081
"""The sidecar's port inside the pod; not in the Service: only the kubelet (preStop) calls it."""
DRAIN_PATH = "/drain"
DRAIN_MARGIN_SECONDS = 5
"""The drain answers this long before the pod's grace period runs out: llama-server then gets its SIGTERM in time."""
DRAIN_READY_PATH = "/readyz"
"""The sidecar's readiness: 200 once the saved prompt caches are restored (or there were none), so a pod takes no
request before its slots hold them."""

# ---------------------------------------------------------------------------------------------- kept prompt caches

SLOTS_DIR = "slots"
"""Below the root of a PersistentVolumeClaim cache: `slots/<server>/`, the saved prompt caches of one server."""
SLOTS_MOUNT = "/slots"
"""Where llama-server (--slot-save-path) and the drain sidecar mount their server's `slots/<server>/`."""
SLOT_FILE_SUFFIX = ".slot"


def router_slot_file(model: str, slot: int) -> str:
    """Router mode: the file of slot `slot` of the served model `model`, in that model's own slot directory
    (`slots/<server>/<model key>/`); the gateway and the drain sidecar save and restore by this name."""
    return f"{model}-{slot}{SLOT_FILE_SUFFIX}"

# ---------------------------------------------------------------------------------------------- RPC workers

RPC_WORKER_NAME = "llama-rpc-worker"
"""app.kubernetes.io/name of a distributed server's ggml-rpc-server pods (docs/distributed.md): not SERVER_NAME, so
the Service, the Deployment and the gateway never select a worker."""
RPC_WORKER_CONTAINER = "rpc-worker"
RPC_PORT = 50052
"""ggml-rpc-server's port (its default): the workers' headless Service and the leader's --rpc name it."""
RPC_WORKERS_ANNOTATION = f"{GROUP}/rpc-workers"
"""On the leader's pod template: which worker processes the leader connected to. A worker that restarts lost the
layers the leader sent it; the new value rolls the leader, which sends them again."""
