"""The checked-in flag catalog matches the pinned llama-server binary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llama_operator.llamacpp import LLAMA_CPP_BUILD
from llama_operator.llamacpp.catalog import load_catalog

from ..llama_bin import llama_server_bin

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / f"operator/llama_operator/llamacpp/catalog-{LLAMA_CPP_BUILD}.json"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_flag_catalog", ROOT / "scripts/gen-flag-catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.runtime
def test_catalog_has_not_drifted_from_the_binary():
    gen = _generator()
    fresh = gen.render(gen.build_catalog(llama_server_bin()))
    assert json.loads(fresh) == json.loads(CATALOG.read_text()), (
        "the flag catalog drifted from the binary: run scripts/gen-flag-catalog.py $LLAMA_SERVER_BIN"
    )
    assert fresh == CATALOG.read_text()


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
