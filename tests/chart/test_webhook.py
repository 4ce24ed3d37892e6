"""The admission and conversion webhooks: Service, port, paths, rules and their TLS (self-signed or cert-manager)."""

from __future__ import annotations

import base64
import subprocess
import tempfile

import pytest

from tests.chart.chart import NAMESPACE, RELEASE, SCENARIOS, env_of, find, render, the_deployment


def _openssl(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)


@pytest.mark.parametrize("scenario", ["default", "namespaced", "cert-manager", "cert-manager-issuer", "everything"])
def test_webhook_is_wired_to_the_operator(helm: str, scenario: str) -> None:
    objects = render(helm, scenario)
    deployment = the_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(deployment)
    (vwc,) = find(objects, "ValidatingWebhookConfiguration")
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    values = SCENARIOS[scenario]

    paths = set()
    for hook in vwc["webhooks"]:
        ref = hook["clientConfig"]["service"]
        service = services[ref["name"]]
        assert ref["namespace"] == NAMESPACE
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        # The Service reaches the container port the operator listens on (LLAMA_OPERATOR_WEBHOOK_PORT).
        (cport,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert str(cport["containerPort"]) == env["LLAMA_OPERATOR_WEBHOOK_PORT"]
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (rule,) = hook["rules"]
        assert rule["apiGroups"] == ["llamacpp.dev"] and rule["apiVersions"] == ["v1beta1"]
        assert rule["operations"] == ["CREATE", "UPDATE"]
        assert ref["path"] == "/validate-" + rule["resources"][0].removesuffix("s")
        assert hook["failurePolicy"] == values.get("webhook", {}).get("failurePolicy", "Ignore")
        assert hook["sideEffects"] == "None"
        if values.get("watchNamespaces"):
            (expr,) = hook["namespaceSelector"]["matchExpressions"]
            assert expr["values"] == values["watchNamespaces"]
        else:
            assert "namespaceSelector" not in hook
        paths.add(ref["path"])
    assert paths == {"/validate-llamaserver", "/validate-llamamodel"}

    # The pod mounts the TLS Secret where the operator looks for tls.crt/tls.key.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["LLAMA_OPERATOR_WEBHOOK_CERT_DIR"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    service_dns = f"{RELEASE}-llama-operator-webhook.{NAMESPACE}.svc"

    if values.get("webhook", {}).get("certManager", {}).get("enabled"):
        (certificate,) = find(objects, "Certificate")
        assert certificate["spec"]["secretName"] == secret_name
        assert service_dns in certificate["spec"]["dnsNames"]
        annotation = vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert annotation == f"{NAMESPACE}/{certificate['metadata']['name']}"
        issuer_ref = certificate["spec"]["issuerRef"]
        wanted_issuer = values["webhook"]["certManager"].get("issuerRef")
        if wanted_issuer:
            assert issuer_ref["name"] == wanted_issuer["name"] and issuer_ref["kind"] == wanted_issuer["kind"]
            assert not find(objects, "Issuer")
        else:
            (issuer,) = find(objects, "Issuer")
            assert issuer_ref["name"] == issuer["metadata"]["name"]
        assert all("caBundle" not in hook["clientConfig"] for hook in vwc["webhooks"])
        assert not [s for s in find(objects, "Secret") if s["metadata"]["name"] == secret_name]
    else:
        (secret,) = [s for s in find(objects, "Secret") if s["metadata"]["name"] == secret_name]
        ca = base64.b64decode(secret["data"]["ca.crt"])
        crt = base64.b64decode(secret["data"]["tls.crt"])
        for hook in vwc["webhooks"]:
            assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as ca_file:
            ca_file.write(ca)
            ca_file.flush()
            # The serving certificate chains to the caBundle the API server trusts, for the Service's DNS name.
            verify = _openssl("verify", "-CAfile", ca_file.name, "-purpose", "sslserver",
                              "-verify_hostname", service_dns, stdin=crt)
            assert verify.returncode == 0, verify.stdout + verify.stderr
        key_check = _openssl("pkey", "-noout", stdin=base64.b64decode(secret["data"]["tls.key"]))
        assert key_check.returncode == 0, key_check.stderr
    # Both CRDs convert through the same server, Service and CA as the validating webhook.
    crds = find(objects, "CustomResourceDefinition")
    assert len(crds) == 2
    for crd in crds:
        conversion = crd["spec"]["conversion"]
        assert conversion["strategy"] == "Webhook" and conversion["webhook"]["conversionReviewVersions"] == ["v1"]
        client = conversion["webhook"]["clientConfig"]
        hook_service = vwc["webhooks"][0]["clientConfig"]["service"]
        assert client["service"] == {**hook_service, "path": "/convert"}
        if values.get("webhook", {}).get("certManager", {}).get("enabled"):
            assert "caBundle" not in client
            assert crd["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
                vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        else:
            assert client["caBundle"] == vwc["webhooks"][0]["clientConfig"]["caBundle"]


def test_webhook_off_renders_no_webhook(helm: str) -> None:
    objects = render(helm, "webhook-off")
    assert not find(objects, "ValidatingWebhookConfiguration")
    assert not find(objects, "Secret") and not find(objects, "Certificate")
    # Without the webhook server nothing can convert: the CRDs keep strategy None (docs/api.md#versions).
    assert [crd["spec"].get("conversion") for crd in find(objects, "CustomResourceDefinition")] == [None, None]
    deployment = the_deployment(objects)
    assert env_of(deployment)["LLAMA_OPERATOR_WEBHOOK_PORT"] == "0"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "webhook" not in {p["name"] for p in container["ports"]}
