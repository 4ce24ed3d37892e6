"""What a sandbox container runs: its command line and environment, with container paths rewritten.

The image becomes a local executable (images.py); `env`/`envFrom` resolve from Secrets, ConfigMaps and the pod's
own fields, `$(VAR)` expands like Kubernetes; the node adds the `kubernetes` Service variables and its egress
proxy, and passes through only what finding shared libraries needs. There is no root filesystem of the
container's own, so volume mount paths in arguments and environment are rewritten to the volumes' directories
(volumes.py), except under /run, which is a private tmpfs with real bind mounts (network.py).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

from .images import LocalImage, PathMap
from .network import under_run
from .pod import ConfigError, Pod
from .volumes import PodVolumes

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# Environment a container inherits from the node: enough to find shared libraries. Nothing else leaks in (a
# stray LLAMA_ARG_* or HF_TOKEN would change behaviour); proxies are the node's own (network.py).
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "LD_LIBRARY_PATH")

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables expand, `$$` escapes, unknown references stay."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR.sub(sub, value)


class ContainerCommands:
    """The command lines of one pod's containers (and of their exec probes)."""

    def __init__(self, pod: Pod, volumes: PodVolumes) -> None:
        self.pod = pod
        self.volumes = volumes

    async def command(self, container: dict[str, Any], termination_file: Path
                      ) -> tuple[list[str], dict[str, str], LocalImage, dict[str, str]]:
        """(argv, environment, image, bind mounts under /run) of `container`; ImageError for an image the
        sandbox cannot run, ConfigError for a reference that cannot be resolved yet."""
        image = self.pod.node.images.resolve(container.get("image", ""))
        paths, run_mounts = self._mounts(container, termination_file)
        user_env = await self._environment(container)
        env = self._node_env()
        env.update({k: v.format(termination_log=termination_file) for k, v in image.env.items()})
        env.update({k: paths.rewrite(v) for k, v in user_env.items()})
        command = [paths.rewrite(expand(a, user_env)) for a in container.get("command") or []]
        args = [paths.rewrite(expand(a, user_env)) for a in container.get("args") or []]
        return image.command(command or None, args), env, image, run_mounts

    async def _secret_value(self, plural: str, ref: dict[str, Any]) -> str | None:
        obj = await self.pod.read(plural, ref.get("name", ""))
        kind = "secret" if plural == "secrets" else "configmap"
        if obj is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{kind} "{ref.get("name")}" not found')
        raw = (obj.get("data") or {}).get(ref["key"])
        value = (base64.b64decode(raw).decode() if raw is not None else None) if plural == "secrets" else raw
        if value is None and not ref.get("optional"):
            raise ConfigError(
                f'couldn\'t find key {ref["key"]} in {kind.capitalize()} {self.pod.namespace}/{ref["name"]}')
        return value

    async def _environment(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for plural, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                if key not in source:
                    continue
                ref = source[key]
                obj = await self.pod.read(plural, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{plural[:-1]} "{ref.get("name")}" not found')
                for name, value in (obj.get("data") or {}).items():
                    env[prefix + name] = base64.b64decode(value).decode() if plural == "secrets" else value
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            value: str | None = ""
            if "secretKeyRef" in source:
                value = await self._secret_value("secrets", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = await self._secret_value("configmaps", source["configMapKeyRef"])
            elif "fieldRef" in source:
                value = self.pod.field(source["fieldRef"].get("fieldPath", ""))
            if value is not None:
                env[item["name"]] = value
        return env

    def _node_env(self) -> dict[str, str]:
        """What the node gives every container: the `kubernetes` Service variables (pointing at the node's
        forwarder to the API server) and the node's egress proxy."""
        node = self.pod.node
        host, port = node.node_ip, str(node.api_port)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.update({
            "HOSTNAME": self.pod.name,
            "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        })
        no_proxy = ",".join([host, node.network.cidr, ".svc", ".cluster.local"])
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = node.proxy_url
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def _mounts(self, container: dict[str, Any], termination_file: Path) -> tuple[PathMap, dict[str, str]]:
        """(rewriting of container paths, real bind mounts under /run)."""
        mounts: dict[str, str] = {}
        run_mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            host = self.volumes.paths.get(mount["name"])
            if host is None:
                continue
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            run_path = under_run(mount["mountPath"])
            if run_path is not None:
                run_mounts[run_path] = str(host)
            else:
                mounts[mount["mountPath"]] = str(host)
        mounts[container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = str(termination_file)
        return PathMap(mounts), run_mounts
