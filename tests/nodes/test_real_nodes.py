"""Two real nodes (containerd + kubelet each) on this machine: what only real nodes show, and that stopping them
leaves the host as it was. One cluster for the module; the last test stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from llama_operator import __version__
from llama_operator.nodes.host import MOUNT_POINTS
from tests.nodes.conftest import HostSnapshot, RealCluster, find_images
from tests.tiers import REPO
from tests.waiting import wait_for

RESTRICTED = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": False,
              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def pod(name: str, image: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "main", "image": image, "command": command,
                                     "securityContext": RESTRICTED, **spec.pop("container", {})}],
                     "terminationGracePeriodSeconds": 1, **spec}}


def apply(cluster: RealCluster, namespace: str, *objects: dict[str, Any]) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(objects))


def get(cluster: RealCluster, namespace: str, *what: str) -> Any:
    return json.loads(cluster.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def python(cluster: RealCluster, namespace: str, pod_name: str, code: str) -> str:
    return cluster.kubectl("-n", namespace, "exec", pod_name, "--", "python3", "-c", code).stdout.strip()


def test_two_ready_nodes_with_containerd(real_cluster: RealCluster) -> None:
    wide = real_cluster.kubectl("get", "nodes", "-o", "wide").stdout
    print(wide)
    nodes = get(real_cluster, "default", "nodes")["items"]
    version = real_cluster.nodes.kit.versions["containerd"].lstrip("v")
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node-a", "node-b"]
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["status"]["conditions"]
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"] == f"containerd://{version}"
    assert wide.count(f"containerd://{version}") == 2


def test_pod_runs_restricted_from_the_registry(real_cluster: RealCluster, namespace: str) -> None:
    image = real_cluster.images["base"]
    assert image.startswith("127.0.0.1:")  # pulled from the local registry, not imported
    created = time.monotonic()
    apply(real_cluster, namespace, pod("restricted", image, [
        "python3", "-c", "import os, time; print('uid', os.getuid(), flush=True); time.sleep(3600)"]))
    real_cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod/restricted", "--timeout=60s")
    cold = time.monotonic() - created
    # The same image again on the same node: what a warm apply -> Ready costs (no pull).
    node_name = get(real_cluster, namespace, "pod", "restricted")["spec"]["nodeName"]
    created = time.monotonic()
    apply(real_cluster, namespace, pod("warm", image, ["python3", "-c", "import time; time.sleep(3600)"],
                                       nodeName=node_name))
    real_cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod/warm", "--timeout=60s")
    print(f"pod create -> Ready: {cold:.2f} s (pulling the image), {time.monotonic() - created:.2f} s (warm)")
    wait_for(lambda: "uid 65532" in real_cluster.kubectl("-n", namespace, "logs", "restricted").stdout,
             timeout=10, message="the pod's log")
    assert python(real_cluster, namespace, "restricted", "import os; print(os.getuid(), os.getgid())") == "65532 65532"
    refused = real_cluster.kubectl("-n", namespace, "exec", "restricted", "--", "python3", "-c",
                                   "open('/written', 'w')", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr
    status = python(real_cluster, namespace, "restricted", "print(open('/proc/self/status').read())")
    assert "CapEff:\t0000000000000000" in status


def test_spread_pod_network_service_and_dns(real_cluster: RealCluster, namespace: str) -> None:
    image = real_cluster.images["base"]
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector":
                                                    {"matchLabels": labels}, "nodeTaintsPolicy": "Honor"}],
                     "containers": [{"name": "web", "image": image, "securityContext": RESTRICTED,
                                     "command": ["python3", "-m", "http.server", "8080", "--directory", "/etc"],
                                     "ports": [{"containerPort": 8080}],
                                     "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}}
    apply(real_cluster, namespace, deployment, service)
    real_cluster.kubectl("-n", namespace, "rollout", "status", "deployment/web", "--timeout=90s")
    pods = get(real_cluster, namespace, "pods", "-l", "app=web")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["node-a", "node-b"]
    a, b = pods
    fetch = "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=5).status)"

    def get_from_a(url: str) -> str:
        return real_cluster.kubectl("-n", namespace, "exec", a["metadata"]["name"], "--", "python3", "-c", fetch,
                                    url).stdout.strip()

    assert get_from_a(f"http://{b['status']['podIP']}:8080/hostname") == "200"  # across nodes
    cluster_ip = get(real_cluster, namespace, "service", "web")["spec"]["clusterIP"]
    assert get_from_a(f"http://{cluster_ip}/hostname") == "200"  # through kube-proxy
    name = f"web.{namespace}.svc.cluster.local"
    resolved = python(real_cluster, namespace, a["metadata"]["name"],
                      f"import socket; print(socket.gethostbyname('{name}'))")
    assert resolved == cluster_ip
    assert get_from_a(f"http://web.{namespace}.svc/hostname") == "200"  # the search path, as clients write it


def test_memory_limit_ends_in_oom_kill(real_cluster: RealCluster, namespace: str) -> None:
    hog = pod("hog", real_cluster.images["base"],
              ["python3", "-c", "data = b'x' * (200 * 1024 * 1024); print(len(data))"],
              container={"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}}, restartPolicy="Never")
    apply(real_cluster, namespace, hog)

    def terminated() -> dict[str, Any] | None:
        statuses = get(real_cluster, namespace, "pod", "hog")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("terminated") if statuses else None

    state = wait_for(terminated, timeout=60, interval=0.5, message="the container to terminate")
    assert (state["reason"], state["exitCode"]) == ("OOMKilled", 137), state


def test_network_policy_enforced_on_the_first_node(real_cluster: RealCluster, namespace: str) -> None:
    """kube-router's firewall guards node-a's pods (netpol.py says why only those): deny-all refuses everyone,
    an allow rule lets exactly the selected client in, from the other node too."""
    image = real_cluster.images["base"]
    apply(real_cluster, namespace,
          pod("server", image, ["python3", "-m", "http.server", "8080", "--directory", "/etc"], nodeName="node-a"),
          pod("client", image, ["sleep", "3600"], nodeName="node-b"),
          pod("other", image, ["sleep", "3600"], nodeName="node-a"))
    real_cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=60s")
    server_ip = get(real_cluster, namespace, "pod", "server")["status"]["podIP"]

    def reaches(source: str) -> bool:
        code = f"import urllib.request; urllib.request.urlopen('http://{server_ip}:8080/hostname', timeout=3)"
        return real_cluster.kubectl("-n", namespace, "exec", source, "--", "python3", "-c", code,
                                    check=False).returncode == 0

    assert reaches("client") and reaches("other")
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "server"},
              "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}}
    apply(real_cluster, namespace, policy)
    wait_for(lambda: not reaches("client") and not reaches("other"), timeout=30, interval=0.5,
             message="deny-all to take effect")
    policy["spec"]["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]
    apply(real_cluster, namespace, policy)
    try:
        wait_for(lambda: reaches("client"), timeout=60, interval=0.5, message="the allow rule to take effect")
    except TimeoutError as exc:  # what kube-router programmed, to tell its fault from ours
        rules = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True).stdout
        sets = subprocess.run(["ipset", "list"], capture_output=True, text=True).stdout
        pods = real_cluster.kubectl("-n", namespace, "get", "pods", "-o", "wide").stdout
        firewall = real_cluster.nodes.firewall.log_tail(15) if real_cluster.nodes.firewall else ""
        raise AssertionError(f"{exc}\n{pods}\n{[r for r in rules.splitlines() if 'NWPLCY' in r or 'POD-FW' in r]}"
                             f"\n{sets}\n{firewall}") from None
    assert not reaches("other")


def test_a_release_installs_from_the_registry_as_the_readme_says(real_cluster: RealCluster, helm: str,
                                                                tmp_path: Path) -> None:
    """scripts/release.py pushes the operator image and the chart to the nodes' registry; `helm install
    oci://<registry>/charts/llama-operator --version <v>` (the README's install) then runs the operator from the
    image the release pushed, by digest, and `llama-operator version` in its pod names the release."""
    registry = real_cluster.nodes.registry
    assert registry is not None
    out = tmp_path / "release"
    env = {**os.environ, "HELM": helm, "SKOPEO": str(real_cluster.nodes.kit.tool("skopeo"))}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "release.py"), __version__, registry.host,
                           "--images", str(find_images()), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["NOTES.md", "SHA256SUMS", "crds.yaml", f"llama-operator-{__version__}.tgz"])
    assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out).returncode == 0
    digest = (out / "NOTES.md").read_text().split("@sha256:", 1)[1][:64]
    namespace = "llama-release"
    kubeconfig = str(real_cluster.control_plane.admin_kubeconfig)
    install = [helm, "install", "llama-operator", f"oci://{registry.host}/charts/llama-operator", "--version",
               __version__, "--plain-http", "--namespace", namespace, "--create-namespace", "--kubeconfig",
               kubeconfig, "--set", "replicas=1"]
    try:
        installed = subprocess.run(install, capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, installed.stderr
        real_cluster.kubectl("-n", namespace, "rollout", "status", "deployment/llama-operator", "--timeout=180s",
                             timeout=200)
        (operator,) = get(real_cluster, namespace, "pods", "-l", "app.kubernetes.io/name=llama-operator")["items"]
        container = next(c for c in operator["spec"]["containers"] if c["name"] == "operator")
        assert container["image"] == \
            f"{registry.host}/llama-operator/llama-operator:{__version__}@sha256:{digest}"
        status = next(c for c in operator["status"]["containerStatuses"] if c["name"] == "operator")
        assert status["imageID"].endswith(f"@sha256:{digest}")
        said = real_cluster.kubectl("-n", namespace, "exec", operator["metadata"]["name"], "-c", "operator", "--",
                                    "llama-operator", "version").stdout
        assert said.startswith(f"llama-operator {__version__} "), said
    finally:
        subprocess.run([helm, "uninstall", "llama-operator", "--namespace", namespace, "--kubeconfig", kubeconfig,
                        "--wait", "--timeout", "120s"], capture_output=True, timeout=180)
        real_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        real_cluster.kubectl("delete", "crd", "llamamodels.llamacpp.dev", "llamaservers.llamacpp.dev", check=False)


def test_stop_leaves_the_host_as_it_was(real_cluster: RealCluster, host_before: HostSnapshot) -> None:
    """Last in the module: stops the shared cluster (the fixture's own stop is then a no-op)."""
    problems = real_cluster.nodes.stop()
    assert problems == []
    after = HostSnapshot.take()
    # Other tests may add links and mounts of their own meanwhile: compare what the nodes make.
    ours = ("llnodes", "veth")
    assert {link for link in after.links if link.startswith(ours)} == \
        {link for link in host_before.links if link.startswith(ours)}
    assert not any(link.startswith("llnodes") for link in after.links)
    assert {c for c in after.chains if "KUBE-" in c or "CNI-" in c} == \
        {c for c in host_before.chains if "KUBE-" in c or "CNI-" in c}
    assert after.cgroups == host_before.cgroups == frozenset()
    state = str(real_cluster.nodes.state_dir)
    assert {m for m in after.mounts if m.startswith((state, *MOUNT_POINTS))} == set()
    assert {m for m in after.mounts if m.startswith((state, *MOUNT_POINTS))} == \
        {m for m in host_before.mounts if m.startswith((state, *MOUNT_POINTS))}
    assert after.sysctls == host_before.sysctls
    assert after.ipsets == host_before.ipsets
    assert not [p for p in MOUNT_POINTS if Path(p).exists() and p not in host_before.existing]
