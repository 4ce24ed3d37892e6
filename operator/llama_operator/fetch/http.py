"""The HTTP side of model sources, shared by the fetcher, `sources` and the GGUF header reader.

Owns:
- the redirect policy every client here follows by hand: which statuses redirect, how many hops, and that a
  caller's headers (a token, a headersSecretRef's X-Api-Key or Cookie) go only to the origin they were given
  for — a presigned CDN/S3 URL rejects extra credentials, and httpx would forward everything but
  Authorization (`hop_headers`);
- what a remote answer means: Hugging Face resolve URLs, `X-Linked-Etag` / `X-Linked-Size`, `Retry-After`,
  and the error of the shared taxonomy (errors.py) for an HTTP status (`error_for_status`; the hub's
  `X-Error-*` headers are believed only from the hub's origin);
- which URLs and paths are fetched at all: no `.` or `..` path component (`check_url`, `check_path`);
- URLs as they may be logged (`redact_url`: no query, fragment or userinfo);
- the fetcher's transport, `Http`: HTTP/1.1 on `http.client` (see its docstring for why not httpx).

Stdlib only (plus errors/contract): the init container imports it, and so do `sources` and `gguf`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from ..errors import (
    InvalidSource,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceUnauthorized,
    SourceUnreachable,
)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
USER_AGENT = "llama-operator-fetch"
_SHA256_RE = re.compile(r"^[a-f0-9]{64}$")


# ---------------------------------------------------------------------------------------------- redirect policy


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def same_origin(a: str, b: str) -> bool:
    return origin(a) == origin(b)


def hop_headers(secret: Mapping[str, str], first_url: str, url: str, extra: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """The headers for one hop of a redirect chain that started at `first_url`.

    `secret` (the caller's credentials and custom headers) only while the hop stays on the first URL's origin;
    `extra` (Range, User-Agent) always.
    """
    return {**(dict(secret) if same_origin(first_url, url) else {}), **(extra or {})}


def redirect_target(url: str, location: str) -> str:
    return urljoin(url, location)


# ---------------------------------------------------------------------------------------------- what answers mean


_DOT_SEGMENT = re.compile(r"^(\.|%2e){1,2}$", re.IGNORECASE)
_ERROR_TEXT = 300
"""At most this much of a hub's X-Error-Message reaches a status."""


def check_path(value: str, what: str) -> None:
    """Refuse a revision or file path with an empty, `.` or `..` component (also percent-encoded): the server
    or a proxy would normalise it into another path, and a file named `..` would be written outside the cache."""
    if any(not part or _DOT_SEGMENT.match(part) for part in value.split("/")):
        raise InvalidSource(f"{what} {value[:200]!r}: '.', '..' and empty path components are not allowed")


def check_url(url: str, what: str) -> None:
    """Refuse an http(s) URL whose path holds a `.` or `..` component, or that names no file."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidSource(f"{what}: {redact_url(url)!r} is not an http(s) URL")
    check_path(parts.path.removeprefix("/"), f"{what}: the path of")


def hf_resolve_url(endpoint: str, repo: str, revision: str, file: str) -> str:
    """The hub's resolve URL; revision and path are percent-encoded (a branch may contain '/').

    Callers that fetch check the revision and path first (`check_path`)."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(file, safe='/')}"


def redact_url(url: str) -> str:
    """The URL without query string, fragment or userinfo: signed URLs and credentials stay out of logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def strip_etag(value: str | None) -> str | None:
    """A sha256 from an (X-Linked-)ETag value, or None when it is not one."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"').lower()
    return value if _SHA256_RE.match(value) else None


@dataclass(frozen=True)
class LinkedInfo:
    """What a Hugging Face resolve response says about an LFS file before the redirect."""

    sha256: str | None
    size: int | None
    location: str | None


def parse_linked_headers(response_url: str, status_code: int, headers: Mapping[str, str]) -> LinkedInfo:
    """Read X-Linked-Etag / X-Linked-Size (LFS files) or ETag / Content-Length (small files, mirrors)."""
    sha256 = strip_etag(headers.get("x-linked-etag"))
    size_text = headers.get("x-linked-size")
    location = headers.get("location")
    if status_code == 200:
        sha256 = sha256 or strip_etag(headers.get("etag"))
        size_text = size_text or headers.get("content-length")
    size = int(size_text) if size_text and size_text.isdigit() else None
    return LinkedInfo(sha256, size, urljoin(response_url, location) if location else None)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta form only; an HTTP date is treated as absent)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _header_text(value: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in value[:_ERROR_TEXT])


def error_for_status(status_code: int, what: str, headers: Mapping[str, str], *, token_given: bool,
                     hub: bool = False) -> SourceError:
    """The error for an HTTP error status; `what` names the thing requested (no secrets in it).

    `hub`: the answer came from the Hugging Face endpoint's origin, so its `X-Error-Code` / `X-Error-Message`
    are shown (shortened, printable ASCII only); any other host's are ignored.
    """
    hub_code = _header_text(headers.get("x-error-code", "")) if hub else ""
    hub_message = _header_text(headers.get("x-error-message", "")) if hub else ""
    detail = f" ({hub_code}: {hub_message})" if hub_code and hub_message else f" ({hub_code})" if hub_code else ""
    if status_code == 404:
        return SourceNotFound(f"{what}: not found (HTTP 404){detail}")
    if status_code in (401, 403):
        if hub_code == "GatedRepo" or status_code == 403 or token_given:
            hint = (
                "the token in tokenSecretRef / headersSecretRef was refused: check it and, for a gated "
                "repository, accept its terms on the hub with that account"
                if token_given
                else "a token Secret (tokenSecretRef) with access to this gated or private repository is needed"
            )
        else:
            hint = (
                "the repository is private or gated, or does not exist: a token Secret (tokenSecretRef, or "
                "headersSecretRef for http sources) is needed"
            )
        error = SourceForbidden if status_code == 403 else SourceUnauthorized
        return error(f"{what}: HTTP {status_code}{detail}: {hint}")
    if status_code == 429 or status_code >= 500 or status_code == 408:
        return SourceUnreachable(f"{what}: HTTP {status_code}{detail}", retry_after=retry_after_seconds(headers))
    return SourceError(f"{what}: unexpected HTTP {status_code}{detail}")


# ---------------------------------------------------------------------------------------------- transport


@dataclass
class Response:
    """A response whose headers are a plain lower-cased dict (for the helpers above)."""

    status: int
    headers: dict[str, str]
    url: str
    raw: http.client.HTTPResponse


class Http:
    """HTTP/1.1 on `http.client`: one keep-alive connection per (thread, origin), redirects followed by hand.

    Why not httpx here: the body is read with `readinto` straight into a reused buffer that is then written to
    the file — one copy from the socket, like curl. httpx/h11 allocate and copy every 64 KiB chunk several times,
    which doubled fetch's user CPU per byte on fast links (docs/model-sources.md). Proxies follow the usual
    HTTP(S)_PROXY / NO_PROXY variables (CONNECT tunnel for https); TLS trusts $SSL_CERT_FILE, else certifi's
    bundle (what httpx, used by the operator, trusts). Transport failures raise `SourceUnreachable`, error
    statuses the error `error_for_status` names.
    """

    def __init__(self, timeout: float, proxies: Mapping[str, str] | None = None, *, hub: str | None = None) -> None:
        self.timeout = timeout
        self.hub = hub
        """The Hugging Face endpoint, when fetching from it: the only origin whose X-Error-* headers count."""
        self.proxies = dict(urllib.request.getproxies() if proxies is None else proxies)
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = os.environ.get("SSL_CERT_FILE")
            if not cafile:
                with contextlib.suppress(ImportError):
                    import certifi

                    cafile = certifi.where()
            self._ssl = ssl.create_default_context(cafile=cafile or None)
        return self._ssl

    def _connections(self) -> dict[tuple[str, str, int], tuple[http.client.HTTPConnection, bool]]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connection(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool, bool]:
        """(connection, absolute-form request target, reused) for an origin."""
        conns = self._connections()
        if key in conns:
            return (*conns[key], True)
        scheme, host, port = key
        proxy = None if urllib.request.proxy_bypass(host) else self.proxies.get(scheme)
        conn: http.client.HTTPConnection
        absolute = False
        if proxy:
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            proxy_auth = {}
            if p.username:
                token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
                proxy_auth["Proxy-Authorization"] = f"Basic {token}"
            if scheme == "https":
                conn = http.client.HTTPSConnection(p.hostname or "", p.port or 80, timeout=self.timeout,
                                                   context=self._context())
                conn.set_tunnel(host, port, headers=proxy_auth)
            else:
                conn = http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=self.timeout)
                absolute = True
        elif scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context())
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        else:
            raise SourceError(f"unsupported URL scheme {scheme!r}")
        conns[key] = (conn, absolute)
        return conn, absolute, False

    def drop(self, key: tuple[str, str, int]) -> None:
        entry = self._connections().pop(key, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for key in list(self._connections()):
            self.drop(key)

    def _send(self, method: str, url: str, headers: Mapping[str, str]) -> Response:
        key = origin(url)
        parts = urlsplit(url)
        for _ in range(2):
            conn, absolute, reused = self._connection(key)
            target = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, "")) if absolute else (
                (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            )
            try:
                conn.request(method, target, headers=dict(headers))
                raw = conn.getresponse()
            except ValueError:
                # http.client refuses a header value with a line break or a non-Latin-1 character, and prints
                # the value in its message: never passed on (the secret cleaning should have caught it).
                self.drop(key)
                raise SourceError(f"{redact_url(url)}: a request header (HF_TOKEN or a headersSecretRef value) "
                                  "cannot be sent: it holds a line break or a non-ASCII character") from None
            except (OSError, http.client.HTTPException) as exc:
                self.drop(key)
                if reused:  # the server closed an idle keep-alive connection: a fresh one, no backoff
                    continue
                raise SourceUnreachable(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, url, raw)
        raise SourceUnreachable("connection closed twice")  # pragma: no cover - the loop returns or raises

    def _finish(self, response: Response) -> None:
        """Release the connection: reusable only when the body was read to its end."""
        raw = response.raw
        if not raw.isclosed():
            try:
                if raw.length is not None and raw.length <= 64 * 1024:
                    raw.read()
            except (OSError, http.client.HTTPException):
                pass
        if not raw.isclosed() or raw.will_close:
            self.drop(origin(response.url))

    @contextlib.contextmanager
    def open(
        self, method: str, url: str, *, secret: Mapping[str, str], name: str,
        extra: Mapping[str, str] | None = None, first_hop: Callable[[Response], None] | None = None,
    ) -> Iterator[Response]:
        """Send, following redirects by the policy above; `name` says what is fetched in error messages.

        `first_hop` sees the first answer (the hub's resolve response with X-Linked-Etag) before it is followed.
        """
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            headers = hop_headers(secret, url, current, {"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                                         **(extra or {})})
            response = self._send(method, current, headers)
            try:
                if hop == 0 and first_hop is not None:
                    first_hop(response)
                location = response.headers.get("location")
                if response.status in REDIRECTS and location:
                    current = redirect_target(current, location)
                    continue
                if response.status >= 400:
                    raise error_for_status(response.status, f"{name} ({redact_url(response.url)})", response.headers,
                                           token_given=bool(secret),
                                           hub=self.hub is not None and same_origin(self.hub, response.url))
                yield response
                return
            finally:
                self._finish(response)
        raise SourceError(f"{name}: more than {MAX_REDIRECTS} redirects")
