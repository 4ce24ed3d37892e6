"""Operator-side tenant policy: what a LlamaModel or LlamaServer may ask of the pods the operator runs for it.

Pure: typed spec + Settings -> problems, each naming the field. The CRD cannot say these (they depend on the
operator's settings, the chart's `policy` values), so the admission webhook refuses them at `kubectl apply` and
every reconcile refuses them again (an object admitted before the policy changed, or with no webhook at all).
Not to be confused with flags/policy.py, which says which llama-server flags a spec may pass.

docs/security.md, "Node filesystem and pod policy", says what each rule protects.
"""

from __future__ import annotations

from .api.v1beta1 import LlamaModelSpec, LlamaServerSpec
from .config import ANY, Settings
from .contract import GROUP

SECURITY_ANNOTATION_PREFIXES = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
    "security.alpha.kubernetes.io/",
    "io.kubernetes.cri-o.",
    "io.kubernetes.cri.",
    "io.containerd.",
    "cpu-load-balancing.crio.io",
    "cpu-quota.crio.io",
    "irq-load-balancing.crio.io",
    f"{GROUP}/",
)
"""Pod annotation keys a LlamaServer may not set: AppArmor and seccomp profiles (the legacy annotations some
runtimes still honour), container-runtime knobs (CRI-O and containerd read annotations that change devices,
cgroups and user namespaces), and the operator's own llamacpp.dev/ keys (which roll pods and record checksums)."""


def _allowed(value: str, allowed: tuple[str, ...]) -> bool:
    return ANY in allowed or value in allowed


def _listed(allowed: tuple[str, ...]) -> str:
    return ", ".join(allowed) if allowed else "none"


def tenant_problems(spec: LlamaServerSpec, settings: Settings) -> list[str]:
    """Every way `spec` asks for more than the operator's policy allows (empty: nothing)."""
    policy = settings.policy
    problems = []
    if spec.image is not None and spec.image not in settings.images.values():
        if not policy.custom_images:
            problems.append("spec.image: custom images are turned off by the operator's policy (chart value "
                            "policy.customImages); remove spec.image to run the operator's llama-server image")
        elif ANY not in policy.image_prefixes and not spec.image.startswith(policy.image_prefixes):
            problems.append(f"spec.image: {spec.image!r} is not under an image prefix the operator's policy "
                            f"allows (policy.allowedImagePrefixes: {_listed(policy.image_prefixes)})")
    if spec.runtime_class_name is not None and not _allowed(spec.runtime_class_name, policy.runtime_class_names):
        problems.append(f"spec.runtimeClassName: {spec.runtime_class_name!r} is not allowed by the operator's "
                        f"policy (policy.allowedRuntimeClassNames: {_listed(policy.runtime_class_names)})")
    if spec.priority_class_name is not None and not _allowed(spec.priority_class_name,
                                                             policy.priority_class_names):
        problems.append(f"spec.priorityClassName: {spec.priority_class_name!r} is not allowed by the operator's "
                        f"policy (policy.allowedPriorityClassNames: {_listed(policy.priority_class_names)})")
    for key in spec.pod_annotations or {}:
        if key.startswith(SECURITY_ANNOTATION_PREFIXES):
            problems.append(f"spec.podAnnotations: {key!r} is security-relevant (AppArmor, seccomp, the container "
                            "runtime's or the operator's own): a LlamaServer may not set it")
    return problems


def model_policy_problems(spec: LlamaModelSpec, settings: Settings) -> list[str]:
    """Every way a LlamaModel spec asks for more than the operator's policy allows (empty: nothing)."""
    kind = spec.cache.type or settings.default_cache_type
    if kind == "HostPath" and not settings.policy.host_path_cache:
        return ["spec.cache.type: HostPath caches are turned off by the operator's policy (chart value "
                "policy.hostPathCache); use EmptyDir or PersistentVolumeClaim"]
    return []
