"""Every row of the bad-input tables, through the control plane's own `kubectl apply` (strict validation, no
`--validate=false`), against the real API server.

- Without any webhook: rows the CRD schema or its CEL rules refuse are refused with their message; the rest
  (the flag catalog, cross-namespace references) are admitted and left to the operator.
- With the operator's validating webhook registered the way the chart registers it (`helm template` with the
  webhook on, the Service reference swapped for https://127.0.0.1:PORT/<the chart's path> and a CA made here):
  the webhook rows are refused too, with the operator's messages; rows that only the operator can judge (a
  missing LlamaModel, a file that does not exist) are admitted.

docs/api.md and docs/flags.md ("Refused by") say what these tests measure.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest
import yaml

from llama_operator.api.v1beta1 import SERVER_RULES, SPECULATIVE_RULES
from llama_operator.controlplane import ControlPlane
from llama_operator.controlplane.certs import CertificateAuthority
from llama_operator.controlplane.cluster import free_port
from tests.cluster import ClusterApi, kubectl, tls_listening
from tests.helm import helm_template
from tests.integration.conftest import OPERATOR_NAMESPACE, OperatorRun
from tests.unit.flag_cases import BAD_CASES

CEL_RULES = {rule.id for rule in SERVER_RULES + SPECULATIVE_RULES}
HF_SOURCE = {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}}
NAMESPACE = "{namespace}"  # stands for the test's namespace in expected messages


@dataclass(frozen=True)
class Row:
    title: str
    kind: str  # LlamaServer | LlamaModel
    spec: dict[str, Any]
    layer: str  # "schema" | "CEL" | "webhook" | "operator"
    messages: tuple[str, ...]  # "path: message" as the operator says it; the API server's wording for schema rows


# docs/api.md, "Bad input: where it is rejected and what the user sees" (plus the rules CEL took over).
API_ROWS = [
    Row("unknown field", "LlamaServer", {"modelRef": {"name": "qwen"}, "contextWindow": 4096}, "schema",
        ('unknown field "spec.contextWindow"',)),
    Row("no model source", "LlamaModel", {"source": {}}, "CEL",
        ("spec.source: exactly one of huggingFace, http, volume must be set (got none)",)),
    Row("two sources", "LlamaModel", {"source": {"http": {"url": "https://h/m.gguf"},
                                                 "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}}}, "CEL",
        ("spec.source: exactly one of huggingFace, http, volume must be set (got http, volume)",)),
    Row("absolute file path", "LlamaModel",
        {"source": {"volume": {"persistentVolumeClaim": "p", "path": "/models/m.gguf"}}}, "CEL",
        ("spec.source.volume.path: must be a relative path inside the repository or volume, without '..'",)),
    Row("not a .gguf file", "LlamaModel",
        {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "file": "model.bin"}}}, "CEL",
        ("spec.source.huggingFace.file: must name a .gguf file (for a split model, its first shard: "
         "name-00001-of-0000N.gguf)",)),
    Row("negative replicas", "LlamaServer", {"modelRef": {"name": "qwen"}, "replicas": -1}, "schema",
        ("spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0",)),
    Row("no GPUs", "LlamaServer", {"modelRef": {"name": "qwen"}, "gpu": {"vendor": "nvidia", "count": 0}}, "schema",
        ("spec.gpu.count: Invalid value: 0: spec.gpu.count in body should be greater than or equal to 1",)),
    Row("context with a unit", "LlamaServer", {"modelRef": {"name": "qwen"}, "contextSize": "4k"}, "CEL",
        ("spec.contextSize: must be a number of tokens or 'auto'",)),
    Row("context autox", "LlamaServer", {"modelRef": {"name": "qwen"}, "contextSize": "autox"}, "CEL",
        ("spec.contextSize: must be a number of tokens or 'auto'",)),
    # Admitted: the operator resolves it to the largest context its estimate fits in the limit (docs/memory-fit.md).
    Row("context auto with a memory limit", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "contextSize": "auto", "resources": {"limits": {"memory": "2Gi"}}}, "operator",
        ()),
    Row("context auto on a GPU with its memory", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "contextSize": "auto", "gpu": {"vendor": "nvidia", "memory": "24Gi"}},
        "operator", ()),
    Row("chat template that is not built in", "LlamaServer", {"modelRef": {"name": "qwen"}, "chatTemplate": "lama3"},
        "schema", ('spec.chatTemplate: Unsupported value: "lama3": supported values: "bailing", ',)),
    Row("gpuLayers word", "LlamaServer", {"modelRef": {"name": "qwen"}, "gpuLayers": "most"}, "CEL",
        ("spec.gpuLayers: must be a number, 'auto' or 'all'",)),
    Row("empty argument", "LlamaServer", {"modelRef": {"name": "qwen"}, "args": ["--jinja", ""]}, "CEL",
        ("spec.args: empty strings are not valid llama-server arguments",)),
    Row("model in another namespace", "LlamaServer", {"modelRef": {"name": "qwen", "namespace": "other"}}, "webhook",
        (f"spec.modelRef.namespace: must be omitted or '{NAMESPACE}'; a LlamaServer can only use LlamaModels in its "
         "own namespace (got 'other')",)),
    Row("missing LlamaModel", "LlamaServer", {"modelRef": {"name": "not-there"}}, "operator", ()),
    # Whether the draft LlamaModel has a volume source is in another object: neither CEL nor the webhook look.
    Row("draft model on a volume", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "speculative": {"draftModelRef": {"name": "on-a-volume"}}}, "operator", ()),
    Row("file that does not exist", "LlamaModel",
        {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "file": "nope.gguf"}}}, "operator",
        ()),
]

# docs/security.md, "Node filesystem and pod policy" and "Strings, messages and status": what a hostile tenant
# writes. The webhook rows are judged by the policy POLICY_VALUES sets through the chart.
HOST_PATH_MESSAGE = ("must be a relative directory below the operator's HostPath root, without '.', '..' or '//' "
                     "(e.g. team-a/llm)")
POLICY_VALUES = {"hostPathCache": False, "customImages": True, "allowedImagePrefixes": ["registry.example.com/llama/"],
                 "allowedRuntimeClassNames": ["nvidia"], "allowedPriorityClassNames": []}
HOSTILE_ROWS = [
    Row("host path /", "LlamaModel", {"source": HF_SOURCE, "cache": {"type": "HostPath", "path": "/"}}, "CEL",
        (f"spec.cache.path: {HOST_PATH_MESSAGE}",)),
    Row("absolute host path", "LlamaModel",
        {"source": HF_SOURCE, "cache": {"type": "HostPath", "path": "/var/lib/kubelet"}}, "CEL",
        (f"spec.cache.path: {HOST_PATH_MESSAGE}",)),
    Row("host path climbing out", "LlamaModel",
        {"source": HF_SOURCE, "cache": {"type": "HostPath", "path": "team-a/../../../etc"}}, "CEL",
        (f"spec.cache.path: {HOST_PATH_MESSAGE}",)),
    Row("alias with a slash", "LlamaServer", {"modelRef": {"name": "qwen"}, "alias": "team-b/prod"}, "schema",
        ('spec.alias: Invalid value: "team-b/prod": spec.alias in body should match',)),
    Row("oversized image", "LlamaServer", {"modelRef": {"name": "qwen"}, "image": "r.example.com/" + "x" * 600},
        "schema", ("spec.image: Too long: may not be ",)),
    Row("too many args", "LlamaServer", {"modelRef": {"name": "qwen"}, "args": ["--verbose"] * 129}, "schema",
        ("spec.args: Too many: 129: must have at most 128 items",)),
    Row("Exists toleration without key", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "tolerations": [{"operator": "Exists"}]}, "CEL",
        ("spec.tolerations[0].key: operator Exists needs a key: without one it tolerates every taint (control-plane "
         "nodes and other teams' dedicated nodes included)",)),
    Row("image outside the allowed prefixes", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "image": "docker.io/evil/llama:latest"}, "webhook",
        ("spec.image: 'docker.io/evil/llama:latest' is not under an image prefix the operator's policy allows "
         "(policy.allowedImagePrefixes: registry.example.com/llama/)",)),
    Row("forbidden runtime class", "LlamaServer", {"modelRef": {"name": "qwen"}, "runtimeClassName": "kata-debug"},
        "webhook", ("spec.runtimeClassName: 'kata-debug' is not allowed by the operator's policy "
                    "(policy.allowedRuntimeClassNames: nvidia)",)),
    Row("forbidden priority class", "LlamaServer",
        {"modelRef": {"name": "qwen"}, "priorityClassName": "system-cluster-critical"}, "webhook",
        ("spec.priorityClassName: 'system-cluster-critical' is not allowed by the operator's policy "
         "(policy.allowedPriorityClassNames: none)",)),
    Row("AppArmor annotation", "LlamaServer",
        {"modelRef": {"name": "qwen"},
         "podAnnotations": {"container.apparmor.security.beta.kubernetes.io/llama-server": "unconfined"}}, "webhook",
        ("spec.podAnnotations: 'container.apparmor.security.beta.kubernetes.io/llama-server' is security-relevant",)),
    Row("HostPath cache while turned off", "LlamaModel",
        {"source": HF_SOURCE, "cache": {"type": "HostPath", "path": "team-a"}}, "webhook",
        ("spec.cache.type: HostPath caches are turned off by the operator's policy (chart value "
         "policy.hostPathCache); use EmptyDir or PersistentVolumeClaim",)),
]

# docs/flags.md, generated from tests/unit/flag_cases.py.
FLAG_ROWS = [
    Row(title, "LlamaServer", {"modelRef": {"name": "qwen"}, **fields},
        "CEL" if set(rules) <= CEL_RULES else "webhook", tuple(messages))
    for title, fields, messages, rules in BAD_CASES
]

ROWS = API_ROWS + FLAG_ROWS + HOSTILE_ROWS


def _name(row: Row) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.title.lower()).strip("-")[:50].strip("-") or "x"


def _apply(cluster: ControlPlane, namespace: str, row: Row) -> tuple[bool, str]:
    obj = {"apiVersion": "llamacpp.dev/v1beta1", "kind": row.kind,
           "metadata": {"name": _name(row), "namespace": namespace}, "spec": row.spec}
    proc = kubectl(cluster, "--namespace", namespace, "apply", "-f", "-", input=yaml.safe_dump(obj))
    return proc.returncode == 0, proc.stdout + proc.stderr


def _expected(row: Row, namespace: str) -> list[str]:
    return [message.replace(NAMESPACE, namespace) for message in row.messages]


def _assert_refused_by_the_api_server(row: Row, output: str, namespace: str) -> None:
    assert "admission webhook" not in output, output
    for message in _expected(row, namespace):
        if row.layer == "CEL":
            # kubectl prints `<path>: Invalid value: [<value>: ]<message>`
            path, text = message.split(": ", 1)
            assert any(f"{path}: Invalid value: " in line and line.endswith(text)
                       for line in output.splitlines()), f"{message!r} not in:\n{output}"
        else:
            assert message in output, output


def _namespace(api: ClusterApi, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    api.create("v1", "namespaces", None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def _delete_namespace(api: ClusterApi, namespace: str) -> None:
    for plural in ("llamaservers", "llamamodels"):
        for obj in api.list("llamacpp.dev/v1beta1", plural, namespace):
            api.delete("llamacpp.dev/v1beta1", plural, namespace, obj["metadata"]["name"])
    api.delete("v1", "namespaces", None, namespace)


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[ClusterApi]:
    api = ClusterApi(control_plane)
    yield api
    api.close()


@pytest.fixture(scope="module")
def plain_namespace(admin: ClusterApi) -> Iterator[str]:
    namespace = _namespace(admin, "bad-input")
    yield namespace
    _delete_namespace(admin, namespace)


@pytest.mark.parametrize("row", ROWS, ids=[row.title for row in ROWS])
def test_without_a_webhook(control_plane: ControlPlane, plain_namespace: str, row: Row) -> None:
    admitted, output = _apply(control_plane, plain_namespace, row)
    if row.layer in ("schema", "CEL"):
        assert not admitted, f"{row.title}: admitted\n{output}"
        _assert_refused_by_the_api_server(row, output, plain_namespace)
    else:
        assert admitted, f"{row.title}: the API server refused what only the {row.layer} should judge:\n{output}"


# ---------------------------------------------------------------------------------------------- webhook


_POLICY_ENV = ("LLAMA_OPERATOR_HOSTPATH_CACHE", "LLAMA_OPERATOR_CUSTOM_IMAGES", "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES",
               "LLAMA_OPERATOR_ALLOWED_RUNTIME_CLASSES", "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES")


def _registered(chart_config: dict[str, Any], port: int, ca_pem: bytes) -> dict[str, Any]:
    """The chart's ValidatingWebhookConfiguration, pointed at the webhook server this test runs."""
    config = copy.deepcopy(chart_config)
    for webhook in config["webhooks"]:
        service = webhook["clientConfig"]["service"]
        webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{service['path']}",
                                   "caBundle": base64.b64encode(ca_pem).decode()}
        # Fail (not the chart's default Ignore): an unreachable webhook must fail this test, not admit.
        webhook["failurePolicy"] = "Fail"
    return config


@pytest.fixture(scope="module")
def webhook_namespace(control_plane: ControlPlane, admin: ClusterApi, operator_identity: Any, helm: str,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    namespace = _namespace(admin, "bad-input-webhook")
    # The chart in namespaced mode: its webhooks only see the watched namespace, so other tests are untouched.
    objects = helm_template(helm, "llama-bad-input", OPERATOR_NAMESPACE,
                            {"watchNamespaces": [namespace], "webhook": {"enabled": True}, "policy": POLICY_VALUES})
    (chart_config,) = [obj for obj in objects if obj["kind"] == "ValidatingWebhookConfiguration"]
    policy_env = {env["name"]: env["value"] for obj in objects if obj["kind"] == "Deployment"
                  for container in obj["spec"]["template"]["spec"]["containers"]
                  for env in container.get("env", []) if env["name"] in _POLICY_ENV}
    assert set(policy_env) == set(_POLICY_ENV), policy_env
    assert {w["clientConfig"]["service"]["path"] for w in chart_config["webhooks"]} == {
        "/validate-llamaserver", "/validate-llamamodel"}
    ca = CertificateAuthority(tmp_path_factory.mktemp("webhook-pki"), common_name="bad-input-webhook-ca")
    ca.issue("tls", common_name="127.0.0.1", ip_addresses=["127.0.0.1"], server=True)  # tls.crt, tls.key
    port = free_port()
    config = _registered(chart_config, port, ca.pem)
    with pytest.MonkeyPatch.context() as env:
        kubeconfig = operator_identity([namespace])
        env.setenv("KUBECONFIG", str(kubeconfig))
        env.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        env.setenv("LLAMA_OPERATOR_NAMESPACES", namespace)
        env.setenv("LLAMA_OPERATOR_WEBHOOK_PORT", str(port))
        # Module-scoped: the function-scoped operator_defaults do not apply here. Without this the operator binds
        # :8000 for metrics and fails to start wherever that port is taken (another test run on the machine).
        env.setenv("LLAMA_OPERATOR_METRICS_PORT", "0")
        env.setenv("LLAMA_OPERATOR_WEBHOOK_CERT_DIR", str(ca.directory))
        for name, value in policy_env.items():  # the policy as the chart hands it to the operator
            env.setenv(name, value)
        env.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        env.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        with OperatorRun(("llama_operator.handlers",), namespace=namespace, args=(), settings=None, timeout=60):
            admin.wait_for(lambda: tls_listening(port, str(ca.cert_path)), timeout=30, message="webhook server")
            admin.create("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None, config)
            try:
                yield namespace
            finally:
                admin.delete("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None,
                             config["metadata"]["name"])
                _delete_namespace(admin, namespace)


@pytest.mark.parametrize("row", ROWS, ids=[row.title for row in ROWS])
def test_with_the_charts_webhook(control_plane: ControlPlane, webhook_namespace: str, row: Row) -> None:
    admitted, output = _apply(control_plane, webhook_namespace, row)
    if row.layer == "operator":
        assert admitted, output
        return
    assert not admitted, f"{row.title}: admitted\n{output}"
    if row.layer == "webhook":
        webhook = "validate-llamamodel" if row.kind == "LlamaModel" else "validate-llamaserver"
        line = next((line for line in output.splitlines() if "admission webhook" in line), "")
        assert f'admission webhook "{webhook}.llamacpp.dev" denied the request: invalid {row.kind}: ' in line, output
        for message in _expected(row, webhook_namespace):
            assert message in line, output
    else:
        # The API server's own checks come first: the webhook never sees these.
        _assert_refused_by_the_api_server(row, output, webhook_namespace)


def test_good_objects_pass_the_webhook(control_plane: ControlPlane, webhook_namespace: str) -> None:
    good = [Row("good model", "LlamaModel", {"source": HF_SOURCE}, "none", ()),
            Row("good server", "LlamaServer", {"modelRef": {"name": "good-model"}, "args": ["--top-k", "20"],
                                               "mode": "rerank", "batchSize": 512}, "none", ())]
    for row in good:
        admitted, output = _apply(control_plane, webhook_namespace, row)
        assert admitted, output
