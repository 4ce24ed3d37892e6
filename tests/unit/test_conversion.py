"""v1alpha1 <-> v1beta1 conversion (api/conversion.py) and the `/convert` ConversionReview the webhook answers."""

from __future__ import annotations

import base64
import copy
import json
import pathlib
from typing import Any

import aiohttp
import pytest
import yaml

from llama_operator.admission import CONVERSION_WEBHOOK_ID, ForgetfulWebhookServer
from llama_operator.api import conversion, v1alpha1, v1beta1
from llama_operator.api.conversion import FIELDS_ANNOTATION, ConversionError, convert, review
from llama_operator.api.v1beta1 import human_size
from llama_operator.cli import main

from .flag_cases import BAD_CASES, GOOD_CASES

REPO = pathlib.Path(__file__).resolve().parents[2]
ALPHA, BETA = v1alpha1.API_VERSION, v1beta1.API_VERSION


def _example_objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text())
                 if doc and doc.get("kind") in conversion.KINDS]
    return docs


def _server(spec_fields: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ALPHA, "kind": "LlamaServer", "metadata": {"name": "s", "namespace": "default"},
            "spec": {"modelRef": {"name": "m"}, **spec_fields}}


def _model(status: dict[str, Any] | None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": ALPHA, "kind": "LlamaModel",
                           "metadata": {"name": "m", "namespace": "default"},
                           "spec": {"source": {"http": {"url": "https://example.com/m.gguf"}}}}
    if annotations is not None:
        obj["metadata"]["annotations"] = annotations
    if status is not None:
        obj["status"] = status
    return obj


EXAMPLES = _example_objects()
SPEC_CASES = [_server(fields) for _, fields, _, _ in BAD_CASES] + [_server(fields) for fields in GOOD_CASES]
MODEL_CASES = [
    _model(None),
    _model({}),
    _model({"phase": "Ready", "size": 397808192, "files": [{"name": "m.gguf", "size": 397808192}]}),
    _model({"phase": "Resolving"}, annotations={"team": "a"}),
    _model({"size": -1}),  # junk a v1alpha1 client wrote: no humanSize derived from it, kept as is
    _model({"size": 5}, annotations={FIELDS_ANNOTATION: json.dumps({"humanSize": None})}),
]


def test_the_examples_hold_both_kinds() -> None:
    assert {obj["kind"] for obj in EXAMPLES} == set(conversion.KINDS)


@pytest.mark.parametrize("original", EXAMPLES + SPEC_CASES + MODEL_CASES)
def test_v1alpha1_round_trips_through_v1beta1(original: dict[str, Any]) -> None:
    alpha = {**original, "apiVersion": ALPHA}
    before = copy.deepcopy(alpha)
    beta = convert(alpha, BETA)
    assert beta["apiVersion"] == BETA
    assert convert(beta, ALPHA) == alpha
    assert alpha == before, "conversion never changes its input"


@pytest.mark.parametrize("original", EXAMPLES + MODEL_CASES)
def test_v1beta1_round_trips_through_v1alpha1(original: dict[str, Any]) -> None:
    beta = convert({**original, "apiVersion": ALPHA}, BETA)
    assert convert(convert(beta, ALPHA), BETA) == beta


def test_up_conversion_derives_the_human_size_the_operator_writes() -> None:
    beta = convert(_model({"phase": "Ready", "size": 1288490189}), BETA)
    assert beta["status"]["humanSize"] == "1.2Gi"
    assert v1beta1.LlamaModel.model_validate(beta).status.to_wire()["humanSize"] == "1.2Gi"
    # A v1alpha1 reader never sees the field it has no schema for, nor an annotation when none is needed.
    alpha = convert(beta, ALPHA)
    assert "humanSize" not in alpha["status"] and "annotations" not in alpha["metadata"]
    v1alpha1.LlamaModel.model_validate(alpha)


def test_the_operator_writes_the_human_size_with_every_size() -> None:
    assert v1beta1.LlamaModelStatus(size=300 * 1024**2).to_wire() == {"size": 314572800, "humanSize": "300Mi"}
    # Derived, so a stale or hand-written value never survives a parse.
    assert v1beta1.LlamaModelStatus.model_validate({"size": 1024, "humanSize": "9Gi"}).human_size == "1Ki"
    assert v1beta1.LlamaModelStatus().to_wire() == {}


@pytest.mark.parametrize(("beta_status", "kept"), [
    ({"size": 1024, "humanSize": "one kibibyte"}, "one kibibyte"),  # not what up-conversion would derive
    ({"size": 1024}, None),  # absent although derivable
    ({"humanSize": "1Ki"}, "1Ki"),  # no size to derive it from
])
def test_a_human_size_up_conversion_cannot_derive_is_kept_in_the_annotation(beta_status: dict[str, Any],
                                                                         kept: str | None) -> None:
    beta = {**_model(beta_status, annotations={"team": "a"}), "apiVersion": BETA}
    alpha = convert(beta, ALPHA)
    assert json.loads(alpha["metadata"]["annotations"][FIELDS_ANNOTATION]) == {"humanSize": kept}
    assert alpha["metadata"]["annotations"]["team"] == "a"
    assert "humanSize" not in alpha["status"]
    assert convert(alpha, BETA) == beta


def test_a_server_changes_only_its_api_version() -> None:
    alpha = _server({"replicas": 2, "args": ["--jinja"]})
    beta = convert(alpha, BETA)
    assert beta == {**alpha, "apiVersion": BETA}


@pytest.mark.parametrize(("size", "text"), [
    (0, "0"), (1023, "1023"), (1024, "1Ki"), (1536, "1.5Ki"), (300 * 1024**2, "300Mi"), (1288490189, "1.2Gi"),
    (1024**3 - 1, "1Gi"), (5 * 1024**6, "5Ei"), (2048 * 1024**6, "2048Ei"),
])
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(("obj", "desired", "message"), [
    ("text", BETA, "not an object"),
    ({"apiVersion": ALPHA, "kind": "Pod"}, BETA, "kind 'Pod' is not one of LlamaModel, LlamaServer"),
    ({"apiVersion": "llamacpp.dev/v2", "kind": "LlamaModel"}, BETA, "apiVersion 'llamacpp.dev/v2' is not one of"),
    (_model({}), "llamacpp.dev/v9", "apiVersion 'llamacpp.dev/v9' is not one of"),
    ({**_model({}), "status": []}, ALPHA, "status must be an object"),
    ({**_model({}), "metadata": "m"}, BETA, "metadata must be an object"),
    (_model({}, annotations={FIELDS_ANNOTATION: "{"}), BETA, "is not JSON"),
    (_model({}, annotations={FIELDS_ANNOTATION: '{"spec": 1}'}), BETA, "may hold only humanSize"),
    (_model({}, annotations={FIELDS_ANNOTATION: '{"humanSize": 3}'}), BETA, "humanSize must be a string"),
])
def test_bad_objects_are_refused_with_a_message(obj: Any, desired: str, message: str) -> None:
    if desired == ALPHA and isinstance(obj, dict):
        obj = {**obj, "apiVersion": BETA}
    with pytest.raises(ConversionError) as raised:
        convert(obj, desired)
    assert message in str(raised.value)


def _review(objects: list[Any], desired: str = BETA) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
            "request": {"uid": "u-1", "desiredAPIVersion": desired, "objects": objects}}


def test_review_converts_every_object() -> None:
    answer = review(_review([_model({"size": 2048}), _server({})]))
    assert answer["apiVersion"] == "apiextensions.k8s.io/v1" and answer["kind"] == "ConversionReview"
    response = answer["response"]
    assert response["uid"] == "u-1" and response["result"] == {"status": "Success"}
    assert [obj["apiVersion"] for obj in response["convertedObjects"]] == [BETA, BETA]
    assert response["convertedObjects"][0]["status"]["humanSize"] == "2Ki"


def test_review_names_each_bad_object_and_converts_none() -> None:
    bad_kind = {**_server({}), "kind": "Pod"}
    bad_annotation = _model({}, annotations={FIELDS_ANNOTATION: "{"})
    response = review(_review([_server({}), bad_kind, bad_annotation, 7]))["response"]
    assert response["convertedObjects"] == []
    assert response["result"]["status"] == "Failure"
    assert response["result"]["message"] == (
        "object 1 (Pod default/s): kind 'Pod' is not one of LlamaModel, LlamaServer; "
        f"object 2 (LlamaModel default/m): metadata.annotations[{FIELDS_ANNOTATION}] is not JSON; "
        "object 3: not an object")


@pytest.mark.parametrize(("body", "message"), [
    ([], "not a ConversionReview"),
    ({"kind": "AdmissionReview"}, "not a ConversionReview"),
    ({**_review([]), "apiVersion": "apiextensions.k8s.io/v1beta1"}, "only apiextensions.k8s.io/v1"),
    ({**_review([]), "request": {"uid": "u-2", "objects": "x"}}, "request.objects must be a list"),
])
def test_a_bad_review_is_a_failure_not_an_exception(body: Any, message: str) -> None:
    response = review(body)["response"]
    assert response["result"]["status"] == "Failure" and message in response["result"]["message"]
    assert response["convertedObjects"] == []


def test_the_message_is_bounded() -> None:
    objects = [{**_server({}), "kind": "X" * 500} for _ in range(50)]
    assert len(review(_review(objects))["response"]["result"]["message"]) <= 2048


async def test_the_webhook_server_answers_convert_on_the_admission_port() -> None:
    """Through kopf's own aiohttp server (plain HTTP here: the TLS is kopf's, tested by kopf)."""
    server = ForgetfulWebhookServer(addr="127.0.0.1", port=0, host="127.0.0.1", insecure=True)
    routed: list[Any] = []

    async def kopf_admission(request: Any, **kwargs: Any) -> Any:
        routed.append(kwargs["webhook"])
        return {"kopf": True}

    served = server(kopf_admission)
    client_config = await served.__anext__()
    base = client_config["url"].rstrip("/")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/{CONVERSION_WEBHOOK_ID}", json=_review([_model({"size": 1})])) as r:
                assert r.status == 200
                converted = await r.json()
            assert converted["response"]["convertedObjects"][0]["status"]["humanSize"] == "1"
            async with session.post(f"{base}/{CONVERSION_WEBHOOK_ID}", json={"kind": "Nope"}) as r:
                assert (await r.json())["response"]["result"]["status"] == "Failure"
            # The body is bounded before it is parsed (aiohttp's 1 MiB).
            async with session.post(f"{base}/{CONVERSION_WEBHOOK_ID}", data=b"[" + b" " * (2 << 20) + b"]") as r:
                assert r.status == 413
            async with session.post(f"{base}/validate-llamaserver", json={"request": {}}) as r:
                assert await r.json() == {"kopf": True}
    finally:
        await served.aclose()
    assert routed == ["validate-llamaserver"]


def test_crds_command_writes_the_conversion_webhook(tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    assert main(["crds", "--conversion-service", "llama-system/llama-webhook", "--ca-bundle", str(ca)]) == 0
    crds = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(crds) == 2
    for crd in crds:
        client = crd["spec"]["conversion"]["webhook"]["clientConfig"]
        assert crd["spec"]["conversion"]["strategy"] == "Webhook"
        assert base64.b64decode(client["caBundle"]) == ca.read_bytes()
        assert client["service"] == {"namespace": "llama-system", "name": "llama-webhook", "path": "/convert",
                                     "port": 443}
    assert main(["crds", "--conversion-url", "https://127.0.0.1:9443/", "--ca-bundle", str(ca),
                 "--out-dir", str(tmp_path)]) == 0
    written = yaml.safe_load((tmp_path / "llamacpp.dev_llamaservers.yaml").read_text())
    assert written["spec"]["conversion"]["webhook"]["clientConfig"]["url"] == "https://127.0.0.1:9443/convert"
    # Without the flags: the plain CRDs, no conversion section (strategy None).
    assert main(["crds"]) == 0
    assert all("conversion" not in crd["spec"] for crd in yaml.safe_load_all(capsys.readouterr().out))


@pytest.mark.parametrize(("args", "message"), [
    (["--conversion-service", "ns/svc"], "need --ca-bundle"),
    (["--conversion-service", "no-namespace", "--ca-bundle", "CA"], "expected NAMESPACE/NAME"),
    (["--conversion-service", "a/b", "--conversion-url", "https://x", "--ca-bundle", "CA"], "exactly one"),
    (["--conversion-url", "https://x", "--ca-bundle", "/nonexistent/ca.crt"], "No such file"),
])
def test_crds_command_refuses_a_half_conversion_config(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                                       args: list[str], message: str) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"pem")
    assert main(["crds", *[str(ca) if a == "CA" else a for a in args]]) == 2
    assert message in capsys.readouterr().err
