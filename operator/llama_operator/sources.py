"""Model source resolution: from a LlamaModel spec to concrete files, sizes, sha256, GGUF header and cache key.

Owns the knowledge of where model bytes live and what the remote ends say about them:
- Hugging Face resolve URLs (`<endpoint>/<repo>/resolve/<revision>/<file>`), the `X-Linked-Etag` /
  `X-Linked-Size` headers the hub returns for LFS files before redirecting to its CDN, and the hub's error codes;
- split GGUF naming (`name-00001-of-0000N.gguf`): every shard belongs to the model;
- which error of the taxonomy (errors.py, shared with `fetch`) an HTTP answer means: transient
  `SourceUnreachable` vs. permanent the rest;
- the cache key: the directory name of a model inside a cache volume.

The pure HTTP helpers (`hf_resolve_url`, `parse_linked_headers`, `error_for_status`, `redact_url`) live in
`fetch.http` and `shard_names` in `fetch.plan`, shared with the fetcher, which runs the same protocol
synchronously in the init container; they are re-exported here.
Nothing here reads Secrets or logs their values: tokens and headers arrive as arguments, are checked
(`fetch.secrets`) and go only to the origin they were given for; the client connects only where `egress` allows.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin

import httpx

from .api.v1beta1 import SPLIT_GGUF_RE, GgufInfo, LlamaModelSpec, ModelFile
from .config import Settings
from .egress import source_client
from .errors import (
    ChecksumMismatch,
    NotAGguf,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceUnauthorized,
    SourceUnreachable,
    WrongFileKind,
)
from .fetch.http import (
    LinkedInfo,
    check_path,
    check_url,
    error_for_status,
    hf_resolve_url,
    parse_linked_headers,
    redact_url,
    retry_after_seconds,
    same_origin,
    strip_etag,
)
from .fetch.plan import shard_names
from .fetch.secrets import auth_headers, checked_credentials
from .fit import model_info
from .gguf import GgufHeader, HttpByteSource, read_header, send_following, transport_error
from .gguf.limits import show

__all__ = [  # the source errors and HTTP helpers are re-exported: callers name one module for source trouble
    "ChecksumMismatch", "LinkedInfo", "NotAGguf", "ResolvedModel", "SourceError", "SourceForbidden", "SourceNotFound",
    "SourceUnauthorized", "SourceUnreachable", "cache_key", "error_for_status", "hf_resolve_url",
    "parse_linked_headers", "redact_url", "resolve", "retry_after_seconds", "shard_names", "source_identity",
    "transport_error",
]

_MAX_REDIRECTS = 10
_SHARD_CONCURRENCY = 8
RESOLVE_DEADLINE = 120.0
"""Seconds one resolve may take, every HEAD and header read of every shard together: a host that drips its
bytes ends as `SourceUnreachable` (retried with backoff) instead of holding the resync (docs/security.md)."""
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class ResolvedModel:
    """Everything the operator reports about a model source."""

    files: list[ModelFile]
    size: int | None
    """Total bytes over all files, when every size is known."""
    sha256: str | None
    """sha256 of the first file (the one the spec's sha256 refers to)."""
    gguf: GgufInfo | None
    """Header metadata; None for volume sources (the operator never mounts user volumes)."""
    cache_key: str
    mmproj: ModelFile | None = None
    """The multimodal projector (spec.mmproj): name in the cache directory, URL, size, sha256."""


# ---------------------------------------------------------------------------------------------- cache key

_NON_LABEL = re.compile(r"[^a-z0-9]+")


def source_identity(spec: LlamaModelSpec) -> str:
    """A stable string naming the source (not the content): used when no sha256 is known."""
    source = spec.source
    if source.hugging_face is not None:
        hf = source.hugging_face
        return f"hf:{hf.repo}@{hf.revision}/{hf.file}"
    if source.http is not None:
        return f"url:{source.http.url}"
    assert source.volume is not None
    return f"volume:{source.volume.persistent_volume_claim}/{source.volume.path}"


def cache_key(spec: LlamaModelSpec, sha256: str | None) -> str:
    """Directory name of the model inside a cache volume: `<readable stem>-<12 hex>`, a DNS label.

    The hex part hashes the content sha256 when known, so two LlamaModels naming the same bytes (another
    mirror, a tag and its commit) share one cache entry, and a moved `revision: main` gets a new one.
    Without a sha256 it hashes the source identity (repo@revision/file or the URL).
    """
    base = source_file = spec.source.file_name
    match = SPLIT_GGUF_RE.match(source_file)
    if match is not None:
        base = match.group("stem")
    elif base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    stem = _NON_LABEL.sub("-", base.lower()).strip("-")[:40].strip("-") or "model"
    basis = f"sha256:{sha256}" if sha256 else source_identity(spec)
    digest = hashlib.sha256(basis.encode()).hexdigest()[:12]
    return f"{stem}-{digest}"


# ---------------------------------------------------------------------------------------------- resolve


@dataclass(frozen=True)
class _Remote:
    name: str
    url: str
    """Where the bytes are read from (the resolve URL for the hub; httpx follows the redirect)."""
    size: int | None
    sha256: str | None


async def _head_hf(client: httpx.AsyncClient, url: str, name: str, headers: Mapping[str, str],
                   *, token_given: bool) -> _Remote:
    """HEAD the resolve URL without following the CDN redirect: the LFS sha256 and size are on that hop.

    Repository renames and revision aliases answer with a redirect to another resolve URL that does not carry
    the linked headers yet; those hops are followed (on the same origin only, with the same credentials).
    """
    current = url
    for _ in range(_MAX_REDIRECTS):
        try:
            response = await client.head(current, headers=dict(headers), follow_redirects=False)
        except httpx.TransportError as exc:
            raise transport_error(f"{name}: HEAD {redact_url(current)}", exc) from exc
        if response.status_code >= 400:
            raise error_for_status(response.status_code, f"{name}", response.headers, token_given=token_given,
                                   hub=True)
        linked = parse_linked_headers(str(response.url), response.status_code, response.headers)
        if response.status_code == 200 or linked.sha256 or linked.size is not None or not linked.location:
            return _Remote(name, url, linked.size, linked.sha256)
        if not same_origin(linked.location, url):  # scheme included: https -> http is another origin
            # A CDN redirect without linked headers (a non-LFS file on some mirrors): size unknown here.
            return _Remote(name, url, None, None)
        current = linked.location
    raise SourceError(f"{name}: more than {_MAX_REDIRECTS} redirects")


async def _head_http(client: httpx.AsyncClient, url: str, name: str, headers: Mapping[str, str]) -> _Remote:
    """Size (and sha256 when the server publishes an X-Linked-Etag) of a plain URL; HEAD, else a 1-byte GET."""
    what = f"{name} ({redact_url(url)})"
    try:
        response = await send_following(client, "HEAD", url, headers)
        await response.aclose()
        if response.status_code in (405, 501):  # servers without HEAD: ask for one byte instead
            response = await send_following(client, "GET", url, headers, {"Range": "bytes=0-0"})
            await response.aclose()
    except httpx.TransportError as exc:
        raise transport_error(what, exc) from exc
    if response.status_code >= 400:
        raise error_for_status(response.status_code, what, response.headers, token_given=bool(headers))
    size: int | None = None
    content_range = response.headers.get("content-range", "")
    if response.status_code == 206 and "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        size = int(content_range.rsplit("/", 1)[1])
    elif response.headers.get("content-length", "").isdigit():
        size = int(response.headers["content-length"])
    sha256 = strip_etag(response.headers.get("x-linked-etag"))
    return _Remote(name, url, size, sha256)


async def _read_gguf(
    client: httpx.AsyncClient, remote: _Remote, headers: Mapping[str, str], *, token_given: bool, hub: str
) -> GgufHeader:
    return await read_header(HttpByteSource(client, remote.url, headers, name=remote.name, token_given=token_given,
                                            hub=hub))


async def _bounded(semaphore: asyncio.Semaphore, coro: Awaitable[T]) -> T:
    async with semaphore:
        return await coro


async def resolve(
    spec: LlamaModelSpec,
    *,
    settings: Settings,
    hf_token: str | None,
    headers: dict[str, str],
    client: httpx.AsyncClient | None = None,
    deadline: float = RESOLVE_DEADLINE,
) -> ResolvedModel:
    """Resolve the spec's source: every file with URL, size and sha256, the GGUF header, the cache key.

    Raises a SourceError subclass; `SourceUnreachable` (transient) is the only one worth retrying, and is also
    what a resolve that takes longer than `deadline` seconds ends with.
    `hf_token` and `headers` are secret values read by the caller; they are sent, never logged or returned.
    """
    source = spec.source
    if source.volume is not None:
        names = shard_names(source.volume.path)
        files = [ModelFile(name=name.rsplit("/", 1)[-1]) for name in names]
        files[0] = files[0].model_copy(update={"sha256": spec.sha256})
        mmproj = None
        if spec.mmproj is not None:
            _check_mmproj_name(spec, files)
            mmproj = ModelFile(name=spec.mmproj.file_name, sha256=spec.mmproj.sha256)
        return ResolvedModel(files, None, spec.sha256, None, cache_key(spec, spec.sha256), mmproj)

    hf_token, headers = checked_credentials(hf_token, headers)
    own_client = client is None
    if client is None:
        client = source_client(settings, httpx.Timeout(30.0, connect=10.0))
    try:
        async with asyncio.timeout(deadline):
            return await _resolve_remote(spec, settings, hf_token, headers, client)
    except TimeoutError:
        raise SourceUnreachable(f"{spec.source.file_name}: the source was not resolved within {deadline:g} s "
                                "(a host answers too slowly)") from None
    finally:
        if own_client:
            await client.aclose()


async def _resolve_remote(
    spec: LlamaModelSpec,
    settings: Settings,
    hf_token: str | None,
    headers: Mapping[str, str],
    client: httpx.AsyncClient,
) -> ResolvedModel:
    source = spec.source
    semaphore = asyncio.Semaphore(_SHARD_CONCURRENCY)
    if source.hugging_face is not None:
        hf = source.hugging_face
        check_path(hf.revision, "spec.source.huggingFace.revision")
        check_path(hf.file, "spec.source.huggingFace.file")
        request_headers = auth_headers(hf_token, headers)
        token_given = bool(hf_token)
        jobs = [
            _head_hf(
                client,
                hf_resolve_url(settings.huggingface_endpoint, hf.repo, hf.revision, path),
                f"{hf.repo}@{hf.revision}/{path}",
                request_headers,
                token_given=token_given,
            )
            for path in shard_names(hf.file)
        ]
    else:
        assert source.http is not None
        check_url(source.http.url, "spec.source.http.url")
        request_headers = dict(headers)
        token_given = bool(headers)
        base_url, sep, query = source.http.url.partition("?")
        jobs = [
            _head_http(client, f"{url}{sep}{query}", url.rsplit("/", 1)[-1], request_headers)
            for url in shard_names(base_url)
        ]
    remotes: list[_Remote] = list(await asyncio.gather(*(_bounded(semaphore, job) for job in jobs)))

    first = remotes[0]
    if spec.sha256 and first.sha256 and spec.sha256 != first.sha256:
        raise ChecksumMismatch(
            f"{first.name}: spec.sha256 is {spec.sha256} but the source publishes {first.sha256} "
            "(the file changed upstream, or the spec names the wrong file/revision)"
        )
    sha256 = spec.sha256 or first.sha256

    # Shard 1 carries the metadata; the other shards' headers only add their tensors to the parameter count.
    headers_read = await asyncio.gather(
        *(_bounded(semaphore, _read_gguf(client, r, request_headers, token_given=token_given,
                                         hub=settings.huggingface_endpoint)) for r in remotes)
    )
    first_header = headers_read[0]
    _check_kind(spec, first_header, first.name)
    tensors = first_header.tensors
    for other in headers_read[1:]:
        tensors = tensors.merged(other.tensors)
    files = [
        ModelFile(name=r.name.rsplit("/", 1)[-1], url=r.url, size=r.size, sha256=sha256 if i == 0 else r.sha256)
        for i, r in enumerate(remotes)
    ]
    sizes = [r.size for r in remotes]
    total = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    mmproj = None
    if spec.mmproj is not None:
        _check_mmproj_name(spec, files)
        mmproj = await _resolve_mmproj(spec, settings, client, request_headers, token_given=token_given)
    return ResolvedModel(
        files=files,
        size=total,
        sha256=sha256,
        gguf=await asyncio.to_thread(model_info, first_header, tensors),
        cache_key=cache_key(spec, sha256),
        mmproj=mmproj,
    )


def _check_kind(spec: LlamaModelSpec, header: GgufHeader, name: str) -> None:
    """A LoRA adapter where spec.adapterFor says so, a model where it does not (llama.cpp refuses either swap
    only when a pod loads the file)."""
    kind = header.adapter_type
    if spec.adapter_for is not None and kind != "lora":
        found = "a model (general.type is not adapter)" if kind is None else f"an adapter of type {kind or '(none)'}"
        raise WrongFileKind(f"{name}: spec.adapterFor names {spec.adapter_for}, but the file is {found}; llama.cpp "
                            "loads LoRA adapters (adapter.type lora)")
    if spec.adapter_for is None and kind is not None:
        raise WrongFileKind(f"{name}: the file is a LoRA adapter (general.type adapter), not a model: set "
                            "spec.adapterFor to the LlamaModel it adapts and list it in a LlamaServer's spec.adapters")


MMPROJ_ARCHITECTURE = "clip"
"""general.architecture of every multimodal projector llama.cpp's mtmd loads (vision and audio encoders)."""


def source_url(spec: LlamaModelSpec, hf_endpoint: str) -> str | None:
    """The URL of the model's (first) file, before redirects; None for volume sources."""
    source = spec.source
    if source.hugging_face is not None:
        hf = source.hugging_face
        return hf_resolve_url(hf_endpoint, hf.repo, hf.revision, hf.file)
    return source.http.url if source.http is not None else None


def mmproj_url(spec: LlamaModelSpec, hf_endpoint: str) -> str | None:
    """Where a downloaded model's projector is fetched from (None for volume sources)."""
    assert spec.mmproj is not None
    source = spec.source
    if source.hugging_face is not None:
        hf = source.hugging_face
        return hf_resolve_url(hf_endpoint, hf.repo, hf.revision, spec.mmproj.file)
    if source.http is not None:
        return urljoin(source.http.url, spec.mmproj.file)
    return None


def _check_mmproj_name(spec: LlamaModelSpec, files: list[ModelFile]) -> None:
    assert spec.mmproj is not None
    if spec.mmproj.file_name in {file.name for file in files}:
        raise SourceError(f"spec.mmproj.file: {spec.mmproj.file_name} is a file of the model itself; name the "
                          "projector file")


async def _resolve_mmproj(
    spec: LlamaModelSpec, settings: Settings, client: httpx.AsyncClient, headers: Mapping[str, str], *,
    token_given: bool,
) -> ModelFile:
    """Size and sha256 of the projector, and a look at its header: a GGUF of architecture clip."""
    assert spec.mmproj is not None
    url = mmproj_url(spec, settings.huggingface_endpoint)
    assert url is not None
    check_url(url, "spec.mmproj.file")
    if not same_origin(url, source_url(spec, settings.huggingface_endpoint) or url):
        headers, token_given = {}, False  # credentials go only to the origin they were given for
    name = spec.mmproj.file_name
    if spec.source.hugging_face is not None:
        hf = spec.source.hugging_face
        remote = await _head_hf(client, url, f"{hf.repo}@{hf.revision}/{spec.mmproj.file}", headers,
                                token_given=token_given)
    else:
        remote = await _head_http(client, url, name, headers)
    if spec.mmproj.sha256 and remote.sha256 and spec.mmproj.sha256 != remote.sha256:
        raise ChecksumMismatch(f"{remote.name}: spec.mmproj.sha256 is {spec.mmproj.sha256} but the source "
                               f"publishes {remote.sha256}")
    sha256 = spec.mmproj.sha256 or remote.sha256
    if sha256 is None:
        raise SourceError(f"{remote.name}: the source publishes no sha256 for the projector; set spec.mmproj.sha256 "
                          "(a projector is verified like the weights, and is never trusted on first use)")
    header = await _read_gguf(client, remote, headers, token_given=token_given, hub=settings.huggingface_endpoint)
    if header.architecture != MMPROJ_ARCHITECTURE:
        arch = show(header.architecture) if header.architecture is not None else "missing"
        raise NotAGguf(f"{remote.name}: general.architecture is {arch}, not a multimodal "
                       f"projector ({MMPROJ_ARCHITECTURE!r}); spec.mmproj names the mmproj GGUF of the model")
    return ModelFile(name=name, url=remote.url, size=remote.size, sha256=sha256)
