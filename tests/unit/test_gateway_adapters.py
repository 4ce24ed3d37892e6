"""LoRA adapters as model names: `<model>:<adapter>` routes to the server and gets llama-server's `lora` field.

The names a server with spec.adapters answers to, which adapter each selects, what /v1/models lists, the body
rewrite (pure), and the request path against a recording upstream (tests/unit/test_gateway_proxy.py's harness).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llama_operator.gateway.adapters import lora_member, with_adapter
from llama_operator.gateway.routing import RoutingTable
from llama_operator.gateway.scan import BadBody, scan
from tests.conftest import server_body

from .test_gateway_proxy import Harness, Upstream

ADAPTERS = [{"name": "pirate"}, {"name": "legal.v2", "scale": 0.5}]


def _adapted(name: str = "chat", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    spec.setdefault("adapters", ADAPTERS)
    body = server_body(name, **{k: v for k, v in spec.items() if v is not None})
    body["metadata"]["namespace"] = namespace
    return body


# ------------------------------------------------------------------------------------------ routing


def test_every_name_of_the_server_has_a_name_per_adapter() -> None:
    table = RoutingTable()
    table.upsert(_adapted(alias="assistant"))
    route = table.get("default/chat")
    assert route is not None and route.adapters == (("pirate", 1.0), ("legal.v2", 0.5))
    assert route.base_names == ("assistant", "default/chat")
    assert route.names == ("assistant", "default/chat", "assistant:pirate", "default/chat:pirate",
                           "assistant:legal.v2", "default/chat:legal.v2")
    for name in route.names:
        assert table.resolve(name).route is route, name
    assert [route.adapter(n) for n in route.names] == [None, None, (0, 1.0), (0, 1.0), (1, 0.5), (1, 0.5)]
    for unknown in ("assistant:nope", "qwen:pirate", "assistant:pirate:pirate", "pirate", ":pirate"):
        assert table.resolve(unknown).route is None, unknown
        assert route.adapter(unknown) is None, unknown


def test_a_model_name_with_a_colon_keeps_its_adapters_apart() -> None:
    """Static routes (`--upstream NAME=URL`) and status.modelName may hold ':'; adapter names never do."""
    table = RoutingTable()
    body = _adapted()
    body["status"] = {"modelName": "qwen:7b"}
    table.upsert(body)
    route = table.get("default/chat")
    assert route is not None
    assert route.adapter("qwen:7b") is None and route.adapter("qwen:7b:pirate") == (0, 1.0)
    assert table.resolve("qwen:7b:legal.v2").route is route
    assert table.resolve("qwen:pirate").route is None  # `qwen` is no name of the server


def test_a_base_name_that_looks_like_an_adapter_name_is_the_base() -> None:
    table = RoutingTable()
    body = _adapted(alias="qwen")
    body["status"] = {"modelName": "qwen:pirate"}  # a (contrived) model name: the server itself, no adapter
    table.upsert(body)
    route = table.get("default/chat")
    assert route is not None and route.adapter("qwen:pirate") is None and route.adapter("qwen:legal.v2") == (1, 0.5)
    assert table.public_names(route) == ("qwen:pirate", "qwen:pirate:pirate", "qwen:pirate:legal.v2")


def test_an_adapter_name_two_servers_answer_to_is_ambiguous() -> None:
    table = RoutingTable()
    table.upsert(_adapted("chat", "team-a"))
    table.upsert(_adapted("chat", "team-b"))
    resolution = table.resolve("qwen:pirate")
    assert resolution.route is None and {r.key for r in resolution.candidates} == {"team-a/chat", "team-b/chat"}
    route = table.resolve("team-b/chat:pirate").route
    assert route is not None and route.key == "team-b/chat" and route.adapter("team-b/chat:pirate") == (0, 1.0)
    assert table.public_names(route) == ("team-b/chat", "team-b/chat:pirate", "team-b/chat:legal.v2")


def test_public_names_list_the_model_then_each_adapter_in_order() -> None:
    table = RoutingTable()
    table.upsert(_adapted())
    table.upsert(server_body("plain", modelRef={"name": "bge"}))
    route = table.get("default/chat")
    assert route is not None and table.public_names(route) == ("qwen", "qwen:pirate", "qwen:legal.v2")
    assert table.known_names() == ["qwen", "qwen:pirate", "qwen:legal.v2", "bge"]
    assert [table.listed_name(route, n) for n in ("default/chat", "default/chat:legal.v2", "qwen:pirate")] == [
        "qwen", "qwen:legal.v2", "qwen:pirate"]


def test_an_adapter_name_another_server_serves_is_listed_by_the_key() -> None:
    table = RoutingTable()
    table.upsert(_adapted())
    other = server_body("other")
    other["status"] = {"modelName": "qwen:pirate"}
    table.upsert(other)
    route = table.get("default/chat")
    assert route is not None and table.public_names(route) == ("qwen", "default/chat:pirate", "qwen:legal.v2")


def test_router_mode_has_no_adapters() -> None:
    body = server_body("fleet", models=[{"modelRef": {"name": "alpha"}}], adapters=ADAPTERS)
    del body["spec"]["modelRef"]
    table = RoutingTable()
    table.upsert(body)  # the CRD refuses it: routed or not, no adapter name reaches the server
    route = table.get("default/fleet")
    assert route is None or route.adapters == ()
    assert table.resolve("alpha:pirate").route is None


# ------------------------------------------------------------------------------------------ the body rewrite


def test_the_scan_sees_a_top_level_lora_only() -> None:
    assert scan(b'{"model": "m", "lora": []}').lora
    assert not scan(b'{"model": "m", "x": {"lora": []}, "messages": [{"lora": 1}]}').lora


@pytest.mark.parametrize("raw", [
    b'{"model": "qwen:pirate"}',
    b' \n\t{ "model":"qwen:pirate","messages":[{"role":"user","content":"hi"}],"stream":true}\r\n',
    b'{"messages": [], "model": "qwen:pirate", "temperature": 0}',
])
@pytest.mark.parametrize(("chosen", "expected"), [((0, 1.0), [{"id": 0, "scale": 1.0}]),
                                                  ((7, 0.25), [{"id": 7, "scale": 0.25}]),
                                                  ((1, 100.0), [{"id": 1, "scale": 100.0}])])
def test_the_rewrite_adds_lora_and_keeps_the_rest(raw: bytes, chosen: tuple[int, float],
                                                  expected: list[dict[str, Any]]) -> None:
    data = bytearray(raw)
    with_adapter(data, scan(data), chosen)
    parsed = json.loads(data)
    assert parsed.pop("lora") == expected
    assert parsed == json.loads(raw)  # `model` included, unchanged
    assert list(json.loads(data)) == ["lora", *json.loads(raw)]  # first member: nothing else moved
    assert scan(data).lora and scan(data).model == "qwen:pirate"


def test_the_member_is_compact_json() -> None:
    assert lora_member(0, 1.0) == b'"lora":[{"id":0,"scale":1.0}],'


def test_a_body_with_its_own_lora_is_refused_in_one_line() -> None:
    data = bytearray(b'{"model": "qwen:pirate", "lora": [{"id": 1, "scale": 2}]}')
    before = bytes(data)
    with pytest.raises(BadBody) as caught:
        with_adapter(data, scan(data), (0, 1.0))
    assert str(caught.value) == ("The model 'qwen:pirate' names the adapter pirate; a request for it carries no "
                                 "'lora' field (ask for 'qwen' to set adapters yourself).")
    assert caught.value.param == "lora" and bytes(data) == before


# ------------------------------------------------------------------------------------------ through the gateway


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    made = Upstream()
    await made.start()
    yield made
    assert made.runner is not None
    await made.runner.cleanup()


def _sent(upstream: Upstream) -> dict[str, Any]:
    seen = upstream.requests[-1]
    assert int(seen["headers"]["Content-Length"]) == len(seen["body"])
    return dict(json.loads(seen["body"]))


async def test_a_request_for_an_adapter_gets_its_lora_field(gw: Harness, upstream: Upstream) -> None:
    gw.routes.upsert(_adapted(routing={"strategy": "PrefixAffinity"}))  # affinity reads the body before the rewrite
    gw.slices("chat", [upstream])
    for model, lora in (("qwen:legal.v2", [{"id": 1, "scale": 0.5}]), ("default/chat:pirate", [{"id": 0,
                                                                                                  "scale": 1.0}])):
        async with await gw.post(model, temperature=0) as response:
            assert response.status == 200
        assert _sent(upstream) == {"lora": lora, "model": model, "messages": [{"role": "user", "content": "hi"}],
                                   "temperature": 0}


async def test_the_model_itself_gets_every_adapter_off_explicitly_unless_it_sets_lora(gw: Harness,
                                                                                     upstream: Upstream) -> None:
    """llama-server keeps an adapter's prompt cache for a request without `lora` (gateway/adapters.py): a request
    for the base model says `lora` explicitly; a client's own `lora` goes on unchanged."""
    gw.routes.upsert(_adapted())
    gw.slices("chat", [upstream])
    assert gw.client is not None
    for raw, sent in ((b'{"model": "qwen", "prompt": "x"}', b'{"lora":[{"id":0,"scale":0.0}],"model": "qwen", '
                                                             b'"prompt": "x"}'),
                      (b'{"model": "qwen", "lora": [{"id": 1, "scale": 2}]}', None)):
        async with gw.client.post(f"{gw.url}/v1/completions", data=raw,
                                  headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
        assert upstream.requests[-1]["body"] == (sent or raw)


async def test_a_server_without_adapters_gets_the_body_byte_for_byte(gw: Harness, upstream: Upstream) -> None:
    gw.routes.upsert(_adapted(adapters=None))
    gw.slices("chat", [upstream])
    assert gw.client is not None
    raw = b'{"model": "qwen", "prompt": "x"}'
    async with gw.client.post(f"{gw.url}/v1/completions", data=raw,
                              headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert upstream.requests[-1]["body"] == raw


async def test_an_adapter_request_with_its_own_lora_is_400(gw: Harness, upstream: Upstream) -> None:
    gw.routes.upsert(_adapted(replicas=0, scaling={"minReplicas": 0}))
    async with await gw.post("qwen:pirate", lora=[{"id": 0, "scale": 1}]) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error == {"message": "The model 'qwen:pirate' names the adapter pirate; a request for it carries no "
                                "'lora' field (ask for 'qwen' to set adapters yourself).",
                     "type": "invalid_request_error", "param": "lora", "code": "invalid_lora"}
    assert gw.kicks == 0 and upstream.requests == []  # refused before it could wake the server


async def test_models_list_the_model_and_each_adapter(gw: Harness, upstream: Upstream) -> None:
    gw.routes.upsert(_adapted(alias="assistant"))
    gw.slices("chat", [upstream])
    assert gw.client is not None
    async with gw.client.get(f"{gw.url}/v1/models") as response:
        listing = (await response.json())["data"]
    assert [(m["id"], m["aliases"], m["llamaserver"], m["state"]) for m in listing] == [
        ("assistant", ["assistant", "default/chat"], "chat", "ready"),
        ("assistant:pirate", ["assistant:pirate", "default/chat:pirate"], "chat", "ready"),
        ("assistant:legal.v2", ["assistant:legal.v2", "default/chat:legal.v2"], "chat", "ready")]
    for asked, listed in (("assistant:pirate", "assistant:pirate"), ("default/chat:legal.v2", "assistant:legal.v2"),
                          ("default/chat", "assistant")):
        async with gw.client.get(f"{gw.url}/v1/models/{asked}") as response:
            assert response.status == 200 and (await response.json())["id"] == listed, asked
    async with gw.client.get(f"{gw.url}/v1/models/assistant:nope") as response:
        assert response.status == 404
        assert "Known models: assistant, assistant:pirate, assistant:legal.v2." in (await response.json())[
            "error"]["message"]
