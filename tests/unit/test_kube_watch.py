"""A watch's event stream (kube/watch.py) over a fake client: events in order, an ERROR event as Unavailable with
its code, and an early close, also when the reading thread has already let the connection go."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llama_operator.errors import Unavailable
from llama_operator.kube.watch import watch_events


class Response:
    """What urllib3 hands the client: a stream of chunks; `shutdown` after `release_conn` raises, as urllib3 does."""

    def __init__(self, events: list[dict[str, Any]], *, hold: bool = False) -> None:
        self.status, self.reason = 200, "OK"
        self.chunks = [json.dumps(event).encode() + b"\n" for event in events]
        self.hold = threading.Event() if hold else None
        self.released = self.shut = False

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        yield from self.chunks
        if self.hold is not None:
            self.hold.wait(10)
            raise OSError("shut down")

    def release_conn(self) -> None:
        self.released = True

    def shutdown(self) -> None:
        if self.released:
            raise RuntimeError("Cannot shutdown as connection has already been released to the pool")
        self.shut = True
        if self.hold is not None:
            self.hold.set()


class Api:
    def __init__(self, response: Response) -> None:
        self.raw = response

    def param_serialize(self, **kwargs: Any) -> tuple[Any, str, dict[str, str], Any, Any]:
        return None, kwargs["resource_path"], kwargs["header_params"], None, None

    def call_api(self, method: str, url: str, **kwargs: Any) -> Any:
        return type("Wrapped", (), {"response": self.raw})()


async def test_events_in_order_then_the_end_of_the_watch() -> None:
    events = [{"type": "ADDED", "object": {"metadata": {"name": "a"}}},
              {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}}]
    got = [e async for e in watch_events(Api(Response(events)), "/x", [], 5)]  # type: ignore[arg-type]
    assert got == [("ADDED", {"metadata": {"name": "a"}}), ("BOOKMARK", {"metadata": {"resourceVersion": "7"}})]


async def test_a_too_old_version_is_unavailable_410_even_when_the_connection_is_already_released() -> None:
    response = Response([{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}])
    with pytest.raises(Unavailable) as raised:
        async for _ in watch_events(Api(response), "/x", [], 5):  # type: ignore[arg-type]
            pass
    assert raised.value.status == 410 and "too old" in str(raised.value)


async def test_leaving_early_shuts_the_connection_down() -> None:
    response = Response([{"type": "ADDED", "object": {}}], hold=True)
    events = watch_events(Api(response), "/x", [], 5)  # type: ignore[arg-type]
    assert (await anext(events))[0] == "ADDED"
    await events.aclose()
    assert response.shut
