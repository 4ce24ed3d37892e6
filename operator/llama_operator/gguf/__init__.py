"""Streaming GGUF header reader: metadata and tensor shapes without downloading the weights, within a budget.

- `parser`: the header layout and its parser (`read_header`), run in a worker thread under a deadline;
- `limits`: the budget (bytes, counts, lengths, time) every tenant-controlled header is read within;
- `byte_sources`: where the bytes come from (a file, HTTP range requests behind a redirect follower);
- `header`: the parsed header and the scalar `GgufInfo` it gives status.

The ggml type facts and the tensor summary live in `llamacpp.ggml`; the memory shape in `fit`; the
`llama-operator inspect` command in `inspect_cli`. Everything here raises the project's errors (errors.py):
`NotAGguf` for a header that is not one, the source errors for transport and HTTP trouble.
"""

from .byte_sources import ByteSource, FileByteSource, HttpByteSource, send_following, transport_error
from .header import GgufHeader, summary
from .limits import DEFAULT_BUDGET, Budget
from .parser import read_header

__all__ = [
    "DEFAULT_BUDGET",
    "Budget",
    "ByteSource",
    "FileByteSource",
    "GgufHeader",
    "HttpByteSource",
    "read_header",
    "send_following",
    "summary",
    "transport_error",
]
