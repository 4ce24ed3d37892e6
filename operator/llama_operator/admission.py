"""Validating admission webhooks for LlamaServer and LlamaModel, served by kopf's webhook server.

`kubectl apply` of a bad object is refused with the same messages the reconcile loop would put into the
ArgsValid condition: pydantic parsing of the spec (the CRD schema's rules and more) and, for LlamaServer, the
flag validation of flags/validate.py. kopf routes admission requests by handler id, so the Helm chart's
ValidatingWebhookConfiguration points at `/validate-llamaserver` and `/validate-llamamodel`.

Importing this module registers the handlers; the operator's startup handler calls `configure_webhook`.
"""

from __future__ import annotations

import os
from typing import Any

import kopf
from pydantic import ValidationError

from .api.v1alpha1 import GROUP, VERSION, LlamaModelSpec, LlamaServerSpec
from .config import Settings
from .flags.validate import validate_server_spec

SERVER_WEBHOOK_ID = "validate-llamaserver"
MODEL_WEBHOOK_ID = "validate-llamamodel"


def pydantic_messages(exc: ValidationError, *, prefix: str = "spec") -> list[str]:
    """One `path: message` line per pydantic error, with the camelCase field names users write."""
    lines = []
    for error in exc.errors():
        path = prefix
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        lines.append(f"{path}: {error['msg']}")
    return lines


def server_spec_problems(spec: dict[str, Any], *, namespace: str | None) -> list[str]:
    """Every reason a LlamaServer spec is refused (empty when it is admitted)."""
    try:
        parsed = LlamaServerSpec.model_validate(spec)
    except ValidationError as exc:
        return pydantic_messages(exc)
    problems = [str(error) for error in validate_server_spec(parsed)]
    for path, ref in (("spec.modelRef", parsed.model_ref),
                      ("spec.speculative.draftModelRef", parsed.speculative and parsed.speculative.draft_model_ref)):
        if ref is not None and ref.namespace and namespace and ref.namespace != namespace:
            problems.append(f"{path}.namespace: must be omitted or equal the LlamaServer's namespace "
                            f"({namespace}); cross-namespace references are not supported")
    return problems


def model_spec_problems(spec: dict[str, Any]) -> list[str]:
    """Every reason a LlamaModel spec is refused (empty when it is admitted)."""
    try:
        LlamaModelSpec.model_validate(spec)
    except ValidationError as exc:
        return pydantic_messages(exc)
    return []


def _refuse(kind: str, problems: list[str]) -> None:
    if problems:
        raise kopf.AdmissionError(f"invalid {kind}: " + "; ".join(problems), code=422)


@kopf.on.validate(GROUP, VERSION, "llamaservers", id=SERVER_WEBHOOK_ID, operations=["CREATE", "UPDATE"])
def validate_llamaserver(spec: kopf.Spec, namespace: str | None, **_: Any) -> None:
    _refuse("LlamaServer", server_spec_problems(dict(spec), namespace=namespace))


@kopf.on.validate(GROUP, VERSION, "llamamodels", id=MODEL_WEBHOOK_ID, operations=["CREATE", "UPDATE"])
def validate_llamamodel(spec: kopf.Spec, **_: Any) -> None:
    _refuse("LlamaModel", model_spec_problems(dict(spec)))


def configure_webhook(settings: kopf.OperatorSettings, config: Settings) -> None:
    """Serves the webhooks over HTTPS on config.webhook_port with the mounted certificate (when enabled)."""
    if config.webhook_port is None:
        return
    settings.admission.server = kopf.WebhookServer(
        addr="0.0.0.0",  # noqa: S104  (the Service in front of the pod routes the API server here)
        port=config.webhook_port,
        certfile=os.path.join(config.webhook_cert_dir, "tls.crt"),
        pkeyfile=os.path.join(config.webhook_cert_dir, "tls.key"),
    )
