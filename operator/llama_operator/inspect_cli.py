"""`llama-operator inspect`: a GGUF file's header (local path or http(s) URL) as JSON, or with `--fit` the memory a
llama-server needs for it. Reads within the same header budget as the operator (gguf.limits); every failure is
one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import httpx

from .api.v1beta1 import GgufInfo
from .errors import OperatorError
from .fetch.http import redact_url
from .fit import FitSettings, estimate, model_info, table
from .gguf import ByteSource, FileByteSource, HttpByteSource, read_header, summary


async def inspect(target: str, *, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the header of a local path or an http(s) URL; the result is what `llama-operator inspect` prints."""
    started = time.perf_counter()
    source: ByteSource
    requests: int | None = None
    if target.startswith(("http://", "https://")):
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
            http_source = HttpByteSource(client, target, headers)
            source = http_source
            header = await read_header(source)
            requests = http_source.requests
    else:
        source = FileByteSource(target)
        header = await read_header(source)
    info = await asyncio.to_thread(model_info, header)
    elapsed = time.perf_counter() - started
    return {
        "source": redact_url(target) if requests is not None else target,
        "gguf": info.model_dump(by_alias=True, exclude_none=True),
        "version": header.version,
        "tensorCount": header.tensor_count,
        "headerBytes": header.header_size,
        "bytesFetched": source.bytes_fetched,
        "requests": requests,
        "elapsedSeconds": round(elapsed, 4),
        "metadata": summary(header),
    }


def _cmd_inspect(args: Any) -> int:
    # Same secret sources as `fetch`: a token for gated hub files, extra headers for private HTTP servers.
    headers = {
        key[len("LLAMA_FETCH_HEADER_") :].replace("_", "-"): value
        for key, value in os.environ.items()
        if key.startswith("LLAMA_FETCH_HEADER_") and len(key) > len("LLAMA_FETCH_HEADER_")
    }
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    try:
        result = asyncio.run(inspect(args.target, headers=headers))
    except OperatorError as exc:
        print(f"llama-operator inspect: {exc}", file=sys.stderr)
        return 1
    if not args.metadata:
        result.pop("metadata")
    if args.fit:
        return _print_fit(args, result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _print_fit(args: Any, result: dict[str, Any]) -> int:
    info = GgufInfo.model_validate(result["gguf"])
    if info.memory is None:
        print("llama-operator inspect: the header lacks the architecture or block count: no estimate",
              file=sys.stderr)
        return 1
    gpu_layers: int | str | None = args.gpu_layers
    if isinstance(gpu_layers, str) and gpu_layers.isdigit():
        gpu_layers = int(gpu_layers)
    settings = FitSettings(
        context_size=args.ctx_size,
        parallel=args.parallel,
        kv_unified=args.kv_unified,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attention=args.flash_attn,
        batch_size=args.batch_size,
        ubatch_size=args.ubatch_size,
        gpu_count=args.gpus,
        gpu_layers=gpu_layers,  # type: ignore[arg-type]
        tensor_split=[float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None,
        embedding=args.embedding,
        cache_ram_mib=args.cache_ram,
    )
    try:
        fit = estimate(info.memory, settings, trained_context=info.context_length)
    except ValueError as exc:
        print(f"llama-operator inspect: {exc}", file=sys.stderr)
        return 1
    shape = info.memory
    print(f"{result['source']}: {info.architecture} {info.size_label or ''} {info.file_type or ''}, "
          f"{shape.layers} layers ({shape.attention_layers} full attention, {shape.sliding_window_layers} "
          f"sliding window, {shape.recurrent_layers} recurrent), trained context {info.context_length}")
    print(table(fit))
    return 0


def register(sub: Any) -> None:
    """Add the `inspect` subcommand to the llama-operator command line."""
    parser = sub.add_parser(
        "inspect",
        help="print a GGUF file's header (architecture, quantization, parameters) as JSON",
        description="Read only the GGUF header of a local file or an http(s) URL (range requests) and print it as "
        "JSON, with the bytes fetched and the time taken. HF_TOKEN / LLAMA_FETCH_HEADER_<Name> env vars "
        "authenticate.",
    )
    parser.add_argument("target", help="path or http(s) URL of a .gguf file")
    parser.add_argument("--metadata", action="store_true", help="also print every scalar metadata key")
    fit = parser.add_argument_group(
        "memory fit", "--fit prints the memory llama-server needs per device instead of JSON; the other options "
        "are the llama-server settings it assumes (llama-server's defaults when omitted)")
    fit.add_argument("--fit", action="store_true", help="print the memory estimate (docs/memory-fit.md)")
    fit.add_argument("-c", "--ctx-size", type=int, help="total context across slots (default: trained context)")
    fit.add_argument("-np", "--parallel", type=int, help="slots (default: auto = 4 with a unified KV cache)")
    fit.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=None,
                     help="one KV stream shared by the slots (default: only when --parallel is not given)")
    kv_types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    fit.add_argument("-ctk", "--cache-type-k", default="f16", choices=kv_types, help="K cache type (f16)")
    fit.add_argument("-ctv", "--cache-type-v", default="f16", choices=kv_types, help="V cache type (f16)")
    fit.add_argument("-fa", "--flash-attn", default="auto", choices=["auto", "on", "off"], help="(auto)")
    fit.add_argument("-b", "--batch-size", type=int, help="logical batch (2048)")
    fit.add_argument("-ub", "--ubatch-size", type=int, help="physical batch (512)")
    fit.add_argument("--gpus", type=int, default=0, help="GPUs per replica (0: CPU only)")
    fit.add_argument("-ngl", "--gpu-layers", default=None, help="layers on the GPUs: a number, auto or all (all)")
    fit.add_argument("-ts", "--tensor-split", help="share per GPU, e.g. 3,1")
    fit.add_argument("--embedding", action="store_true", help="embedding/rerank mode (one output per token)")
    fit.add_argument("--cache-ram", type=int, default=8192, help="prompt cache limit in MiB (8192)")
    parser.set_defaults(func=_cmd_inspect)
