"""`llama-operator validate-args -- <flags...>`."""

from __future__ import annotations

from llama_operator.cli import main


def test_valid_flags_exit_zero(capsys):
    assert main(["validate-args", "--", "--top-k", "20", "--temp", "0.7"]) == 0
    assert "ok: 4 argument(s)" in capsys.readouterr().out


def test_every_error_is_listed(capsys):
    assert main(["validate-args", "--", "--top-k", "4k", "--mlock", "--metricz", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "args[0]: --top-k expects an integer, got '4k'" in err
    assert "args[2]: --mlock was removed from llama.cpp: use spec.loadMode: mlock" in err
    assert "args[3]: unknown flag '--metricz' (did you mean --metrics?)" in err
    assert "args[4]: --port is managed by the operator" in err
    assert "4 problem(s) in 6 argument(s)" in err
