"""Validating admission webhooks for LlamaServer and LlamaModel, served by kopf's webhook server.

`kubectl apply` of a bad object is refused with the same messages the reconcile loop would put into the
ArgsValid condition: pydantic parsing of the spec (the CRD schema's rules and more) and, for LlamaServer, the
one spec validation of flags/spec.py (references, flags, tenant policy). kopf routes admission requests by
handler id, so the Helm chart's ValidatingWebhookConfiguration points at `/validate-llamaserver` and
`/validate-llamamodel`; the same server answers the CRDs' conversion webhook at `/convert` (api/conversion.py).

The operator's startup handler calls `register` (into its own registry) and `configure_webhook`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from .api import conversion
from .api.bounds import truncate_message
from .api.errors import describe
from .api.v1beta1 import GROUP, VERSION, LlamaModelSpec, LlamaServerSpec
from .config import Settings
from .flags.spec import spec_problems
from .policy import model_policy_problems

SERVER_WEBHOOK_ID = "validate-llamaserver"
MODEL_WEBHOOK_ID = "validate-llamamodel"
CONVERSION_WEBHOOK_ID = "convert"
"""The path (kopf's webhook id) of the CRDs' conversion webhook: kopf has no conversion handlers, so the server
below answers it before kopf's admission routing sees the request."""


def server_spec_problems(spec: dict[str, Any], *, namespace: str | None, settings: Settings) -> list[str]:
    """Every reason a LlamaServer spec is refused (empty when it is admitted)."""
    try:
        parsed = LlamaServerSpec.model_validate(spec)
    except ValidationError as exc:
        return describe(exc, prefix="spec")
    # Without a namespace in the request (never the case for namespaced kinds) references are not compared.
    return spec_problems(parsed, namespace or (parsed.model_ref.namespace if parsed.model_ref else None) or "",
                         settings)


def model_spec_problems(spec: dict[str, Any], *, settings: Settings) -> list[str]:
    """Every reason a LlamaModel spec is refused (empty when it is admitted)."""
    try:
        parsed = LlamaModelSpec.model_validate(spec)
    except ValidationError as exc:
        return describe(exc, prefix="spec")
    return model_policy_problems(parsed, settings)


def _unchanged(operation: str | None, old: kopf.Body | None, spec: kopf.Spec) -> bool:
    # An UPDATE that leaves the spec alone (kopf's own annotations, labels, deletion) is never refused: an
    # object admitted under older rules must stay manageable and deletable.
    return operation == "UPDATE" and old is not None and dict(old.get("spec") or {}) == dict(spec)


def _refuse(kind: str, problems: list[str]) -> None:
    if problems:
        raise kopf.AdmissionError(truncate_message(f"invalid {kind}: " + "; ".join(problems)), code=422)


def validators(config: Settings) -> tuple[Callable[..., None], Callable[..., None]]:
    """The LlamaServer and LlamaModel handlers, judging by the operator's settings (its tenant policy)."""

    def validate_llamaserver(spec: kopf.Spec, namespace: str | None, operation: str | None,
                             old: kopf.Body | None, **_: Any) -> None:
        if not _unchanged(operation, old, spec):
            _refuse("LlamaServer", server_spec_problems(dict(spec), namespace=namespace, settings=config))

    def validate_llamamodel(spec: kopf.Spec, operation: str | None, old: kopf.Body | None, **_: Any) -> None:
        if not _unchanged(operation, old, spec):
            _refuse("LlamaModel", model_spec_problems(dict(spec), settings=config))

    return validate_llamaserver, validate_llamamodel


def register(registry: kopf.OperatorRegistry, config: Settings) -> None:
    """Register both validating handlers into `registry`: the running operator's, from its startup handler.

    Explicit rather than at import: a module is imported once per process, a registry is made per operator run
    (tests run many), and kopf refuses validating handlers without a webhook server, so only an operator with
    the webhook enabled may have them."""
    operations = ["CREATE", "UPDATE"]
    validate_llamaserver, validate_llamamodel = validators(config)
    kopf.on.validate(GROUP, VERSION, "llamaservers", id=SERVER_WEBHOOK_ID, operations=operations,
                     registry=registry)(validate_llamaserver)
    kopf.on.validate(GROUP, VERSION, "llamamodels", id=MODEL_WEBHOOK_ID, operations=operations,
                     registry=registry)(validate_llamamodel)


def configure_webhook(settings: kopf.OperatorSettings, config: Settings) -> None:
    """Serves the webhooks over HTTPS on config.webhook_port with the mounted certificate (when enabled)."""
    if config.webhook_port is None:
        return
    settings.admission.server = ForgetfulWebhookServer(
        addr="0.0.0.0",  # noqa: S104  (the Service in front of the pod routes the API server here)
        port=config.webhook_port,
        certfile=os.path.join(config.webhook_cert_dir, "tls.crt"),
        pkeyfile=os.path.join(config.webhook_cert_dir, "tls.key"),
    )


class ForgetfulWebhookServer(kopf.WebhookServer):
    """kopf's webhook server, plus the conversion webhook, and reviews of existing objects leave nothing behind.

    `/convert` is answered here with api/conversion.py's ConversionReview: one server, one port, one certificate
    and one Service for both webhooks, so the CRDs' caBundle is the validating webhook's. kopf's server reads the
    body with aiohttp's default bound (1 MiB: a larger review is refused with 413 before it is parsed).

    kopf keeps a per-object memory keyed by the reviewed object's uid for every UPDATE or DELETE review (CREATE is
    not kept), and forgets it only when its watch sees that object deleted. A review whose uid belongs to no object
    — anyone who can reach the webhook port can send one — therefore stays for good: a forged review per request
    grows the operator without bound. Our validating handlers use neither the uid nor kopf's memo, so the uid is
    taken out before kopf sees the review, and all such reviews share one memory. The NetworkPolicy in front of
    the port (docs/security.md#network) is the main control; this bounds what gets through it.
    """

    async def __call__(self, fn: Any) -> Any:
        async def forgetful(request: Any, **kwargs: Any) -> Any:
            if kwargs.get("webhook") == CONVERSION_WEBHOOK_ID:
                return conversion.review(request)
            return await fn(without_object_uids(request), **kwargs)

        served = super().__call__(forgetful)
        try:
            async for client_config in served:
                yield client_config
        finally:
            await served.aclose()


def without_object_uids(review: Any) -> Any:
    """The AdmissionReview with `metadata.uid` removed from its object and oldObject, except for CREATE."""
    payload = review.get("request") if isinstance(review, dict) else None
    if not isinstance(payload, dict) or payload.get("operation") == "CREATE":
        return review
    stripped = dict(payload)
    for key in ("object", "oldObject"):
        body = payload.get(key)
        if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
            stripped[key] = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "uid"}}
    return {**review, "request": stripped}

