"""The checked-in flag catalog matches the pinned llama-server binary (regenerated from its --help)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from llama_operator.llamacpp import LLAMA_CPP_BUILD

from ..llama_bin import llama_server_bin

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / f"operator/llama_operator/llamacpp/catalog-{LLAMA_CPP_BUILD}.json"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_flag_catalog", ROOT / "scripts/gen-flag-catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catalog_has_not_drifted_from_the_binary():
    gen = _generator()
    fresh = gen.render(gen.build_catalog(llama_server_bin()))
    assert json.loads(fresh) == json.loads(CATALOG.read_text()), (
        "the flag catalog drifted from the binary: run scripts/gen-flag-catalog.py $LLAMA_SERVER_BIN"
    )
    assert fresh == CATALOG.read_text()
