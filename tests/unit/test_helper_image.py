"""An operator upgrade leaves running model pods alone: the drain sidecar and the fetchers keep the operator image
they run while nothing else in the pod template changes (builders/helper_image.py, reconcile/server.py); any other
change of the template brings the new image."""

from __future__ import annotations

import copy
from typing import Any

from llama_operator.builders.helper_image import with_live_helper_image
from llama_operator.config import Settings
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube
from tests.watch_cache import watched_over

OLD, NEW = "registry.example/llama-operator:0.1.0", "registry.example/llama-operator:0.2.0"
READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}], "sha256": "a" * 64}
DEPLOYMENT = ("deployments", "default", "chat")


def _deployment(images: dict[str, str], main: str = "llama:cpu") -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": "default"},
            "spec": {"template": {"spec": {
                "initContainers": [{"name": name, "image": image} for name, image in images.items()],
                "containers": [{"name": "llama-server", "image": main}]}}}}


def _images(deployment: dict[str, Any]) -> dict[str, str]:
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c["image"] for c in [*pod.get("initContainers", []), *pod["containers"]]}


def test_the_live_helper_image_replaces_this_operators_in_its_containers_only() -> None:
    desired = _deployment({"fetch-model": NEW, "drain": NEW})
    pinned = with_live_helper_image(desired, _deployment({"fetch-model": OLD, "drain": OLD}), NEW)
    assert pinned is not None
    assert _images(pinned) == {"fetch-model": OLD, "drain": OLD, "llama-server": "llama:cpu"}
    assert _images(desired)["drain"] == NEW  # the desired object is not changed


def test_nothing_to_keep_without_a_live_deployment_or_one_other_image() -> None:
    desired = _deployment({"fetch-model": NEW, "drain": NEW})
    assert with_live_helper_image(desired, None, NEW) is None
    assert with_live_helper_image(desired, _deployment({"fetch-model": NEW, "drain": NEW}), NEW) is None
    assert with_live_helper_image(desired, _deployment({"fetch-model": OLD, "drain": "other:1"}), NEW) is None
    assert with_live_helper_image(desired, _deployment({"other": OLD}), NEW) is None
    assert with_live_helper_image(_deployment({}), _deployment({"drain": OLD}), NEW) is None


def _cluster() -> FakeKube:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body(replicas=2))
    return kube


async def _reconcile(kube: FakeKube, image: str) -> None:
    """One reconcile by an operator whose image is `image`, reading from the watches as in production."""
    ctx = Context(kube=kube, settings=Settings(fetcher_image=image), record_event=Events(),  # type: ignore[arg-type]
                  watched=watched_over(kube))
    await reconcile_server(copy.deepcopy(kube.objects[("llamaservers", "default", "chat")]), ctx)


def _upgraded(kube: FakeKube) -> FakeKube:
    """The same cluster seen by a new operator process: no record of any apply."""
    new = FakeKube()
    new.objects = kube.objects
    return new


def _helper_images(kube: FakeKube) -> set[str]:
    images = _images(kube.objects[DEPLOYMENT])
    return {image for name, image in images.items() if name != "llama-server"}


async def test_an_upgraded_operator_keeps_the_running_pods_image_and_rolls_nothing() -> None:
    before = _cluster()
    await _reconcile(before, OLD)
    assert _helper_images(before) == {OLD}
    generation = before.objects[DEPLOYMENT]["metadata"]["generation"]
    kube = _upgraded(before)
    await _reconcile(kube, NEW)
    assert _helper_images(kube) == {OLD}
    assert kube.objects[DEPLOYMENT]["metadata"]["generation"] == generation  # no new pod template, no rollout
    assert kube.count("dry_run", "deployments") == 1
    kube.calls.clear()
    await _reconcile(kube, NEW)  # decided once: its own apply record answers from now on
    assert kube.count("dry_run") == kube.count("get", "deployments") == kube.count("apply", "deployments") == 0


async def test_any_other_template_change_brings_the_new_image() -> None:
    before = _cluster()
    await _reconcile(before, OLD)
    kube = _upgraded(before)
    await _reconcile(kube, NEW)
    kube.edit("llamaservers", "chat", lambda s: s["spec"].update(podAnnotations={"example.com/roll": "1"}))
    await _reconcile(kube, NEW)
    assert _helper_images(kube) == {NEW}
    assert kube.objects[DEPLOYMENT]["spec"]["template"]["metadata"]["annotations"]["example.com/roll"] == "1"


async def test_a_scale_keeps_the_running_pods_image() -> None:
    before = _cluster()
    await _reconcile(before, OLD)
    kube = _upgraded(before)
    kube.edit("llamaservers", "chat", lambda s: s["spec"].update(replicas=3))
    await _reconcile(kube, NEW)
    deployment = kube.objects[DEPLOYMENT]
    assert (deployment["spec"]["replicas"], _helper_images(kube)) == (3, {OLD})
