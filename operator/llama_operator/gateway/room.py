"""Memory-budgeted router mode, the I/O around budget.py: make room on one replica before a request goes to it.

For a request naming a model of a router-mode server with a memory budget, `MemoryKeeper.admit` runs before
the request is sent to the chosen replica:
- the request counts as in flight for (replica, model) from the start, so no concurrent decision unloads the
  model under it;
- `GET /models` on the replica says what is loaded (or loading); a model already there goes at once;
- otherwise, one decision at a time per replica (a lock): `budget.make_room` picks the least recently used idle
  models to unload, `POST /models/unload` each, wait until the replica reports them gone, then `POST
  /models/load` the new one and wait until it is no longer loading, so the next decision sees its memory;
- a model larger than the budget is refused with the numbers; when busy models hold the memory, the decision
  is retried until WAIT_SECONDS pass, then the request is refused as busy (503, retry later).
Every read from the replica is bounded (MAX_MODELS_BYTES, REQUEST_SECONDS). `done` ends the request's in-flight
mark and records its last use.

For a server that keeps its prompt caches (spec.promptCache.persist, `slots=True`), every unload the gateway makes
(for the budget or the admin API) is preceded by a save of the model's slots, and every load it makes is followed by
a restore, through llama-server's slot API on the router (`POST /slots/<i>?action=save|restore`, the body's
`model` picking the instance, `autoload=false` so that a save never loads a model). Slot i of a model is always
the file `<served name>-<i>.slot`, in the model's own directory (the preset gives each model the `slot-save-path`
`/slots/<model key>`): the gateway needs no listing of the files, a restore never crosses models, and the files
are bounded by the slots of each model (a save replaces the previous one). A save or restore that fails is logged
and skipped: the unload or the request goes on, cold.

A server with an API key (spec.apiKeySecretRef) guards every one of these paths with it (llama-server's only public
paths are /health and /v1/health): each call carries `auth`, the headers that hold the key — for a request, the
client's own Authorization or X-Api-Key (`auth_headers`), which the replica accepts since it accepts the request;
for the admin API, the key its caller gave (models_admin.py). The gateway holds no key and reads no Secret. A
replica that answers 401 refuses the key: RoomError 401, not a failed replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..contract import router_slot_file as slot_file
from .budget import Resident, Room, make_room

log = logging.getLogger(__name__)

MAX_MODELS_BYTES = 1 << 20
"""Largest GET /models answer read from a replica (its image is the tenant's: untrusted)."""
REQUEST_SECONDS = 5.0
"""Timeout of one call to a replica's /models endpoints."""
WAIT_SECONDS = 60.0
"""How long a request waits for unloads, a load, or busy models to finish."""
POLL_SECONDS = 0.1
MAX_TRACKED = 4096
"""(replica, model) pairs remembered; past this the idle ones used longest ago are forgotten (replicas come
and go with their pod addresses)."""
RESIDENT_STATES = frozenset({"loaded", "loading"})
SLOT_SECONDS = 60.0
"""Timeout of one slot save or restore (a long context's state at disk speed)."""
MAX_SLOTS = 256
"""The API's bound on a model's parallel slots."""


AUTH_HEADERS = ("Authorization", "X-Api-Key")
"""The headers llama-server reads an API key from (server-http.cpp: Authorization: Bearer, else X-Api-Key)."""
Auth = Mapping[str, str] | None
"""Headers carrying the server's API key to the replica, or None (a server without a key)."""


def auth_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The API key headers of a client's request, to send on the gateway's own calls made for it."""
    return {name: headers[name] for name in AUTH_HEADERS if name in headers}


class RoomError(Exception):
    """The request cannot go to this replica now: one line for the client; `status` 400 (never fits) or 503;
    `replica_failed`: the replica did not answer properly (the caller may go to another one)."""

    def __init__(self, status: int, message: str, *, replica_failed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.replica_failed = replica_failed


def _unauthorized(path: str) -> RoomError:
    return RoomError(401, f"the replica refused {path}: it needs the server's API key (spec.apiKeySecretRef)")


@dataclass
class _Use:
    in_flight: int = 0
    last_used: float = 0.0


class MemoryKeeper:
    """Per replica: the gateway's record of each model's use, and one budget decision at a time."""

    def __init__(self, *, wait_seconds: float = WAIT_SECONDS) -> None:
        self.wait_seconds = wait_seconds
        self._use: dict[tuple[str, str], _Use] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _mark(self, url: str, model: str) -> _Use:
        return self._use.setdefault((url, model), _Use())

    def done(self, url: str, model: str) -> None:
        use = self._mark(url, model)
        use.in_flight = max(0, use.in_flight - 1)
        use.last_used = time.monotonic()

    async def admit(self, session: aiohttp.ClientSession, url: str, model: str, budget: int,
                    estimates: Mapping[str, int], *, slots: bool = False, max_loaded: int | None = None,
                    auth: Auth = None) -> None:
        """Make room for `model` on the replica at `url`; raises RoomError. On success (or RoomError) the caller
        must call `done(url, model)` once the request ends. `slots`: save the slots of what is unloaded, restore
        those of what is loaded; a model without an estimate is then loaded by the gateway too (`max_loaded`:
        llama-server's --models-max, the count it would evict beyond). `auth`: the API key headers of every call."""
        if len(self._use) >= MAX_TRACKED:
            self._forget()
        use = self._mark(url, model)
        use.in_flight += 1
        use.last_used = time.monotonic()
        if model not in estimates:
            if slots:
                await self._load_keeping_slots(session, url, model, max_loaded, auth)
            return  # no estimate: llama-server's count limit (--models-max) is the only bound
        if model in await self._resident(session, url, auth):
            return
        lock = self._locks.setdefault(url, asyncio.Lock())
        deadline = time.monotonic() + self.wait_seconds
        async with lock:
            while True:
                resident = await self._resident(session, url, auth)
                if model in resident:
                    return
                room = self.decide(url, resident, budget, model, estimates)
                if room.refused is not None:
                    raise RoomError(400, room.refused)
                if room.fits:
                    break
                if time.monotonic() > deadline:
                    raise RoomError(503, f"model {model} does not fit beside the busy models "
                                         f"{', '.join(room.busy)} in the memory budget; retry later")
                await asyncio.sleep(POLL_SECONDS)
            for name in room.unload:
                log.info("replica %s: unloading %s to make room for %s", url, name, model)
                if slots:
                    await self.save_slots(session, url, name, auth)
                await self._post(session, url, "unload", name, auth)
            await self._until(session, url, lambda states: not set(room.unload) & states.keys(), deadline, auth)
            await self._post(session, url, "load", model, auth)
            # Loaded, or no longer loading (it failed: the request goes on and gets llama-server's own answer).
            await self._until(session, url, lambda states: states.get(model) != "loading", deadline, auth)
            if slots:
                await self.restore_slots(session, url, model, auth)

    async def load(self, session: aiohttp.ClientSession, url: str, model: str, budget: int | None,
                   estimates: Mapping[str, int], *, slots: bool = False, max_loaded: int | None = None,
                   auth: Auth = None) -> None:
        """Load `model` on the replica at `url` for an operator (models_admin.py): with a memory budget and an
        estimate, as a request for it would (room made first); else llama-server's own load. RoomError when it
        is not loaded in the end."""
        if budget is not None and model in estimates:
            try:
                await self.admit(session, url, model, budget, estimates, slots=slots, max_loaded=max_loaded,
                                 auth=auth)
            finally:
                self.done(url, model)
        elif slots:
            await self._load_keeping_slots(session, url, model, max_loaded, auth)
        elif model not in await self._resident(session, url, auth):
            await self._post(session, url, "load", model, auth)
            await self._until(session, url, lambda states: states.get(model) != "loading",
                              time.monotonic() + self.wait_seconds, auth)
        if model not in await self._resident(session, url, auth):
            raise RoomError(502, "llama-server did not load it (the server's status.models says why)")
        self._mark(url, model).last_used = time.monotonic()

    async def unload(self, session: aiohttp.ClientSession, url: str, model: str, *, slots: bool = False,
                     auth: Auth = None) -> None:
        """Unload `model` from the replica at `url` for an operator; refused (409) while requests of this gateway
        replica are in flight on it, since llama-server would cut them."""
        use = self._use.get((url, model))
        if use is not None and use.in_flight:
            raise RoomError(409, f"{use.in_flight} request(s) through this gateway are in flight on it; retry")
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:  # not in the middle of a budget decision on this replica
            if model in await self._resident(session, url, auth):
                if slots:
                    await self.save_slots(session, url, model, auth)
                await self._post(session, url, "unload", model, auth)
                await self._until(session, url, lambda states: model not in states,
                                  time.monotonic() + self.wait_seconds, auth)

    async def _load_keeping_slots(self, session: aiohttp.ClientSession, url: str, model: str,
                                  max_loaded: int | None, auth: Auth = None) -> None:
        """A server keeping its prompt caches, a model without a memory estimate: the gateway loads it itself
        (llama-server would load it on the request, with nothing restored) and restores its slots. When
        llama-server's count limit would evict a model for it, the gateway first saves and unloads the least
        recently used idle ones itself (llama-server's own eviction saves nothing); with none idle, llama-server
        decides."""
        if model in await self._resident(session, url, auth):
            return
        deadline = time.monotonic() + self.wait_seconds
        async with self._locks.setdefault(url, asyncio.Lock()):
            resident = await self._resident(session, url, auth)
            if model in resident:
                return
            if max_loaded and len(resident) >= max_loaded:
                idle = sorted((self._use.get((url, name), _Use()).last_used, name) for name in resident
                              if not self._use.get((url, name), _Use()).in_flight)
                unload = [name for _, name in idle[:len(resident) - max_loaded + 1]]
                for name in unload:
                    log.info("replica %s: unloading %s for %s (at most %d loaded)", url, name, model, max_loaded)
                    await self.save_slots(session, url, name, auth)
                    await self._post(session, url, "unload", name, auth)
                await self._until(session, url, lambda states: not set(unload) & states.keys(), deadline, auth)
            await self._post(session, url, "load", model, auth)
            await self._until(session, url, lambda states: states.get(model) != "loading", deadline, auth)
            await self.restore_slots(session, url, model, auth)

    async def save_slots(self, session: aiohttp.ClientSession, url: str, model: str, auth: Auth = None) -> str:
        """Every slot of `model` on the replica into its file (`slot_file`); never raises: what was done."""
        return await self._slots(session, url, model, "save", auth)

    async def restore_slots(self, session: aiohttp.ClientSession, url: str, model: str, auth: Auth = None) -> str:
        """Every slot of `model` from its file, where there is one; never raises: what was done."""
        return await self._slots(session, url, model, "restore", auth)

    async def _slots(self, session: aiohttp.ClientSession, url: str, model: str, action: str, auth: Auth) -> str:
        count = await self._slot_count(session, url, model, auth)
        if count is None:
            outcome = f"{model}: no slots {action}d (the replica did not tell its slot count)"
            log.warning("replica %s: %s", url, outcome)
            return outcome
        done, tokens = 0, 0
        query = f"action={action}&autoload=false"
        for slot in range(count):
            try:
                async with session.post(f"{url}/slots/{slot}?{query}",
                                        json={"model": model, "filename": slot_file(model, slot)}, headers=auth,
                                        timeout=aiohttp.ClientTimeout(total=SLOT_SECONDS)) as answer:
                    data = await answer.content.read(4096)
                    ok = answer.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("replica %s: slot %d of %s not %sd: %s", url, slot, model, action, type(exc).__name__)
                continue
            if not ok:  # a restore of a slot never saved: no file, answered 4xx/5xx
                log.debug("replica %s: slot %d of %s not %sd: %s", url, slot, model, action, data[:200])
                continue
            try:
                answer_json = json.loads(data)
                tokens += int(answer_json.get("n_saved" if action == "save" else "n_restored", 0))
            except (ValueError, TypeError, AttributeError):
                pass
            done += 1
        outcome = f"{model}: {action}d {done} of {count} slot(s), {tokens} tokens"
        log.info("replica %s: %s", url, outcome)
        return outcome

    async def _slot_count(self, session: aiohttp.ClientSession, url: str, model: str, auth: Auth) -> int | None:
        try:
            async with session.get(f"{url}/props", params={"model": model, "autoload": "false"}, headers=auth,
                                   timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS)) as answer:
                data = await answer.content.read(MAX_MODELS_BYTES + 1)
                status = answer.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        try:
            value = json.loads(data).get("total_slots") if status == 200 and len(data) <= MAX_MODELS_BYTES else None
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, int) and 1 <= value <= MAX_SLOTS else None

    def _forget(self) -> None:
        idle = sorted((use.last_used, key) for key, use in self._use.items() if not use.in_flight)
        for _, key in idle[:len(idle) // 2 + 1]:
            del self._use[key]
        urls = {url for url, _ in self._use}
        for url in [u for u, lock in self._locks.items() if u not in urls and not lock.locked()]:
            del self._locks[url]

    def decide(self, url: str, resident: Mapping[str, str], budget: int, model: str,
               estimates: Mapping[str, int]) -> Room:
        residents = []
        for name in resident:
            use = self._use.get((url, name), _Use())
            # A model without an estimate (left over from an older spec) is unloaded first when idle.
            residents.append(Resident(name, estimates.get(name, budget), use.last_used, use.in_flight))
        return make_room(residents, budget, model, estimates[model])

    async def _until(self, session: aiohttp.ClientSession, url: str, test: Any, deadline: float,
                     auth: Auth = None) -> None:
        while not test(await self._resident(session, url, auth)):
            if time.monotonic() > deadline:
                raise RoomError(503, "the replica did not load or unload models in time; retry later")
            await asyncio.sleep(POLL_SECONDS)

    async def _post(self, session: aiohttp.ClientSession, url: str, action: str, model: str,
                    auth: Auth = None) -> None:
        try:
            async with session.post(f"{url}/models/{action}", json={"model": model}, headers=auth,
                                    timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS)) as answer:
                await answer.content.read(4096)
                status = answer.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RoomError(503, f"the replica did not answer /models/{action}: {type(exc).__name__}",
                            replica_failed=True) from exc
        if status == 401:
            raise _unauthorized(f"/models/{action}")

    async def _resident(self, session: aiohttp.ClientSession, url: str, auth: Auth = None) -> dict[str, str]:
        """The replica's models that hold memory (loaded or loading), with their states."""
        try:
            async with session.get(f"{url}/models", headers=auth,
                                   timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS)) as answer:
                data = await answer.content.read(MAX_MODELS_BYTES + 1)
                status = answer.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RoomError(503, f"the replica did not answer /models: {type(exc).__name__}",
                            replica_failed=True) from exc
        if status == 401:
            raise _unauthorized("/models")
        if len(data) > MAX_MODELS_BYTES:
            raise RoomError(503, "the replica's /models answer is larger than 1 MiB", replica_failed=True)
        return resident_states(data)


def resident_states(data: bytes) -> dict[str, str]:
    """Name -> state of the models of a /models answer that hold memory; RoomError when it is not a model list."""
    try:
        models = json.loads(data)["data"]
        states = {str(m["id"]): str(m["status"]["value"]) for m in models}
    except (ValueError, KeyError, TypeError) as exc:
        raise RoomError(503, "the replica's /models answer is not a model list", replica_failed=True) from exc
    return {name: state for name, state in states.items() if state in RESIDENT_STATES}
