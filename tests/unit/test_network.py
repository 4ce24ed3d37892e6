"""What a llama-server pod exposes on the network: `--no-slots` unless asked for, and the NetworkPolicy the
operator puts next to each server (docs/security.md#network)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from llama_operator.builders import build_deployment
from llama_operator.builders.network_policy import build_network_policy
from llama_operator.builders.router import router_args
from llama_operator.config import Settings, SettingsError
from llama_operator.flags.render import SLOTS_ENV
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, NETWORK_POLICIES
from llama_operator.llamacpp.catalog import load_catalog
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube


def _args(**spec: Any) -> list[str]:
    deployment = build_deployment(server(**spec), resolved_model(), Settings())
    (main,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "llama-server"]
    return list(main["args"])


def test_slots_are_off_by_default() -> None:
    args = _args()
    assert args.count("--no-slots") == 1 and "--slots" not in args


@pytest.mark.parametrize("spec", [{"args": ["--slots"]}, {"args": ["--no-slots"]},
                                  {"env": [{"name": SLOTS_ENV, "value": "1"}]}])
def test_a_server_that_asks_for_slots_gets_its_own_choice_only(spec: dict[str, Any]) -> None:
    args = _args(**spec)
    assert [a for a in args if a in ("--slots", "--no-slots")] == list(spec.get("args", []))


def test_router_mode_has_slots_off_too() -> None:
    router = server(modelRef=None, models=[{"modelRef": {"name": "a"}}])
    assert "--no-slots" in router_args(router)
    assert "--no-slots" not in router_args(server(modelRef=None, models=[{"modelRef": {"name": "a"}}],
                                                  args=["--slots"]))


def test_the_slots_env_name_is_the_catalogs() -> None:
    (option,) = [o for o in load_catalog().options if "--slots" in o.names]
    assert option.env == SLOTS_ENV and list(option.negatives) == ["--no-slots"]


# ---------------------------------------------------------------------------------------------- NetworkPolicy

OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llama-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llama-operator"}}}
GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llama-system"}},
           "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llama-gateway"}}}
POLICY_ON = Settings(server_network_policy_from=(OPERATOR, GATEWAY))


def test_the_policy_admits_the_own_namespace_and_the_configured_peers_on_the_server_port_only() -> None:
    chat = server(name="chat")
    policy = build_network_policy(chat, POLICY_ON)
    assert policy is not None
    kubernetes_validate.validate(policy, "1.31.0", strict=True)
    deployment = build_deployment(chat, resolved_model(), POLICY_ON)
    # it selects exactly the server's pods
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["metadata"]["name"] == "chat" and policy["metadata"]["ownerReferences"][0]["uid"] == "uid-server"
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # the fetchers download through the same pod network
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}, OPERATOR, GATEWAY]
    (main,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "llama-server"]
    assert rule["ports"] == [{"protocol": "TCP", "port": main["ports"][0]["containerPort"]}]


def test_no_policy_unless_configured() -> None:
    assert build_network_policy(server(), Settings()) is None
    only_own = build_network_policy(server(), Settings(server_network_policy_from=()))
    assert only_own is not None and only_own["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]


def test_the_peers_setting_is_parsed_and_checked() -> None:
    env = "LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM"
    assert Settings.from_env({}).server_network_policy_from is None
    assert Settings.from_env({env: ""}).server_network_policy_from is None
    assert Settings.from_env({env: "[]"}).server_network_policy_from == ()
    assert Settings.from_env({env: json.dumps([OPERATOR])}).server_network_policy_from == (OPERATOR,)
    for bad in ("{", '{"podSelector": {}}', '[{"from": {}}]', "[{}]", '["x"]'):
        with pytest.raises(SettingsError, match=env):
            Settings.from_env({env: bad})


READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}


@pytest.mark.parametrize("router_mode", [False, True])
async def test_the_reconcile_applies_the_policy_before_the_pods_and_removes_it_when_turned_off(
        router_mode: bool) -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    spec: dict[str, Any] = {"modelRef": None, "models": [{"modelRef": {"name": "qwen"}}]} if router_mode else {}
    kube.put(LLAMA_SERVERS, server_body("chat", **spec))

    async def reconcile(settings: Settings) -> None:
        ctx = Context(kube=kube, settings=settings, record_event=Events())
        await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)

    await reconcile(POLICY_ON)
    policy = kube.objects[(NETWORK_POLICIES.plural, "default", "chat")]
    assert policy["spec"]["ingress"][0]["from"][1:] == [OPERATOR, GATEWAY]
    applied = [call[1] for call in kube.calls if call[0] == "apply"]
    assert applied.index(NETWORK_POLICIES.plural) < applied.index("deployments")
    kube.calls.clear()
    await reconcile(POLICY_ON)
    assert kube.count("apply") == 0  # converged: nothing sent again
    await reconcile(Settings())
    assert (NETWORK_POLICIES.plural, "default", "chat") not in kube.objects


async def test_a_policy_of_the_same_name_made_by_someone_else_is_left_alone() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body("chat"))
    kube.put(NETWORK_POLICIES, {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                "metadata": {"name": "chat", "namespace": "default"}, "spec": {"podSelector": {}}})
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")],
                           Context(kube=kube, settings=Settings(), record_event=Events()))
    assert (NETWORK_POLICIES.plural, "default", "chat") in kube.objects


# ---------------------------------------------------------------------------------------------- pod log reads


async def test_a_fetcher_log_is_read_with_a_byte_limit() -> None:
    """Log lines can be as long as a container wants: the tail is asked for with limitBytes, which the API server
    honours (here a stand-in that does the same with a 16 MiB line)."""
    from aiohttp import web
    from kubernetes import client as k8s_client

    from llama_operator.kube import Kube

    asked: list[dict[str, str]] = []

    async def log(request: web.Request) -> web.Response:
        asked.append(dict(request.query))
        body = b"x" * 16 * 2**20 + b"\n"
        limit = request.query.get("limitBytes")
        return web.Response(body=body[: int(limit)] if limit else body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods/p/log", log)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        kube = Kube(k8s_client.ApiClient(k8s_client.Configuration(host=f"http://127.0.0.1:{port}")))
        tail = await kube.container_log("ns", "p", "fetch-model", tail_lines=20)
    finally:
        await runner.cleanup()
    assert asked[0]["tailLines"] == "20" and len(tail) <= 64 * 1024
