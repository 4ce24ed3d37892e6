"""scripts/build-images.sh (the real nodes' images): the `--cached` contract, the refs it reads from the chart, the
kit and pyproject, a cache split so that only what changed is rebuilt (`--plan` on a copy of the repo's inputs),
and, where the images are built, the archives themselves (images.json, and each config through skopeo)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.tiers import REPO, in_ci

SCRIPT = REPO / "scripts" / "build-images.sh"
NAMES = ["base", "operator", "llama-server", "client", "pause", "coredns"]
NOT_BUILT = "the images are not built yet: `make images` builds them (after make llama-server node-kit)"
# What the script reads: the Dockerfile's build context, the chart's tags, its own Containerfiles.
INPUTS = ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "operator", "hack/images",
          "scripts/build-images.sh", "charts/llama-operator/Chart.yaml", "charts/llama-operator/values.yaml"]


def _run(script: Path, *args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LLAMA_SERVER_BIN", "LLAMA_OPERATOR_NODE_KIT_DIR")}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**environ, "LLAMA_OPERATOR_CACHE": str(cache), **env})


def test_cached_without_images_exits_3_with_one_line_saying_how(tmp_path: Path) -> None:
    proc = _run(SCRIPT, "--cached", cache=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [NOT_BUILT]
    assert list(tmp_path.iterdir()) == [], "--cached never builds"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the script's inputs (the tests change them; the real tree is shared)."""
    copy = tmp_path / "repo"
    for name in INPUTS:
        source, target = REPO / name, copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    return copy


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """A stand-in llama-server and the ggml-rpc-server beside it (dynamically linked programs, as the real ones are)
    and node kit."""
    kit = tmp_path / "kit"
    kit.mkdir()
    for program in ("pause", "coredns"):
        shutil.copy2("/bin/true", kit / program)
    (kit / "versions.json").write_text(json.dumps({"parts": {"pause": "1.0", "coredns": "v1.15.0"}}))
    shutil.copy2("/bin/true", tmp_path / "llama-server")
    shutil.copy2("/bin/true", tmp_path / "ggml-rpc-server")
    return {"LLAMA_SERVER_BIN": str(tmp_path / "llama-server"), "LLAMA_OPERATOR_NODE_KIT_DIR": str(kit)}


def _plan(repo: Path, cache: Path, inputs: dict[str, str]) -> tuple[dict[str, tuple[str, str]], str]:
    proc = _run(repo / "scripts" / "build-images.sh", "--plan", cache=cache, **inputs)
    assert proc.returncode == 0, proc.stderr
    *rows, dest = proc.stdout.strip().splitlines()
    plan = {name: (ref, entry) for name, ref, entry in (row.split("\t") for row in rows)}
    assert list(plan) == NAMES
    return plan, dest


def test_cached_with_every_input_but_no_build_exits_3(repo: Path, tmp_path: Path, inputs: dict[str, str]) -> None:
    proc = _run(repo / "scripts" / "build-images.sh", "--cached", cache=tmp_path / "cache", **inputs)
    assert (proc.returncode, proc.stderr.strip()) == (3, NOT_BUILT)


def test_a_missing_input_is_one_line_naming_its_variable(tmp_path: Path, inputs: dict[str, str]) -> None:
    proc = _run(SCRIPT, "--plan", cache=tmp_path, **{**inputs, "LLAMA_SERVER_BIN": str(tmp_path / "nope")})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "LLAMA_SERVER_BIN" in proc.stderr and "make llama-server" in proc.stderr
    proc = _run(SCRIPT, "--plan", cache=tmp_path, **{**inputs, "LLAMA_OPERATOR_NODE_KIT_DIR": str(tmp_path)})
    assert proc.returncode == 2 and "LLAMA_OPERATOR_NODE_KIT_DIR" in proc.stderr and "make node-kit" in proc.stderr
    Path(inputs["LLAMA_SERVER_BIN"]).with_name("ggml-rpc-server").unlink()  # a llama-server built without RPC
    proc = _run(SCRIPT, "--plan", cache=tmp_path, **inputs)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "ggml-rpc-server" in proc.stderr and "make llama-server" in proc.stderr


def test_refs_come_from_the_chart_and_the_kit_without_a_registry_host(repo: Path, tmp_path: Path,
                                                                     inputs: dict[str, str]) -> None:
    plan, dest = _plan(repo, tmp_path, inputs)
    assert {name: ref for name, (ref, _) in plan.items()} == {
        "base": "llama-operator/base:bookworm",
        "operator": "llama-operator/llama-operator:0.1.0",  # Chart.yaml's appVersion
        "llama-server": "ggml-org/llama.cpp:server-b11312",  # values.yaml's llamaServerImages.cpu, less ghcr.io
        "client": "llama-operator/client:0.1.0",
        "pause": "llama-operator/pause:1.0",  # the kit's versions.json
        "coredns": "coredns/coredns:v1.15.0",
    }
    assert Path(dest).parent == tmp_path and Path(dest).name.startswith("images-0.1.0-")

    chart = repo / "charts/llama-operator/Chart.yaml"
    chart.write_text(chart.read_text().replace('appVersion: "0.1.0"', 'appVersion: "0.2.0"'))
    values = repo / "charts/llama-operator/values.yaml"
    values.write_text(values.read_text().replace("cpu: ghcr.io/ggml-org/llama.cpp:server-b11312",
                                                 "cpu: registry.example.com:5000/llama/server:b1"))
    Path(inputs["LLAMA_OPERATOR_NODE_KIT_DIR"], "versions.json").write_text(
        json.dumps({"parts": {"pause": "2.0", "coredns": "v1.16.0"}}))
    changed, _ = _plan(repo, tmp_path, inputs)
    assert changed["operator"][0] == "llama-operator/llama-operator:0.2.0"
    assert changed["llama-server"][0] == "llama/server:b1"
    assert (changed["pause"][0], changed["coredns"][0]) == ("llama-operator/pause:2.0", "coredns/coredns:v1.16.0")
    assert changed["base"] == plan["base"], "the base depends on none of them"


def _changed(before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]]) -> set[str]:
    return {name for name in NAMES if before[name][1] != after[name][1]}


def test_each_image_is_rebuilt_only_when_its_own_inputs_change(repo: Path, tmp_path: Path,
                                                               inputs: dict[str, str]) -> None:
    plan, dest = _plan(repo, tmp_path, inputs)
    assert _plan(repo, tmp_path, inputs) == (plan, dest), "the keys are stable"

    (repo / "docs").mkdir()
    (repo / "docs" / "x.md").write_text("not in any image\n")
    (repo / "operator" / "llama_operator" / "__pycache__").mkdir(exist_ok=True)
    (repo / "operator" / "llama_operator" / "__pycache__" / "x.pyc").write_bytes(b"ignored by .dockerignore")
    assert _plan(repo, tmp_path, inputs) == (plan, dest)

    steps = [
        (lambda: (repo / "operator" / "llama_operator" / "new.py").write_text("x = 1\n"), {"operator"}),
        (lambda: (repo / "README.md").write_text("changed\n"), {"operator"}),
        (lambda: Path(inputs["LLAMA_SERVER_BIN"]).write_bytes(Path("/bin/ls").read_bytes()), {"llama-server"}),
        (lambda: Path(inputs["LLAMA_SERVER_BIN"]).with_name("ggml-rpc-server").write_bytes(b"#!/bin/sh\n"),
         {"llama-server"}),
        (lambda: (repo / "hack/images/client/Containerfile").write_text("FROM scratch\n"), {"client"}),
        (lambda: shutil.copy2("/bin/ls", Path(inputs["LLAMA_OPERATOR_NODE_KIT_DIR"]) / "coredns"), {"coredns"}),
        (lambda: (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text().replace(
            '"openai>=2,<4"', '"openai>=3,<4"')), {"operator", "client"}),
    ]
    for change, rebuilt in steps:
        change()
        after, after_dest = _plan(repo, tmp_path, inputs)
        assert _changed(plan, after) == rebuilt
        assert after_dest != dest
        plan, dest = after, after_dest

    script = repo / "scripts" / "build-images.sh"
    script.write_text(script.read_text().replace("BASE_SERIAL=2026-12-03", "BASE_SERIAL=2027-01-01"))
    after, _ = _plan(repo, tmp_path, inputs)
    assert _changed(plan, after) == {"base", "operator", "client"}, "a new base: what is built on it"


# --- the built images: $LLAMA_OPERATOR_IMAGES_DIR, else what `make images` built (--cached) ------------------------

def _images_dir() -> Path:
    configured = os.environ.get("LLAMA_OPERATOR_IMAGES_DIR")
    if configured:
        return Path(configured)
    proc = subprocess.run([str(SCRIPT), "--cached"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = f"the images are not built: {proc.stderr.strip()}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return Path(proc.stdout.strip().splitlines()[-1])


def _config(archive: Path) -> dict[str, object]:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        if in_ci():
            pytest.fail("skopeo is missing (.ci/run installs it)", pytrace=False)
        pytest.skip("needs skopeo (apt-get install skopeo)")
    proc = subprocess.run([skopeo, "inspect", "--config", f"oci-archive:{archive}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["config"]


def _files(archive: Path) -> dict[str, int]:
    """Every regular file of an OCI archive's image (its layers in order, whiteouts ignored): path → mode."""
    files: dict[str, int] = {}
    with tarfile.open(archive) as oci:
        def blob(digest: str) -> bytes:
            member = oci.extractfile("blobs/" + digest.replace(":", "/"))
            assert member is not None, digest
            return member.read()

        (manifest,) = json.loads(oci.extractfile("index.json").read())["manifests"]  # type: ignore[union-attr]
        for layer in json.loads(blob(manifest["digest"]))["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as tar:
                files.update({"/" + m.name.removeprefix("./"): m.mode for m in tar if m.isfile()})
    return files


def test_the_built_images_load_with_the_config_the_chart_relies_on() -> None:
    directory = _images_dir()
    images = json.loads((directory / "images.json").read_text())
    assert list(images) == NAMES
    for name, image in images.items():
        assert (directory / image["archive"]).is_file(), name
        assert ":" in image["ref"] and "." not in image["ref"].split("/")[0], f"{name}: a ref without a host"
    operator = _config(directory / images["operator"]["archive"])
    assert operator["User"] == "65532:65532" and operator["Entrypoint"] == ["llama-operator"]
    server = _config(directory / images["llama-server"]["archive"])
    assert server["User"] == "65532:65532" and server["Entrypoint"] == ["/app/llama-server"]
    files = _files(directory / images["llama-server"]["archive"])
    for program in ("/app/llama-server", "/app/ggml-rpc-server"):  # the worker of a distributed LlamaServer
        assert files.get(program, 0) & 0o001, f"{program} is not an executable for all in the image"
    assert _config(directory / images["pause"]["archive"])["Entrypoint"] == ["/pause"]
    assert _config(directory / images["coredns"]["archive"])["Entrypoint"] == ["/coredns"]
