"""The fetch command line is written by the builders and parsed by the fetcher from one definition."""

from __future__ import annotations

import argparse

from llama_operator.fetch.command import FetchCommand, add_arguments, parse


def _fetcher_parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(args[1:])


def test_every_field_the_builders_write_is_what_the_fetcher_reads() -> None:
    hub = FetchCommand(cache_dir="/models", cache_key="k-1", hf_repo="o/r", hf_file="a.gguf", hf_revision="v1",
                       hf_endpoint="https://hub.example", sha256="ab" * 32, trust_on_first_use=True, max_size=7)
    url = FetchCommand(cache_dir="/models", cache_key="k-2", url="https://example.com/m.gguf")
    assert parse(hub.to_args()) == hub
    for command in (hub, url):
        read = _fetcher_parse(command.to_args())
        assert (read.cache_dir, read.cache_key, read.url, read.sha256) == (
            command.cache_dir, command.cache_key, command.url, command.sha256)
        assert read.trust_on_first_use is command.trust_on_first_use
    # Flags the operator leaves out get the fetcher's defaults (64 GiB cap, the public hub).
    assert parse(url.to_args()).max_size == _fetcher_parse(url.to_args()).max_size > 0


def test_args_that_are_not_a_fetch_command_line_give_none() -> None:
    assert parse([]) is None
    assert parse(["serve", "--cache-key", "k"]) is None
    assert parse(["fetch", "--sha256"]) is None  # a flag without its value
    assert parse(["fetch", "--cache-dir", "/m"]) is None  # no cache key
