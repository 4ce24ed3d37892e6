"""A checker for the Kubernetes *restricted* Pod Security Standard, for pod specs rendered by the chart or the operator.

It mirrors the checks of the upstream PodSecurity admission controller (policy version "latest", Kubernetes
1.29-1.33) closely enough to fail a test before a real cluster would reject the pod:
https://kubernetes.io/docs/concepts/security/pod-security-standards/

Usage: `violations(pod_spec)` returns a list of human-readable problems (empty = compliant);
`pod_specs(objects)` finds the pod specs inside rendered objects (Pod, Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob).

`allowed_host_paths` exists for the one documented exception: the HostPath model cache. A hostPath volume whose
path is under one of the given roots is then accepted (hostPath is otherwise forbidden even by *baseline*, so a
namespace enforcing restricted still rejects such pods; docs/install.md says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# restricted: the only volume types allowed.
_ALLOWED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
# baseline: sysctls considered safe (namespaced and isolated); anything else is a violation.
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_POD_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


def pod_specs(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(`Kind/name`, pod spec) for every pod spec inside the given objects."""
    found = []
    for obj in objects:
        kind = obj.get("kind")
        name = f"{kind}/{obj.get('metadata', {}).get('name')}"
        if kind == "Pod":
            found.append((name, obj["spec"]))
        elif kind in _POD_TEMPLATE_KINDS:
            found.append((name, obj["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            found.append((name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return found


def _containers(spec: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [
        (f"{field}[{c.get('name')}]", c)
        for field in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(field) or ()
    ]


def violations(spec: Mapping[str, Any], *, allowed_host_paths: Sequence[str] = ()) -> list[str]:
    """Every way `spec` (a PodSpec as a dict) breaks the restricted Pod Security Standard."""
    problems: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    containers = _containers(spec)
    if not containers:
        problems.append("pod has no containers")

    # --- baseline: host namespaces, ports, volumes, sysctls, SELinux, AppArmor
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field} must not be true")
    for sysctl in pod_sc.get("sysctls") or ():
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')} is not in the safe set")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("securityContext.windowsOptions.hostProcess must not be true")

    for volume in spec.get("volumes") or ():
        types = [key for key in volume if key != "name"]
        for vtype in types:
            if vtype == "hostPath":
                path = (volume.get("hostPath") or {}).get("path", "")
                if not any(_under(path, root) for root in allowed_host_paths):
                    problems.append(f"volume {volume.get('name')}: hostPath {path!r} is forbidden")
            elif vtype not in _ALLOWED_VOLUME_TYPES:
                problems.append(f"volume {volume.get('name')}: type {vtype} is not allowed")

    # --- restricted: non-root, seccomp, privilege escalation, capabilities
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = _seccomp_type(pod_sc)
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile.type {pod_seccomp} must be RuntimeDefault or Localhost")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod securityContext.runAsUser must not be 0")
    problems.extend(_selinux_problems("pod", pod_sc))
    problems.extend(_apparmor_problems("pod", pod_sc))

    for where, container in containers:
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            problems.append(f"{where}: runAsNonRoot must be true (on the container or the pod)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must not be 0")
        seccomp = _seccomp_type(sc)
        if seccomp is None and pod_seccomp is None:
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (on the container or pod)")
        elif seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile.type {seccomp} must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or ()):
            problems.append(f"{where}: capabilities.drop must include ALL")
        extra = set(caps.get("add") or ()) - {"NET_BIND_SERVICE"}
        if extra:
            problems.append(f"{where}: capabilities.add may only contain NET_BIND_SERVICE, not {sorted(extra)}")
        if sc.get("procMount") not in (None, "Default"):
            problems.append(f"{where}: procMount must be Default")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess must not be true")
        for port in container.get("ports") or ():
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']} is forbidden")
        problems.extend(_selinux_problems(where, sc))
        problems.extend(_apparmor_problems(where, sc))
    return problems


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return bool(root) and (path == root or path.startswith(root + "/")) and "/../" not in path + "/"


def _seccomp_type(sc: Mapping[str, Any]) -> str | None:
    profile = sc.get("seccompProfile")
    return None if not profile else profile.get("type")


def _selinux_problems(where: str, sc: Mapping[str, Any]) -> list[str]:
    opts = sc.get("seLinuxOptions") or {}
    problems = []
    if opts.get("type", "") not in _ALLOWED_SELINUX_TYPES:
        problems.append(f"{where}: seLinuxOptions.type {opts['type']} is not allowed")
    for field in ("user", "role"):
        if opts.get(field):
            problems.append(f"{where}: seLinuxOptions.{field} must not be set")
    return problems


def _apparmor_problems(where: str, sc: Mapping[str, Any]) -> list[str]:
    profile = sc.get("appArmorProfile") or {}
    if profile.get("type") not in (None, "RuntimeDefault", "Localhost"):
        return [f"{where}: appArmorProfile.type {profile['type']} is not allowed"]
    return []
