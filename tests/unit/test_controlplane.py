"""Finding the control-plane binaries: a missing one is a message that says how to build them."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_operator.controlplane import BinariesMissing, find_binaries
from llama_operator.controlplane.binaries import COMMANDS


def test_missing_binaries_name_each_one_and_make_control_plane(tmp_path: Path) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    with pytest.raises(BinariesMissing) as missing:
        find_binaries(tmp_path)
    message = str(missing.value)
    assert f"in {tmp_path}" in message and "`make control-plane`" in message
    assert "LLAMA_OPERATOR_CONTROL_PLANE_DIR" in message
    assert all(command in message for command in COMMANDS if command != "etcd")
    assert "etcd," not in message.split(": ", 1)[1]


def test_a_complete_directory_is_found(tmp_path: Path) -> None:
    for command in COMMANDS:
        (tmp_path / command).write_text("#!/bin/sh\n")
        (tmp_path / command).chmod(0o755)
    found = find_binaries(tmp_path)
    assert found.kube_apiserver == tmp_path / "kube-apiserver" and found.kubectl == tmp_path / "kubectl"
