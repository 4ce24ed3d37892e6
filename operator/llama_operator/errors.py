"""One error taxonomy for the operator and the fetcher, and what each kind of error means for retrying.

Every error raised on purpose is an `OperatorError`; its class says three things: `reason` (the CamelCase
condition reason or termination-message prefix), `exit_code` (for `llama-operator fetch`) and `retry`:

- ``never``   — a bad spec (or a request the API server rejects as invalid): nothing changes until the
  object's generation does, so it is not retried (the next spec change reconciles it again);
- ``slow``    — RBAC forbids a request: an installation problem, retried slowly (`RetryPolicy.forbidden`)
  with the missing permission named;
- ``backoff`` — transient trouble (API server or model source unreachable, 5xx, 429, a conflict) and
  anything unexpected: capped exponential backoff with jitter, honouring a server's Retry-After.

The category classes (`InvalidSpec`, `PermissionDenied`, `Transient`) are mixed into the concrete ones by
inheritance, so `kube.Unavailable` is a `Transient` and `SourceUnreachable` is one too; the retry loops ask
`exc.retry` (operator) or `isinstance(exc, Transient)` (fetcher) and nothing else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from . import contract

Retry = Literal["never", "slow", "backoff"]


class OperatorError(Exception):
    """Base of every error raised on purpose. Unexpected exceptions (bugs) are treated like `backoff`."""

    reason: ClassVar[str] = "Error"
    exit_code: ClassVar[int] = contract.EXIT_ERROR
    retry: ClassVar[Retry] = "backoff"
    reported: ClassVar[bool] = False
    """True when the code that raised it already wrote what it means into the object's status."""

    def __init__(self, message: str = "", *args: Any) -> None:
        super().__init__(message, *args)

    @property
    def transient(self) -> bool:
        return isinstance(self, Transient)


class CliError(Exception):
    """A user-facing command-line error: `llama-operator` prints it as one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------- categories


class InvalidSpec(OperatorError):
    """The object's spec cannot work as written; the message names the field. Retried only on a new generation."""

    reason = "InvalidSpec"
    retry = "never"


class PermissionDenied(OperatorError):
    """RBAC forbids a request; `permission` names it (`patch deployments.apps in namespace x`)."""

    reason = "Forbidden"
    retry = "slow"

    def __init__(self, message: str = "", *args: Any, permission: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.permission = permission


class Transient(OperatorError):
    """Worth trying again later; `retry_after` is the delay a server asked for, in seconds."""

    reason = "Unavailable"
    retry = "backoff"

    def __init__(self, message: str = "", *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.retry_after = retry_after


class RetryLater(Transient):  # noqa: N818  (a signal, not a failure)
    """Transient trouble the reconcile already reported in status: only the retry is left to schedule."""

    reason = "RetryLater"
    reported = True


# ---------------------------------------------------------------------------------------------- Kubernetes API


class KubeError(OperatorError):
    """The API server refused or failed a request; `status` is the HTTP status (0: no answer)."""

    reason = "ApiError"

    def __init__(self, message: str = "", *args: Any, status: int = 0, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.status = status


class NotFound(KubeError):
    """404: the object does not exist."""

    reason = "NotFound"


class Conflict(Transient, KubeError):
    """409: a conflicting write (resourceVersion or SSA field ownership); the next attempt reads afresh."""

    reason = "Conflict"


class Invalid(InvalidSpec, KubeError):
    """400/422: the API server rejected an object built from the spec; retrying the same write cannot help."""

    reason = "Rejected"


class Forbidden(PermissionDenied, KubeError):
    """401/403: RBAC does not allow this; an installation problem, not a transient one."""

    reason = "Forbidden"


class Unavailable(Transient, KubeError):
    """The API server could not be reached or answered 5xx/429."""

    reason = "Unavailable"


# ---------------------------------------------------------------------------------------------- model sources
# Raised by `sources` (the operator resolving a source) and by `fetch` (the init container downloading it):
# the same failure has the same class, reason and exit code on both sides.


class SourceError(OperatorError):
    """The model source cannot be resolved or fetched as specified."""

    reason = "SourceError"
    retry = "never"


class InvalidArguments(SourceError):
    """The fetcher's command line is unusable."""

    reason = "InvalidArguments"
    exit_code = contract.EXIT_USAGE


class SourceNotFound(SourceError):
    """The repository, revision or file does not exist (HTTP 404)."""

    reason = "NotFound"
    exit_code = contract.EXIT_NOT_FOUND


class SourceUnauthorized(SourceError):
    """The source needs credentials (HTTP 401, gated or private repository)."""

    reason = "Unauthorized"
    exit_code = contract.EXIT_UNAUTHORIZED


class SourceForbidden(SourceUnauthorized):
    """The credentials were refused (HTTP 403, or the gated repository's terms were not accepted)."""

    reason = "Forbidden"
    exit_code = contract.EXIT_FORBIDDEN


class ChecksumMismatch(SourceError):
    """The expected sha256 differs from the one the source publishes or the downloaded bytes have."""

    reason = "ChecksumMismatch"
    exit_code = contract.EXIT_CHECKSUM


class NotAGguf(SourceError):
    """The file is not a GGUF file (bad magic) or its header is unreadable."""

    reason = "NotAGguf"
    exit_code = contract.EXIT_NOT_GGUF


class WrongFileKind(SourceError):
    """A model where spec.adapterFor expects a LoRA adapter, or an adapter where a model is expected."""

    reason = "WrongFileKind"


class DiskFull(SourceError):
    """The cache volume has no room for the model."""

    reason = "DiskFull"
    exit_code = contract.EXIT_DISK_FULL


class InvalidSource(SourceError):
    """A URL, revision or path the source cannot be fetched from as written (a `..` component)."""

    reason = "InvalidSource"
    exit_code = contract.EXIT_USAGE


class SourceTooLarge(SourceError):
    """A download with no declared size passed its cap (cache.size, else the fetcher's default)."""

    reason = "TooLarge"
    exit_code = contract.EXIT_DISK_FULL


class SourceAddressRefused(SourceError):
    """A source (or a redirect) leads to an address the operator does not fetch from (docs/security.md#egress)."""

    reason = "AddressNotAllowed"


class SecretNotAllowed(SourceError):
    """A Secret named as source credentials has not opted in (docs/model-sources.md#credentials)."""

    reason = "SecretNotAllowed"


class InvalidSecret(SourceError):
    """A Secret value cannot be sent as an HTTP header (a line break or control character); never shows it."""

    reason = "InvalidSecret"
    exit_code = contract.EXIT_USAGE


class SourceUnreachable(Transient, SourceError):
    """Connection error, timeout, HTTP 5xx / 429 / 408: retried with backoff."""

    reason = "Unreachable"
    exit_code = contract.EXIT_UNREACHABLE


class InterruptedFetch(OperatorError):
    """SIGTERM: the fetcher saved its state; the next run resumes."""

    reason = "Interrupted"
    exit_code = contract.EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------- retry policy


def backoff(
    attempt: int, *, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with "equal jitter": half the ceiling fixed, half random.

    Attempt 1 waits base/2..base, doubling up to cap/2..cap; a server's Retry-After wins when it asks for
    longer (bounded by 10 x cap, so a broken header cannot park a retry for days).
    """
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 10 * cap))
    return delay


@dataclass(frozen=True)
class RetryPolicy:
    """When the operator reconciles an object again after a failed reconcile."""

    base: float = 5.0
    """First backoff ceiling in seconds; doubles per consecutive failure."""
    cap: float = 300.0
    """Largest backoff ceiling."""
    forbidden: float = 300.0
    """Delay after an RBAC refusal (jittered by +-10%): fixing RBAC takes a person."""

    def delay(self, exc: BaseException, attempt: int, rng: random.Random | None = None) -> float | None:
        """Seconds until the next attempt, or None: do not retry until the object's generation changes."""
        kind: Retry = getattr(exc, "retry", "backoff")
        if kind == "never":
            return None
        if kind == "slow":
            return self.forbidden * (rng or random).uniform(0.9, 1.1)
        return backoff(attempt, base=self.base, cap=self.cap, retry_after=getattr(exc, "retry_after", None), rng=rng)


def status_message(exc: BaseException) -> str:
    """What a person reads in status: the message, the missing permission, or the type of an unexpected error."""
    if isinstance(exc, PermissionDenied):
        what = f"the operator is not allowed to {exc.permission}" if exc.permission else "forbidden"
        return f"{what} (grant it in the operator's RBAC, e.g. the chart's ClusterRole): {exc}"
    if isinstance(exc, OperatorError):
        return str(exc) or type(exc).__name__
    return f"internal error: {type(exc).__name__}: {exc}"


def reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, OperatorError) else "InternalError"
