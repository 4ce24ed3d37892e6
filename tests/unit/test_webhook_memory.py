"""The webhook port accepts whoever reaches it: forged reviews must not grow the operator (kopf's per-uid memory)."""

from __future__ import annotations

import functools
import ssl
import uuid
from pathlib import Path

import kopf
from kopf._cogs.structs import references
from kopf._core.engines.admission import serve_admission_request
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.reactor.inventory import ResourceMemories

from llama_operator import admission
from llama_operator.config import Settings
from tests.unit.test_admission import RESOURCES, _free_port, _post, _review, _self_signed


async def test_forged_update_reviews_leave_nothing_behind(tmp_path: Path) -> None:
    _self_signed(tmp_path)
    port = _free_port()
    settings = kopf.OperatorSettings()
    admission.configure_webhook(settings, Settings(webhook_port=port, webhook_cert_dir=str(tmp_path)))
    registry = kopf.OperatorRegistry()
    admission.register(registry, Settings())
    insights = references.Insights()
    insights.webhook_resources.update(RESOURCES.values())
    memories = ResourceMemories()
    fn = functools.partial(serve_admission_request, settings=settings, memories=memories, memobase=kopf.Memo(),
                           registry=registry, insights=insights, indices=OperatorIndexers().indices)
    configs = settings.admission.server(fn)
    await anext(configs)
    webhook = (f"https://localhost:{port}", ssl.create_default_context(cafile=str(tmp_path / "tls.crt")))
    try:
        for _ in range(50):
            review = _review("llamaservers", "LlamaServer", {"modelRef": {"name": "m"}})
            review["request"]["operation"] = "UPDATE"
            review["request"]["object"]["metadata"]["uid"] = str(uuid.uuid4())  # an object that does not exist
            review["request"]["oldObject"] = review["request"]["object"]
            assert (await _post(webhook, admission.SERVER_WEBHOOK_ID, review))["allowed"] is True
        # and a bad spec is still refused: the review itself is unchanged
        review["request"]["object"] = {**review["request"]["object"], "spec": {"modelRef": {"name": "m"},
                                                                                "args": ["--port", "1"]}}
        assert (await _post(webhook, admission.SERVER_WEBHOOK_ID, review))["allowed"] is False
    finally:
        await configs.aclose()
    assert len(memories._items) <= 1, f"{len(memories._items)} memories kept for objects that do not exist"
