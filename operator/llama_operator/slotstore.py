"""The kept prompt caches of one server, as its drain sidecar handles them: the directory of saved slot files
(`--slots-dir`, the server's `slots/<server>/` on the model's claim) and llama-server's slot API.

A file is `<model key>-<unix ms>-<pod>-<slot>.slot`. At start the newest files of this model's key are restored,
one per slot; at drain every slot is saved under a new name; then the directory is pruned, oldest first, to
`--slots-max-bytes`. Files of another key (the server's previous model) are never restored: pruning deletes them.
llama-server writes and reads the files itself (`--slot-save-path`); this side lists and deletes them.
Router mode (`--model-keys`): a directory per model key, files by served name and slot, saved at drain for every
loaded model and restored by the gateway when it loads one (`RouterSlotDirectory`, `save_router`).

Standard library only, bounded: files listed, bytes read from llama-server, each call's time.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .contract import API_KEY_ENV, SLOT_FILE_SUFFIX, first_key, router_slot_file

log = logging.getLogger("llama_operator.drain")

MAX_FILES = 4096
"""Directory entries looked at; a server saves at most its slot count per drain, and pruning keeps it small."""
MAX_ANSWER = 1 << 20
"""Bytes read from a llama-server answer (/props carries the chat template: tens of KiB)."""
MAX_SLOTS = 256
"""The API's bound on spec.parallel."""
_NAME = re.compile(r"^(?P<key>[0-9a-f]{16})-(?P<ms>[0-9]{1,15})-(?P<pod>[a-z0-9-]{1,63})-(?P<slot>[0-9]{1,3})"
                   + re.escape(SLOT_FILE_SUFFIX) + "$")


def authorization() -> dict[str, str]:
    """The header that carries the server's API key (the pod gives the sidecar its Secret, spec.apiKeySecretRef):
    llama-server guards /metrics, /props and /slots with it. Empty without a key. The Secret may hold several
    keys, comma-separated, as llama-server's --api-key takes them: one of them goes in the header."""
    key = first_key(os.environ.get(API_KEY_ENV, ""))
    return {"Authorization": f"Bearer {key}"} if key else {}


class SlotApiError(Exception):
    """llama-server refused or did not answer a slot call."""


@dataclass(frozen=True)
class SlotFile:
    name: str
    key: str
    stamp_ms: int
    size: int


def pod_tag(hostname: str) -> str:
    """The pod's name (the container's hostname) as it may appear in a file name."""
    return re.sub(r"[^a-z0-9-]", "-", hostname.lower())[:63].strip("-") or "pod"


class SlotDirectory:
    """The saved slot files of one server, for the model whose key is `key`."""

    def __init__(self, path: Path, key: str, max_bytes: int, pod: str) -> None:
        self.path, self.key, self.max_bytes, self.pod = path, key, max_bytes, pod_tag(pod)

    def files(self) -> list[SlotFile]:
        """The slot files there, newest first (at most MAX_FILES entries looked at; others' names are ignored)."""
        found = []
        try:
            with os.scandir(self.path) as entries:
                for count, entry in enumerate(entries):
                    if count >= MAX_FILES:
                        log.warning("more than %d entries in %s: the rest are not looked at", MAX_FILES, self.path)
                        break
                    match = _NAME.match(entry.name)
                    if match and entry.is_file(follow_symlinks=False):
                        found.append(SlotFile(entry.name, match["key"], int(match["ms"]),
                                              entry.stat(follow_symlinks=False).st_size))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.path, exc.strerror)
        return sorted(found, key=lambda f: (f.stamp_ms, f.name), reverse=True)

    def to_restore(self, slots: int) -> list[str]:
        """The newest files of this model, at most one per slot."""
        return [f.name for f in self.files() if f.key == self.key][:max(0, slots)]

    def new_name(self, slot: int, now_ms: int | None = None) -> str:
        stamp = int(time.time() * 1000) if now_ms is None else now_ms
        return f"{self.key}-{stamp}-{self.pod}-{slot}{SLOT_FILE_SUFFIX}"

    def prune(self) -> int:
        """Delete another model's files, and this model's oldest until the rest fit max_bytes; the bytes deleted."""
        files = sorted(self.files(), key=lambda f: (f.key == self.key, f.stamp_ms), reverse=True)
        kept, deleted = 0, 0
        for each in files:
            if each.key == self.key and kept + each.size <= self.max_bytes:
                kept += each.size
                continue
            try:
                (self.path / each.name).unlink()
                deleted += each.size
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete %s: %s", each.name, exc.strerror)
        return deleted

    def forget(self, name: str) -> None:
        """Delete one file (a save that recorded nothing)."""
        try:
            (self.path / name).unlink()
        except OSError:
            pass


class SlotApi:
    """llama-server's slot calls: /props for the slot count, POST /slots/<id>?action=save|restore. With `model`
    (router mode) every call names that model's instance (`?model=` / the body's `model`) with autoload=false: a
    call never loads a model."""

    def __init__(self, base: str, model: str | None = None) -> None:
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.model = model

    def for_model(self, model: str) -> SlotApi:
        api = SlotApi(f"http://{self.host}:{self.port}", model)
        return api

    def _query(self, **params: str) -> str:
        if self.model is not None:
            params = {**params, "model": self.model, "autoload": "false"}
        return urllib.parse.urlencode(params)

    def _body(self, filename: str) -> dict[str, str]:
        return {"filename": filename, **({"model": self.model} if self.model is not None else {})}

    def _call(self, method: str, path: str, body: dict[str, str] | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json", **authorization()}
        connection = http.client.HTTPConnection(self.host, self.port, timeout=max(0.1, timeout))
        try:
            connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER)
        except (OSError, http.client.HTTPException) as exc:
            raise SlotApiError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if response.status != 200 or not isinstance(answer, dict):
            detail = answer.get("error", {}).get("message", "") if isinstance(answer, dict) else ""
            raise SlotApiError(f"{method} {path} answered {response.status} {str(detail)[:200]}".rstrip())
        return answer

    def total_slots(self, timeout: float = 5.0) -> int:
        query = self._query()
        value = self._call("GET", f"/props?{query}" if query else "/props", None, timeout).get("total_slots")
        if not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
            raise SlotApiError(f"/props has no usable total_slots ({str(value)[:20]})")
        return value

    def save(self, slot: int, filename: str, timeout: float) -> int:
        """Tokens saved."""
        answer = self._call("POST", f"/slots/{slot}?{self._query(action='save')}", self._body(filename), timeout)
        return int(answer.get("n_saved", 0))

    def restore(self, slot: int, filename: str, timeout: float) -> int:
        """Tokens restored."""
        answer = self._call("POST", f"/slots/{slot}?{self._query(action='restore')}", self._body(filename), timeout)
        return int(answer.get("n_restored", 0))

    def loaded_models(self, timeout: float = 5.0) -> list[str]:
        """Router mode: the models loaded now (GET /models)."""
        models = self._call("GET", "/models", None, timeout).get("data")
        if not isinstance(models, list):
            raise SlotApiError("/models is not the router's model list")
        return [str(m["id"]) for m in models[:MAX_SLOTS] if isinstance(m, dict) and "id" in m
                and isinstance(m.get("status"), dict) and m["status"].get("value") == "loaded"]

    def healthy(self) -> bool:
        try:
            self._call("GET", "/health", None, 2.0)
            return True
        except SlotApiError:
            return False


RESTORE_TIMEOUT = 120.0
"""Seconds one restore may take (a file of a long context on a slow claim: GiB at disk speed)."""


def restore_all(directory: SlotDirectory, api: SlotApi, *, poll: float = 0.5,
                sleep: Callable[[float], None] = time.sleep) -> str:
    """Once llama-server is healthy, the newest saved files of this model into its slots, one each: what was done.
    A file that cannot be restored is skipped (llama-server checks it: a file of another build is refused)."""
    while not api.healthy():
        sleep(poll)
    try:
        names = directory.to_restore(api.total_slots())
    except SlotApiError as exc:
        return f"nothing restored: {exc}"
    restored, tokens = 0, 0
    for slot, name in enumerate(names):
        try:
            tokens += api.restore(slot, name, RESTORE_TIMEOUT)
            restored += 1
        except SlotApiError as exc:
            log.warning("slot %d: %s not restored: %s", slot, name, exc)
    return f"restored {restored} of {len(names)} saved slot(s), {tokens} tokens"


def save_all(directory: SlotDirectory, api: SlotApi, deadline: float, *,
             clock: Callable[[], float] = time.monotonic) -> str:
    """Every slot's prompt cache into a new file, while time is left before `deadline` (llama-server is idle
    by then: a busy slot's save would wait for it); then the directory pruned. What was done."""
    try:
        total = api.total_slots(timeout=max(0.1, min(5.0, deadline - clock())))
    except SlotApiError as exc:
        return f"nothing saved: {exc}"
    saved, tokens = 0, 0
    for slot in range(total):
        left = deadline - clock()
        if left < 0.5:
            log.warning("no time left to save slots %d-%d", slot, total - 1)
            break
        name = directory.new_name(slot)
        try:
            count = api.save(slot, name, left)
        except SlotApiError as exc:
            log.warning("slot %d not saved: %s", slot, exc)
            directory.forget(name)
            continue
        if count == 0:
            directory.forget(name)  # an unused slot: nothing to restore
        else:
            saved, tokens = saved + 1, tokens + count
    deleted = directory.prune()
    return f"saved {saved} slot(s), {tokens} tokens; pruned {deleted} bytes"


class RouterSlotDirectory:
    """Router mode: the server's directory holds one directory per model key (`<key>/`, that model's
    slot-save-path), and in each `<served name>-<slot>.slot` files that every save replaces (gateway/room.py and
    `save_router` write them by name). Pruning deletes the files of keys this server no longer serves (a model
    revision, a removed entry) but never a directory (a pod of the previous revision may still run with it as
    its slot-save-path), then the oldest files (by modification time) until the rest fit max_bytes."""

    def __init__(self, path: Path, keys: list[str], max_bytes: int) -> None:
        self.path, self.keys, self.max_bytes = path, list(keys), max_bytes

    def files(self) -> list[tuple[float, int, Path, str]]:
        """(mtime, size, path, key) of the slot files of every key directory, at most MAX_FILES looked at."""
        found: list[tuple[float, int, Path, str]] = []
        try:
            with os.scandir(self.path) as directories:
                for directory in directories:
                    if not (re.fullmatch(r"[0-9a-f]{16}", directory.name)
                            and directory.is_dir(follow_symlinks=False)):
                        continue
                    with os.scandir(directory.path) as entries:
                        for entry in entries:
                            if len(found) >= MAX_FILES:
                                log.warning("more than %d files in %s: the rest are not looked at", MAX_FILES,
                                            self.path)
                                return found
                            if entry.name.endswith(SLOT_FILE_SUFFIX) and entry.is_file(follow_symlinks=False):
                                stat = entry.stat(follow_symlinks=False)
                                found.append((stat.st_mtime, stat.st_size, Path(entry.path), directory.name))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.path, exc.strerror)
        return found

    def prune(self) -> int:
        """Delete the files of other keys, and the oldest until the rest fit max_bytes; the bytes deleted."""
        files = sorted(self.files(), key=lambda f: (f[3] in self.keys, f[0]), reverse=True)
        kept, deleted = 0, 0
        for _, size, path, key in files:
            if key in self.keys and kept + size <= self.max_bytes:
                kept += size
                continue
            try:
                path.unlink()
                deleted += size
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete %s: %s", path, exc.strerror)
        return deleted


def save_router(directory: RouterSlotDirectory, api: SlotApi, deadline: float, *,
                clock: Callable[[], float] = time.monotonic) -> str:
    """Router mode, at the pod's stop: every slot of every loaded model into its file (`router_slot_file`, in
    that model's directory: llama-server's per-model slot-save-path), while time is left; then the directory
    pruned. Restores happen when the gateway loads a model (gateway/room.py), not here: a router loads its
    models on demand. What was done."""
    try:
        models = api.loaded_models(timeout=max(0.1, min(5.0, deadline - clock())))
    except SlotApiError as exc:
        return f"nothing saved: {exc}"
    saved, tokens = 0, 0
    for model in models:
        one = api.for_model(model)
        try:
            total = one.total_slots(timeout=max(0.1, min(5.0, deadline - clock())))
        except SlotApiError as exc:
            log.warning("%s: slots not saved: %s", model, exc)
            continue
        for slot in range(total):
            left = deadline - clock()
            if left < 0.5:
                log.warning("no time left to save %s's slots %d-%d", model, slot, total - 1)
                break
            try:
                count = one.save(slot, router_slot_file(model, slot), left)
            except SlotApiError as exc:
                log.warning("%s: slot %d not saved: %s", model, slot, exc)
                continue
            if count:
                saved, tokens = saved + 1, tokens + count
    deleted = directory.prune()
    return f"saved {saved} slot(s) of {len(models)} loaded model(s), {tokens} tokens; pruned {deleted} bytes"
