"""Times as Kubernetes writes them: RFC 3339 in UTC with a `Z`, to the second (status, conditions, pod and node
status) or to the microsecond (Lease renewals, kubelet log lines); and back to epoch seconds. No imports from the
package: every layer may use it."""

from __future__ import annotations

import datetime
import time

_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
_MICROSECONDS = "%Y-%m-%dT%H:%M:%S.%fZ"


def rfc3339(seconds: float | None = None, *, micro: bool = False) -> str:
    """Epoch seconds (default: now) as RFC 3339 UTC, to the second or (`micro`) to the microsecond."""
    stamp = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, tz=datetime.UTC)
    return stamp.strftime(_MICROSECONDS if micro else _SECONDS)


def now_rfc3339(*, micro: bool = False) -> str:
    """Now, as RFC 3339 UTC."""
    return rfc3339(micro=micro)


def parse_rfc3339(text: str | None) -> float | None:
    """RFC 3339 back to epoch seconds; None for None or anything unparsable."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
