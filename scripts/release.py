#!/usr/bin/env python3
"""A release into a registry: the operator image, the chart as an OCI artifact, the CRD bundle, notes, checksums.

Usage: release.py VERSION REGISTRY [--images DIR] [--out DIR] [--plain-http]   (`make release VERSION= REGISTRY=`)

VERSION must be the package's version (`llama_operator.__version__`), the chart's version and appVersion and
`values.image.tag`, and have a section in CHANGELOG.md: a release is a commit that bumped them, never a flag that
rewrites them. REGISTRY is `host[:port][/path]`; a loopback one is spoken to over plain HTTP (`--plain-http` for
others). What it does, in order, stopping at the first failure with one line:
1. pushes the operator image of `--images` (scripts/build-images.sh's output: images.json and OCI archives) to
   `REGISTRY/llama-operator/llama-operator:VERSION` with skopeo, and reads back its digest;
2. packages the chart with `image.repository`, `image.tag` and `image.digest` set to that image (the release's
   default image is the one just pushed, by digest) and pushes it to `oci://REGISTRY/charts` with helm;
3. writes into `--out` (default dist/release-VERSION): the chart archive, `crds.yaml` (`llama-operator crds`),
   `NOTES.md` (the CHANGELOG section and the install command) and `SHA256SUMS`.
The llama-server images stay the upstream ones the chart pins (`llamaServerImages`): the release does not rebuild
llama.cpp. One architecture, the builder's (docs/install.md says why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "llama-operator"
IMAGE_PATH = "llama-operator/llama-operator"
VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$")


class ReleaseError(Exception):
    """What stops a release, in one line."""


def run(args: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=900, env=env)
    except FileNotFoundError:
        raise ReleaseError(f"{args[0]} is not installed") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["(no output)"]
        raise ReleaseError(f"{Path(args[0]).name} {args[1]} failed: {last[0][:300]}") from None
    return str(done.stdout)


def changelog_section(version: str, text: str) -> str:
    """The CHANGELOG.md section `## VERSION`, without its heading."""
    match = re.search(rf"^## {re.escape(version)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise ReleaseError(f"CHANGELOG.md has no section '## {version}'")
    return match.group(1).strip() + "\n"


def chart_versions(chart: Path) -> dict[str, str]:
    """What the chart says the release is: its version, appVersion and the operator image's tag."""
    meta = (chart / "Chart.yaml").read_text()
    values = (chart / "values.yaml").read_text()
    found = {
        "Chart.yaml version": re.search(r"^version:\s*\"?([^\"\s]+)", meta, re.M),
        "Chart.yaml appVersion": re.search(r"^appVersion:\s*\"?([^\"\s]+)", meta, re.M),
        "values.yaml image.tag": re.search(r"^image:\n(?:  .*\n|\s*\n)*?  tag:\s*\"?([^\"\s]+)", values, re.M),
    }
    return {what: match.group(1) if match else "(missing)" for what, match in found.items()}


def check_versions(version: str, package_version: str, chart: Path) -> None:
    if not VERSION.match(version):
        raise ReleaseError(f"VERSION {version!r} is not a semantic version (x.y.z)")
    wrong = {what: found for what, found in {"llama_operator.__version__": package_version,
                                            **chart_versions(chart)}.items() if found != version}
    if wrong:
        raise ReleaseError(f"release {version}: bump these first (one commit, with its CHANGELOG section): "
                           + ", ".join(f"{what} is {found}" for what, found in wrong.items()))


def set_image(values: str, repository: str, tag: str, digest: str) -> str:
    """values.yaml with the operator image block's three fields replaced; comments and order kept."""
    block = re.search(r"^image:\n((?:  .*\n|\s*\n)+)", values, re.M)
    if block is None:
        raise ReleaseError("values.yaml has no top-level image block")
    body = block.group(1)
    for key, value in (("repository", repository), ("tag", f'"{tag}"'), ("digest", f'"{digest}"')):
        body, count = re.subn(rf"^  {key}:.*$", f"  {key}: {value}", body, count=1, flags=re.M)
        if count != 1:
            raise ReleaseError(f"values.yaml's image block has no {key}")
    return values[:block.start(1)] + body + values[block.end(1):]


def plain_http(registry: str) -> bool:
    host = registry.split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "[::1]")


def push_image(skopeo: str, archive: Path, target: str, plain: bool, work: Path) -> str:
    digest_file = work / "digest"
    run([skopeo, "copy", "--quiet", "--insecure-policy", *(["--dest-tls-verify=false"] if plain else []),
         "--digestfile", str(digest_file), f"oci-archive:{archive}", f"docker://{target}"])
    digest = digest_file.read_text().strip()
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ReleaseError(f"skopeo wrote no digest for {target} ({digest[:80]!r})")
    return digest


def release(version: str, registry: str, images: Path, out: Path, *, plain: bool, helm: str, skopeo: str) -> Path:
    sys.path.insert(0, str(ROOT / "operator"))
    from llama_operator import __version__

    check_versions(version, __version__, CHART)
    notes = changelog_section(version, (ROOT / "CHANGELOG.md").read_text())
    try:
        table = json.loads((images / "images.json").read_text())
        archive = images / table["operator"]["archive"]
    except (OSError, ValueError, KeyError) as exc:
        raise ReleaseError(f"no operator image in {images}/images.json ({exc}): `make images` builds it") from None
    if table["operator"]["ref"] != f"{IMAGE_PATH}:{version}":
        raise ReleaseError(f"the images in {images} are of {table['operator']['ref']}, not {version}: rebuild them")
    registry = registry.rstrip("/")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repository = f"{registry}/{IMAGE_PATH}"
        digest = push_image(skopeo, archive, f"{repository}:{version}", plain, work)
        staged = work / "llama-operator"
        shutil.copytree(CHART, staged)
        values = staged / "values.yaml"
        values.write_text(set_image(values.read_text(), repository, version, digest))
        run([helm, "lint", "--quiet", str(staged)])
        run([helm, "package", str(staged), "--destination", str(out)])
        package = out / f"llama-operator-{version}.tgz"
        run([helm, "push", str(package), f"oci://{registry}/charts", *(["--plain-http"] if plain else [])])
    crds = run([sys.executable, "-m", "llama_operator.cli", "crds"],
               env={**os.environ, "PYTHONPATH": str(ROOT / "operator")})
    (out / "crds.yaml").write_text(crds)
    (out / "NOTES.md").write_text(
        f"# llama-operator {version}\n\n{notes}\n## Install\n\n```sh\nhelm install llama-operator "
        f"oci://{registry}/charts/llama-operator --version {version} --namespace llama-system --create-namespace\n"
        f"```\n\nOperator image: `{repository}:{version}@{digest}`.\n")
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                            for p in files))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version")
    parser.add_argument("registry", help="host[:port][/path] the image and the chart are pushed to")
    parser.add_argument("--images", type=Path, help="scripts/build-images.sh's output (default: build it)")
    parser.add_argument("--out", type=Path, help="default dist/release-VERSION")
    parser.add_argument("--plain-http", action="store_true", help="HTTP without TLS (implied for loopback)")
    args = parser.parse_args()
    try:
        images = args.images or Path(run([str(ROOT / "scripts" / "build-images.sh")], env={
            **os.environ, "PYTHON": sys.executable}).strip().splitlines()[-1])
        out = release(args.version, args.registry, images, args.out or ROOT / "dist" / f"release-{args.version}",
                      plain=args.plain_http or plain_http(args.registry), helm=os.environ.get("HELM", "helm"),
                      skopeo=os.environ.get("SKOPEO", "skopeo"))
    except ReleaseError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 1
    print(f"released llama-operator {args.version} to {args.registry}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
