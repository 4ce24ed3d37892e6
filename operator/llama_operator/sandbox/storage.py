"""The sandbox's storage: the StorageClass `sandbox-local` (the default class) and a small external provisioner
for it.

A PersistentVolumeClaim of that class waits for its first pod (WaitForFirstConsumer, as every node-local class
does): once the scheduler has picked a node for that pod, the claim gets a hostPath PersistentVolume on
`<state>/pvc/<node>/<namespace>/<claim>` with node affinity to that node, which the real PV controller binds. So a
ReadWriteOnce claim pins every pod that mounts it to one node, as on a cluster with local disks. The directory is
mode 0777 (hostPath volumes get no fsGroup, and the pods run as 65532). A released volume's PV object is deleted;
its directory is kept, so a claim of the same name on the same node (next run, or re-created) finds its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiohttp

from .client import Api, ApiError, Informer, resource_path

log = logging.getLogger("llama_operator.sandbox")

STORAGE_CLASS = "sandbox-local"
PROVISIONER = "sandbox.llamacpp.dev/local-path"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
"""Set on a claim by the scheduler once it has picked the node of the claim's first pod."""


class LocalPathProvisioner:
    """Dynamic hostPath volumes under the state directory for the `sandbox-local` StorageClass."""

    def __init__(self, api: Api, state_dir: Path) -> None:
        self.api = api
        self.root = state_dir / "pvc"
        self._wake = asyncio.Event()
        self.claims = Informer(api, "v1", "persistentvolumeclaims", self._wake.set)
        self.volumes = Informer(api, "v1", "persistentvolumes", self._wake.set)

    async def install(self) -> None:
        try:
            await self.api.create(resource_path("storage.k8s.io/v1", "storageclasses"), {
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS,
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"})
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run()) for i in (self.claims, self.volumes)]
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    await self._reconcile()
                except (ApiError, aiohttp.ClientError) as exc:
                    log.warning("local-path provisioner: %s", exc)
                    await asyncio.sleep(1)
                    self._wake.set()
        finally:
            for task in tasks:
                task.cancel()

    async def _reconcile(self) -> None:
        provisioned = {((v.get("spec") or {}).get("claimRef") or {}).get("uid") for v in self.volumes.values()}
        for claim in self.claims.values():
            meta, spec = claim["metadata"], claim.get("spec") or {}
            annotations = meta.get("annotations") or {}
            wanted = PROVISIONER in (annotations.get("volume.kubernetes.io/storage-provisioner"),
                                     annotations.get("volume.beta.kubernetes.io/storage-provisioner"))
            node = annotations.get(SELECTED_NODE)
            if not wanted or not node or spec.get("volumeName") or meta["uid"] in provisioned \
                    or meta.get("deletionTimestamp"):
                continue
            directory = self.root / node / meta["namespace"] / meta["name"]
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o777)  # hostPath volumes get no fsGroup; pods run as 65532
            storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            name = f"pvc-{meta['uid']}"
            with contextlib.suppress(ApiError):
                await self.api.create(resource_path("v1", "persistentvolumes"), {
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                    "spec": {"capacity": {"storage": storage},
                             "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                             "persistentVolumeReclaimPolicy": "Delete", "storageClassName": STORAGE_CLASS,
                             "volumeMode": spec.get("volumeMode") or "Filesystem",
                             "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                          "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                             "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                             "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                                 {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}})
                log.info("Provisioned PersistentVolume %s for claim %s/%s at %s", name, meta["namespace"],
                         meta["name"], directory)
        for volume in self.volumes.values():
            meta = volume["metadata"]
            ours = (meta.get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
            if ours and (volume.get("status") or {}).get("phase") == "Released" and not meta.get("deletionTimestamp"):
                await self.api.delete(resource_path("v1", "persistentvolumes", None, meta["name"]))
                log.info("Deleted released PersistentVolume %s (its directory stays as a cache)", meta["name"])
