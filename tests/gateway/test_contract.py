"""The client against the OpenAPI schema the service serves: a change of the
contract (a renamed path, a field added as required, a field dropped from a
response, a new error code) breaks this test rather than a gateway.

The served schema is `/schema/openapi.json` of an app built by
`service.app.create_app`; the client's side is the JSON schema msgspec
derives from its Structs, and the requests the client really sends (caught
by a mock transport)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import msgspec
import pytest

from service.app import create_app
from service.config import Config
from service.openapi import served as served_document
from tokenledger_client import Client, Estimate, UsageCounts, UsageEvent, errors, models

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def served() -> Schema:
    """The OpenAPI document the app serves at /schema/openapi.json
    (service.openapi.served: Litestar's document with what it cannot know
    added; building it needs no database)."""
    config = Config(
        database_url="postgresql://unused@127.0.0.1:1/unused",
        environment="development",
        apply_schema=False,
        background_enabled=False,
    )
    app = create_app(config)
    document: Schema = served_document(app)
    assert document["openapi"].startswith("3.1")
    return document


def resolve(node: Schema, root: Schema) -> Schema:
    """Follow $ref, and unwrap `X | null` (or `X | anything`) to X."""
    while True:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            defs = root.get("components", {}).get("schemas") or root.get("$defs", {})
            node = defs[name]
            continue
        alts = node.get("oneOf") or node.get("anyOf")
        if alts:
            # `{}` (anything) beside a schema: the schema is what a caller sends.
            non_null = [a for a in alts if a.get("type") != "null" and a]
            if len(non_null) == 1:
                node = non_null[0]
                continue
        return node


def compare(client: Schema, croot: Schema, server: Schema, sroot: Schema, *, request: bool,
            path: str = "$") -> list[str]:  # fmt: skip
    """Differences that would break: for requests, a field the server does not
    know or requires and the client may omit; for responses, a field the client
    requires that the server may not send, or does not have at all."""
    c, s = resolve(client, croot), resolve(server, sroot)
    if c.get("type") == "array" and s.get("type") == "array":
        return compare(c["items"], croot, s["items"], sroot, request=request, path=path + "[]")
    if "properties" not in c or "properties" not in s:
        return []
    problems = []
    c_req, s_req = set(c.get("required", ())), set(s.get("required", ()))
    for name, sub in c["properties"].items():
        where = f"{path}.{name}"
        if name not in s["properties"]:
            problems.append(f"{where}: not in the served schema")
            continue
        if not request and name in c_req and name not in s_req:
            problems.append(f"{where}: the client requires it, the server may omit it")
        problems += compare(sub, croot, s["properties"][name], sroot, request=request, path=where)
    if request:
        for name in s_req - c_req:
            problems.append(f"{path}.{name}: required by the server, optional in the client")
    return problems


def client_schema(struct: type) -> tuple[Schema, Schema]:
    (ref,), components = msgspec.json.schema_components([struct])
    return ref, {"$defs": components}


OPERATIONS = [
    # method, path template, request Struct, response Struct, success status
    ("post", "/v1/reservations", models.ReserveRequest, models.Reservation, "201"),
    ("post", "/v1/reservations/{reservation_id}/capture", models.CaptureRequest,
     models.CaptureResult, "200"),
    ("post", "/v1/reservations/{reservation_id}/release", None, models.Reservation, "200"),
    ("post", "/v1/reservations/{reservation_id}/extend", models.ExtendRequest,
     models.Reservation, "200"),
    ("get", "/v1/reservations/{reservation_id}", None, models.Reservation, "200"),
    ("get", "/v1/accounts/{address}", None, models.Account, "200"),
    ("post", "/v1/debits", models.DebitRequest, models.Transaction, "201"),
    ("post", "/v1/usage", models.UsageEvent, models.UsageRecorded, "201"),
    ("post", "/v1/usage:batch", models.UsageBatchRequest, models.UsageBatchResponse, "200"),
]  # fmt: skip


@pytest.mark.parametrize("method,template,request_struct,response_struct,status", OPERATIONS)
def test_operation_matches_the_served_schema(
    served: Schema, method: str, template: str, request_struct: Any, response_struct: Any,
    status: str,
) -> None:  # fmt: skip
    """Each operation the client calls exists, and its request and response
    Structs agree with the served schema field by field."""
    operation = served["paths"].get(template, {}).get(method)
    assert operation is not None, f"{method.upper()} {template} is not served"
    if request_struct is not None:
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        ref, root = client_schema(request_struct)
        assert compare(ref, root, body, served, request=True) == []
    answer = operation["responses"][status]["content"]["application/json"]["schema"]
    ref, root = client_schema(response_struct)
    assert compare(ref, root, answer, served, request=False) == []


def test_every_served_error_code_has_a_class(served: Schema) -> None:
    """Every error code any operation documents maps to its own exception class."""
    codes: set[str] = set()
    for item in served["paths"].values():
        for operation in item.values():
            for status, response in (operation.get("responses") or {}).items():
                if status.startswith(("4", "5")):
                    codes |= set(re.findall(r"`([a-z_]+)`", response.get("description", "")))
    assert len(codes) > 15
    missing = sorted(code for code in codes if code not in errors.ERROR_CLASSES)
    assert missing == []
    for code in codes:
        assert errors.ERROR_CLASSES[code].code == code


def test_requests_the_client_sends_match_the_templates(served: Schema) -> None:
    """The paths, methods and headers the client really sends are the served
    ones; state-changing calls carry an Idempotency-Key, usage events do not."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(400, json={"code": "invalid_request", "status": 400})

    with Client("http://ledger.test", "tlk_a_b", transport=httpx.MockTransport(answer)) as c:
        event = UsageEvent(source="s", event_id="e", account="employee:e-1", model="m",
                           input_tokens=1, output_tokens=1)  # fmt: skip
        calls = [
            lambda: c.reserve("employee:e-1", amount=5),
            lambda: c.reserve("employee:e-1", estimate=Estimate("m", 1, 2, 1)),
            lambda: c.capture("rsv_x", usage=UsageCounts("m", 3, 1, 2)),
            lambda: c.capture_usage(
                "rsv_x", {"prompt_tokens": 3, "completion_tokens": 1}, model="m"
            ),  # fmt: skip
            lambda: c.release("rsv_x"),
            lambda: c.extend("rsv_x", 60),
            lambda: c.get_reservation("rsv_x"),
            lambda: c.account("employee:e-1"),
            lambda: c.debit("employee:e-1", 5),
            lambda: c.record_usage(event),
            lambda: c.record_usage_batch([event]),
        ]
        for call in calls:
            with pytest.raises(errors.InvalidRequest):
                call()
    templates = {(m.upper(), t) for m, t, *_ in OPERATIONS}
    for request in sent:
        path = request.url.path
        match = [t for m, t in templates if m == request.method
                 and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path)]  # fmt: skip
        assert match, f"{request.method} {path} is not an operation the client declares"
        keyed = "idempotency-key" in request.headers
        assert keyed == (request.method == "POST" and "/v1/usage" not in path), path
        assert request.headers["authorization"] == "Bearer tlk_a_b"
