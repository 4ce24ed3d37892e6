"""Secret values on their way to a request header, and out of every message.

Owns three rules, shared by the operator (resolving a source) and the fetcher (downloading it):
- a value read from a Secret loses one trailing line break (`echo token > f; kubectl create secret
  --from-file` stores one) and is refused when it still holds a control character or a non-ASCII one: it could
  not be sent as a header, and the transports' errors would print it (`clean`);
- header names are HTTP tokens (`check_header_name`);
- every message that leaves for a termination log, a status, an Event or a log is scrubbed of the known
  secret values (`scrub`, and `ScrubbingFormatter` for log records and their tracebacks).

Messages name the Secret (or environment variable) and key, never the value. Stdlib only: the init container
imports it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from ..contract import GROUP
from ..errors import InvalidSecret

SOURCE_CREDENTIALS_LABEL = f"{GROUP}/source-credentials"
"""A Secret is read as source credentials (tokenSecretRef, headersSecretRef) only with this label set to "true"..."""
SOURCE_CREDENTIALS_TYPE = f"{GROUP}/source-credentials"
"""... or with this type (set at creation, immutable)."""
REDACTED = "[redacted]"
MIN_SCRUB_LENGTH = 4
"""Shorter values (`X-Debug: 1`) are not scrubbed: replacing every `1` would garble messages and hide nothing."""

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # used with fullmatch: `$` would let a final "\n" through


def clean(value: str, *, where: str) -> str:
    """The value to send: one trailing `\\n` (or `\\r\\n`) removed; `where` names the Secret and key.

    Raises `InvalidSecret` when what is left holds a line break, another control character or a non-ASCII
    character (HTTP header values are ASCII; h11 and http.client print the offending value in their errors).
    """
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    value = value.strip(" ")  # HTTP ignores them around a value; h11 refuses a trailing one
    if not _PRINTABLE.fullmatch(value):
        raise InvalidSecret(
            f"{where}: the value holds a line break, a control or a non-ASCII character and cannot be sent as an "
            "HTTP header (one trailing newline is removed; write the value without others, e.g. "
            "kubectl create secret generic NAME --from-literal=KEY=VALUE)")
    return value


def check_header_name(name: str, *, where: str) -> None:
    """Refuse a header name that is not an HTTP token (the key of a headersSecretRef Secret)."""
    if not _TOKEN.fullmatch(name):
        raise InvalidSecret(f"{where}: {name[:64]!r} is not a valid HTTP header name")


def checked_credentials(hf_token: str | None, headers: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """The token and headers to send, cleaned and checked (callers that read Secrets name them in messages
    first; this is the last check before anything is sent)."""
    for name in headers:
        check_header_name(name, where="headersSecretRef")
    return (clean(hf_token, where="tokenSecretRef") if hf_token else None,
            {name: clean(value, where=f"headersSecretRef key {name!r}") for name, value in headers.items()})


def auth_headers(hf_token: str | None, headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a Hugging Face request: the custom ones plus `Authorization: Bearer <token>`."""
    out = dict(headers)
    if hf_token:
        out["Authorization"] = f"Bearer {hf_token}"
    return out


def _forms(value: str) -> set[str]:
    """The value as it may appear in a message: itself, and escaped as in a bytes or str repr."""
    forms = {value, repr(value)[1:-1], repr(value.encode("utf-8", "backslashreplace"))[2:-1]}
    stripped = value.strip()
    if stripped:
        forms.add(stripped)
    return {form for form in forms if len(form) >= MIN_SCRUB_LENGTH}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret value (and its escaped forms) replaced by `[redacted]`."""
    forms: set[str] = set()
    for value in secrets:
        if value:
            forms |= _forms(value)
    for form in sorted(forms, key=len, reverse=True):  # longest first: a value containing another is one hit
        text = text.replace(form, REDACTED)
    return text


class ScrubbingFormatter(logging.Formatter):
    """A formatter whose output (message and traceback) never holds one of `secrets`."""

    def __init__(self, fmt: str | None, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record), self.secrets)


def scrub_logging(secrets: Iterable[str]) -> None:
    """Make every handler of the root logger scrub `secrets` from what it writes."""
    values = tuple(secrets)
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter is not None else None  # noqa: SLF001
        handler.setFormatter(ScrubbingFormatter(fmt, values))
