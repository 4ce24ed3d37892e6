"""Trust on first use, recorded: the first verified download of a source that publishes no sha256 becomes the
LlamaModel's `status.trustOnFirstUse` and its trust ConfigMap, which every later fetcher must match.

The fetcher of such a model runs with `--trust-on-first-use` and, on success, leaves `Verified: N file(s) in
<cache-key>` and the sha256 of every file in its termination message (contract.py). The server reconcile,
which reads the pods anyway, hands them here: a report for the model's current cache key is recorded when the
model has no record for that cache key yet. A report that differs from the record (a pod that downloaded before
the record existed, from a source that changed meanwhile) is a Warning Event on the model: that pod serves other
bytes than its siblings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..api.v1beta1 import FileChecksum, LlamaModel, TrustOnFirstUse
from ..builders.trust import build_trust_configmap, needs_trust
from ..clock import now_rfc3339
from ..contract import parse_verified
from ..errors import KubeError, reason, status_message
from ..kube import CONFIG_MAPS, LLAMA_MODELS
from ..sources import source_identity
from .context import Context

log = logging.getLogger(__name__)
_warned: set[tuple[str, str, str, str]] = set()
"""(namespace, model, pod, cache key) already warned about, so a mismatch is one Event, not one per reconcile."""


def reports(pods: Sequence[Mapping[str, Any]], container: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(pod name, cache key, {file: sha256}) of every successful fetch report of `container` in these pods."""
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") != container:
                continue
            for state in (status.get("state"), status.get("lastState")):
                terminated = (state or {}).get("terminated") or {}
                if terminated.get("exitCode") == 0:
                    parsed = parse_verified(terminated.get("message"))
                    if parsed is not None and parsed[1]:
                        yield name, parsed[0], parsed[1]


async def record_first_use(
    ctx: Context, models: Mapping[str, LlamaModel | None], pods: Sequence[Mapping[str, Any]]
) -> None:
    """Record (or check) the fetch reports in `pods`; `models` maps each fetch container to its LlamaModel."""
    for container, model in models.items():
        if model is None or not needs_trust(model) or not model.status.cache_key:
            continue
        record = model.status.trust_on_first_use
        for pod, cache_key, sums in reports(pods, container):
            if cache_key != model.status.cache_key:
                continue  # a pod of an older spec reporting another source
            if record is None or record.cache_key != cache_key:
                record = TrustOnFirstUse(
                    cache_key=cache_key,
                    source=source_identity(model.spec),
                    files=[FileChecksum(name=name, sha256=sha) for name, sha in sums.items()],
                    recorded_time=now_rfc3339(),
                    recorded_from=pod,
                )
                try:
                    await _record(ctx, model, record)
                except KubeError as exc:
                    # A side job of the server reconcile: the server's own status must not wait for it. The pod
                    # keeps its report, so the next reconcile (event, retry, resync) records it.
                    message = f"could not record the first verified download: {status_message(exc)}"
                    log.warning("LlamaModel %s/%s: %s", model.metadata.namespace, model.metadata.name, message)
                    ctx.record_event(model.to_wire(), type="Warning", reason=reason(exc), message=message)
                    return
                continue
            recorded = {file.name: file.sha256 for file in record.files}
            differ = sorted(name for name, sha in sums.items() if recorded.get(name) not in (None, sha))
            key = (model.metadata.namespace, model.metadata.name, pod, cache_key)
            if differ and key not in _warned:
                _warned.add(key)
                message = (f"pod {pod} verified {', '.join(differ)} with another sha256 than the first download "
                           f"recorded in status.trustOnFirstUse (from pod {record.recorded_from}): the source "
                           "changed while pods downloaded it; delete that pod to fetch the recorded bytes again, "
                           "or set spec.sha256")
                log.warning("LlamaModel %s/%s: %s", model.metadata.namespace, model.metadata.name, message)
                ctx.record_event(model.to_wire(), type="Warning", reason="ChecksumMismatch", message=message)


async def _record(ctx: Context, model: LlamaModel, record: TrustOnFirstUse) -> None:
    namespace, name = model.metadata.namespace, model.metadata.name
    # A merge patch of this one key: whatever else the model reconcile writes at the same time stays.
    await ctx.kube.patch_status(LLAMA_MODELS, namespace, name, {"trustOnFirstUse": record.to_wire()})
    trusted = model.model_copy(update={"status": model.status.model_copy(update={"trust_on_first_use": record})})
    configmap = build_trust_configmap(trusted)
    if configmap is not None:
        live = await ctx.kube.get(CONFIG_MAPS, namespace, configmap["metadata"]["name"])
        await ctx.kube.apply(configmap, live=live)
    files = ", ".join(f"{file.name} {file.sha256[:12]}…" for file in record.files)
    message = (f"recorded the sha256 of the first verified download (pod {record.recorded_from}): {files}; "
               "every later download must match")
    log.info("LlamaModel %s/%s: %s", namespace, name, message)
    ctx.record_event(model.to_wire(), type="Normal", reason="TrustOnFirstUse", message=message)
