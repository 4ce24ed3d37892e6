"""The checked-in flag catalog: its shape and lookups. (That it matches the pinned binary is
tests/runtime/test_flags_catalog_drift.py.)"""

from __future__ import annotations

from llama_operator.llamacpp import LLAMA_CPP_BUILD
from llama_operator.llamacpp.catalog import load_catalog


def test_catalog_shape():
    catalog = load_catalog()
    assert catalog.build == LLAMA_CPP_BUILD
    assert len(catalog.options) > 200
    ctx, negative = catalog.lookup("-c")
    assert (ctx.canonical, ctx.kind, ctx.env, negative) == ("--ctx-size", "int", "LLAMA_ARG_CTX_SIZE", False)
    kvo, negative = catalog.lookup("-nkvo")
    assert kvo.canonical == "--kv-offload" and negative and kvo.kind == "bool"
    assert catalog.lookup("--flash-attn")[0].choices == ("on", "off", "auto")
    assert catalog.lookup("-ngl")[0].keywords == ("auto", "all")
    assert catalog.lookup("--tensor-split")[0].is_list
    assert catalog.lookup("--temp")[0].kind == "float"
    assert catalog.lookup("--draft-max")[0].removed.startswith("use --spec-draft-n-max")
    assert catalog.lookup("--mlock") is None
    assert catalog.by_env("LLAMA_API_KEY")[0].canonical == "--api-key"
    assert catalog.by_env("LLAMA_ARG_NO_CONT_BATCHING") == (catalog.lookup("--cont-batching")[0], True)
    spellings = [s for o in catalog.options for s in o.spellings]
    assert len(spellings) == len(set(spellings))
