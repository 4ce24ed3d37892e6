"""The sandbox kubelet's volumes: each volume of a pod becomes a directory.

emptyDir and the files of secret, configMap, downwardAPI and projected volumes live in the pod's directory;
hostPath under `<state>/hostpath`; a PVC is its bound PersistentVolume's directory. Files are written the
kubelet's atomic way (`write_atomic`); projected service-account tokens come from the TokenRequest API and are
renewed before they expire. A volume that cannot be made yet (a missing Secret, an unbound claim) is a
FailedMount event and another try later (kubelet.py).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp

from .client import ApiError, resource_path
from .pod import ConfigError, Pod

log = logging.getLogger("llama_operator.sandbox")

TOKEN_REFRESH_FRACTION = 0.8


def write_atomic(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """The kubelet's atomic volume update: files live in a timestamped directory that `..data` points to,
    each visible name is a symlink through `..data`, and one rename swaps all of them at once."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{datetime.datetime.now(datetime.UTC).strftime('%Y_%m_%d_%H_%M_%S.%f')}"
    stamp.mkdir()
    for name, (data, mode) in files.items():
        target = stamp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    link = directory / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(stamp.name)
    old = (directory / "..data").resolve() if (directory / "..data").is_symlink() else None
    os.replace(link, directory / "..data")
    for name in files:
        top = name.split("/", 1)[0]
        visible = directory / top
        if not visible.is_symlink():
            visible.symlink_to(f"..data/{top}")
    if old is not None and old.exists() and old != stamp.resolve():
        for path in sorted(old.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        old.rmdir()


class PodVolumes:
    """One pod's volumes: `paths` maps each volume's name to its directory once `prepare()` made them."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.paths: dict[str, Path] = {}

    async def prepare(self) -> bool:
        """Make every volume's directory; False (after a FailedMount event) when one cannot be made yet."""
        pod = self.pod
        try:
            for volume in pod.spec.get("volumes") or []:
                name = volume["name"]
                if "hostPath" in volume:
                    path = pod.node.state_dir / "hostpath" / volume["hostPath"]["path"].lstrip("/")
                elif "persistentVolumeClaim" in volume:
                    path = await self._claim_directory(volume["persistentVolumeClaim"]["claimName"])
                else:  # emptyDir, and the pod-local directory of secret/configMap/projected/downwardAPI files
                    path = pod.dir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                self.paths[name] = path
                if any(k in volume for k in ("secret", "configMap", "projected", "downwardAPI")):
                    await self._project(volume, path)
            return True
        except (ConfigError, ApiError, aiohttp.ClientError) as exc:
            pod.event("Warning", "FailedMount", f"MountVolume.SetUp failed: {exc}")
            return False

    async def _claim_directory(self, claim: str) -> Path:
        pvc = await self.pod.read("persistentvolumeclaims", claim)
        if pvc is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        pv = await self.pod.api.get(resource_path("v1", "persistentvolumes", None, volume_name)) \
            if volume_name else None
        if pv is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise ConfigError(f"persistentvolume {volume_name} is neither hostPath nor local")
        return Path(path)

    async def _project(self, volume: dict[str, Any], path: Path) -> None:
        files: dict[str, tuple[bytes, int]] = {}
        if "secret" in volume:
            source = volume["secret"]
            await self._add_keys(files, "secrets", source.get("secretName", ""), source,
                                 int(source.get("defaultMode", 0o644)))
        elif "configMap" in volume:
            source = volume["configMap"]
            await self._add_keys(files, "configmaps", source.get("name", ""), source,
                                 int(source.get("defaultMode", 0o644)))
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"]
            self._add_downward(files, source.get("items") or [], int(source.get("defaultMode", 0o644)))
        else:
            projected = volume["projected"]
            mode = int(projected.get("defaultMode", 0o644))
            refresh: list[tuple[dict[str, Any], float]] = []
            for source in projected.get("sources") or []:
                if "secret" in source:
                    await self._add_keys(files, "secrets", source["secret"].get("name", ""), source["secret"], mode)
                elif "configMap" in source:
                    await self._add_keys(files, "configmaps", source["configMap"].get("name", ""),
                                         source["configMap"], mode)
                elif "downwardAPI" in source:
                    self._add_downward(files, source["downwardAPI"].get("items") or [], mode)
                elif "serviceAccountToken" in source:
                    token_source = source["serviceAccountToken"]
                    token, ttl = await self._token(token_source)
                    files[token_source["path"]] = (token.encode(), 0o600 if mode == 0o644 else mode)
                    refresh.append((token_source, ttl))
            if refresh:
                self.pod.tasks.append(asyncio.create_task(self._renew_tokens(volume, path, files, refresh),
                                                          name=f"tokens {self.pod.name}"))
        write_atomic(path, files)

    async def _add_keys(self, files: dict[str, tuple[bytes, int]], plural: str, name: str, source: dict[str, Any],
                        mode: int) -> None:
        obj = await self.pod.read(plural, name)
        kind = "secret" if plural == "secrets" else "configmap"
        if obj is None:
            if source.get("optional"):
                return
            raise ConfigError(f'{kind} "{name}" not found')
        if plural == "secrets":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] in data:
                files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
            elif not source.get("optional"):
                raise ConfigError(f'configmap references non-existent config key: {item["key"]}')

    def _add_downward(self, files: dict[str, tuple[bytes, int]], items: list[dict[str, Any]], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                files[item["path"]] = (self.pod.field(item["fieldRef"].get("fieldPath", "")).encode(),
                                       int(item.get("mode", mode)))

    async def _token(self, source: dict[str, Any]) -> tuple[str, float]:
        pod = self.pod
        account = pod.spec.get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": int(source.get("expirationSeconds") or 3600),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name,
                                                   "uid": pod.uid}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        review = await pod.api.create(
            resource_path("v1", "serviceaccounts", pod.namespace, account, "token"),
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        status = review.get("status") or {}
        expires = datetime.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
        ttl = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        return status["token"], ttl

    async def _renew_tokens(self, volume: dict[str, Any], path: Path, files: dict[str, tuple[bytes, int]],
                            tokens: list[tuple[dict[str, Any], float]]) -> None:
        """Like the kubelet: a fresh token once 80% of the old one's lifetime has passed."""
        while True:
            await asyncio.sleep(max(5.0, min(ttl for _, ttl in tokens) * TOKEN_REFRESH_FRACTION))
            try:
                renewed = []
                for source, _ in tokens:
                    token, ttl = await self._token(source)
                    files[source["path"]] = (token.encode(), files[source["path"]][1])
                    renewed.append((source, ttl))
                tokens = renewed
                write_atomic(path, files)
            except (ApiError, aiohttp.ClientError, KeyError) as exc:
                log.warning("pod %s/%s: renewing the token of volume %s: %s", self.pod.namespace, self.pod.name,
                            volume["name"], exc)
                tokens = [(source, 20.0) for source, _ in tokens]
