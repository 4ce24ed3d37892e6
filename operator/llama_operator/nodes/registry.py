"""The local OCI registry the nodes pull from: `registry` (distribution) on 127.0.0.1:<free port>, storage in the
state directory, and `push`, which copies every image archive of an images directory (scripts/build-images.sh,
its images.json) into it with skopeo, so an image's path is build -> push -> pull as on any cluster."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..controlplane.cluster import free_port
from .processes import NodesError, Process, child_env, run


def registry_config(storage: Path, port: int) -> dict[str, object]:
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "local-only"},
    }


@dataclass
class Registry:
    binary: Path
    state_dir: Path
    skopeo: Path
    port: int = 0
    process: Process | None = field(default=None, init=False)

    @property
    def host(self) -> str:
        """`127.0.0.1:<port>`: the prefix of every image reference the nodes pull."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Registry:
        self.port = self.port or free_port()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "registry.yaml"
        config.write_text(yaml.safe_dump(registry_config(self.state_dir / "storage", self.port)))
        self.process = Process("registry", [str(self.binary), "serve", str(config)],
                               self.state_dir / "registry.log").start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running():
                raise self.process.error("exited during start-up")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):  # noqa: S310 - loopback
                    return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise self.process.error(f"did not answer on {self.host} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def push(self, images_dir: Path) -> dict[str, str]:
        """Every archive of images_dir/images.json into the registry; returns {name: "127.0.0.1:<port>/<ref>"}."""
        try:
            table = json.loads((images_dir / "images.json").read_text())
        except (OSError, ValueError) as exc:
            raise NodesError(f"no readable images.json in {images_dir} ({exc}): `make images` builds them") from None
        refs = {}
        for name, image in table.items():
            archive = images_dir / image["archive"]
            target = f"{self.host}/{image['ref']}"
            run([self.skopeo, "copy", "--quiet", "--insecure-policy", "--dest-tls-verify=false",
                 f"oci-archive:{archive}", f"docker://{target}"], env=child_env(), timeout=600)
            refs[name] = target
        return refs
