"""The gateway's routing table knows router-mode servers: each served model's name reaches the one LlamaServer."""

from __future__ import annotations

from llama_operator.gateway.routing import RoutingTable
from tests.conftest import server_body


def _router(name: str = "fleet", namespace: str = "default") -> dict:
    body = server_body(name, models=[{"modelRef": {"name": "alpha"}}, {"modelRef": {"name": "beta"}, "alias": "bee"}],
                       maxLoaded=1)
    del body["spec"]["modelRef"]
    body["metadata"]["namespace"] = namespace
    body["status"] = {"modelName": "alpha, bee", "readyReplicas": 1}
    return body


def test_every_served_model_resolves_to_the_router_server() -> None:
    table = RoutingTable()
    table.upsert(_router())
    table.upsert(server_body("solo"))  # serves qwen
    for model in ("alpha", "bee", "default/fleet"):
        resolution = table.resolve(model)
        assert resolution.route is not None and resolution.route.key == "default/fleet", model
    route = table.get("default/fleet")
    assert route is not None and route.models == ("alpha", "bee") and route.model_name == "alpha"
    assert table.resolve("alpha, bee").route is None  # status.modelName of a router server is not a model
    assert table.resolve("qwen").route is not None and table.resolve("qwen").route.key == "default/solo"


def test_a_model_name_two_servers_serve_is_ambiguous() -> None:
    table = RoutingTable()
    table.upsert(_router("fleet", "team-a"))
    table.upsert(_router("fleet", "team-b"))
    resolution = table.resolve("bee")
    assert resolution.route is None and {r.key for r in resolution.candidates} == {"team-a/fleet", "team-b/fleet"}


def test_a_router_server_is_known_by_each_of_its_models() -> None:
    table = RoutingTable()
    table.upsert(_router())
    table.upsert(server_body("solo"))
    route = table.get("default/fleet")
    assert route is not None and table.public_names(route) == ("alpha", "bee")
    assert table.known_names() == ["alpha", "bee", "qwen"]
