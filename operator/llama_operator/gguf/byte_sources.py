"""Where header bytes come from: a local file, or HTTP range requests behind a redirect follower.

A `ByteSource` answers "the bytes at this offset" and raises only the project's errors (errors.py): an HTTP
error status is the error `fetch.http.error_for_status` names, a connection failure `SourceUnreachable`.
`name` is how messages name the source (a path, or a URL without its query).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import httpx

from ..errors import SourceError, SourceUnreachable
from ..fetch.http import MAX_REDIRECTS, REDIRECTS, error_for_status, hop_headers, redact_url, same_origin


class ByteSource(Protocol):
    """Random access to the bytes of one file. `read` may return fewer bytes than asked only at end of file."""

    name: str
    bytes_fetched: int

    async def read(self, offset: int, size: int) -> bytes: ...


class FileByteSource:
    """A local file. `read_blocking` is what the header parser's worker thread calls; `read` runs it in a
    thread of its own, so the event loop never blocks on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.bytes_fetched = 0

    def read_blocking(self, offset: int, size: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            raise SourceError(f"{self.name}: {exc.strerror or type(exc).__name__}") from exc
        self.bytes_fetched += len(data)
        return data

    async def read(self, offset: int, size: int) -> bytes:
        return await asyncio.to_thread(self.read_blocking, offset, size)


def transport_error(what: str, exc: httpx.TransportError) -> SourceError:
    """Transient, except a request httpx/h11 refused to send (its message would print the header value)."""
    if isinstance(exc, httpx.LocalProtocolError):
        return SourceError(f"{what}: a request header (the tokenSecretRef or headersSecretRef value) cannot be sent")
    return SourceUnreachable(f"{what}: {type(exc).__name__}: {exc or 'connection failed'}")


async def send_following(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
) -> httpx.Response:
    """Send a streamed request, following redirects by hand.

    httpx drops only `Authorization` on a cross-origin redirect; a headersSecretRef can hold any header
    (X-Api-Key, Cookie), and a presigned CDN/S3 URL rejects extra credentials. So every caller header is dropped
    once the origin changes; `extra` (Range) is always sent. The caller closes the returned response.
    Raises `SourceError` after `MAX_REDIRECTS` hops; transport errors are the caller's to name.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        send_headers = hop_headers(headers, url, current, extra)
        request = client.build_request(method, current, headers=send_headers)
        response = await client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location:
            return response
        await response.aclose()
        current = str(httpx.URL(current).join(location))
    raise SourceError(f"{redact_url(url)}: more than {MAX_REDIRECTS} redirects")


class HttpByteSource:
    """A remote file read with `Range: bytes=a-b` requests.

    Redirects are followed once (see `send_following`) and the final URL is reused for later ranges, so a hub
    redirect costs one extra round trip per header read, not one per range. A server that ignores Range (200) is
    tolerated: only the wanted bytes are read from the stream and the connection is closed.
    `token_given` (default: any header given) and `hub` (the Hugging Face endpoint, whose error headers are
    shown) shape the error of an HTTP error status.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str] | None = None, *,
                 name: str | None = None, token_given: bool | None = None, hub: str | None = None) -> None:
        self.client = client
        self.url = url
        self.headers = dict(headers or {})
        self.name = name or redact_url(url)
        self.token_given = bool(self.headers) if token_given is None else token_given
        self.hub = hub
        self.bytes_fetched = 0
        self.requests = 0
        self._final_url: str | None = None

    async def read(self, offset: int, size: int) -> bytes:
        try:
            return await self._read(offset, size)
        except httpx.TransportError as exc:
            raise transport_error(f"{self.name}: reading the GGUF header", exc) from exc

    async def _read(self, offset: int, size: int) -> bytes:
        extra = {"Range": f"bytes={offset}-{offset + size - 1}"}
        self.requests += 1
        target = self._final_url or self.url
        headers = self.headers if same_origin(self.url, target) else {}
        response = await send_following(self.client, "GET", target, headers, extra)
        try:
            if response.status_code == 416:  # range starts past the end of the file
                return b""
            if response.status_code not in (200, 206):
                hub = self.hub is not None and same_origin(str(response.url), self.hub)
                raise error_for_status(response.status_code, self.name, response.headers,
                                       token_given=self.token_given, hub=hub)
            self._final_url = str(response.url)
            skip = offset if response.status_code == 200 else 0
            parts: list[bytes] = []
            have = 0
            async for chunk in response.aiter_raw():
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                parts.append(chunk)
                have += len(chunk)
                if have >= size:
                    break
            data = b"".join(parts)[:size]
        finally:
            await response.aclose()
        self.bytes_fetched += len(data)
        return data
