"""Crafted cursors and bodies answer 400, never 500 (issue 11, defect 11)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import Api, key, problem

LISTS = (
    "/v1/accounts/employee:e-1/entries",
    "/v1/accounts/employee:e-1/lots",
    "/v1/accounts/employee:e-1/reservations",
    "/v1/transactions",
    "/v1/prices",
    "/v1/grant-programs",
)
CRAFTED = (2**70, -(2**70), 2**63, -1, [1, 2, 3], {"a": 1}, "x", 1.5, True, ["x", "y"])


def cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", LISTS)
async def test_crafted_cursors_answer_400(client: Any, api: Api, path: str) -> None:
    """A cursor holding an integer beyond int64, a negative offset or a value of
    the wrong shape is invalid_request, like one that is not base64 at all."""
    await api.employee("e-1")
    for value in CRAFTED:
        r = await client.get(path, params={"cursor": cursor(value)})
        if r.status_code == 200:
            continue  # a shape this list can page by (a string, an id)
        problem(r, 400, "invalid_request")


async def test_deeply_nested_bodies_answer_400(client: Any) -> None:
    """A body nested deeper than the decoder goes is invalid_request, not a 500."""
    for path, body in (
        ("/v1/usage:batch", b'{"events": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
        (
            "/v1/grants:batch",
            b'{"grants": [{"employee": "e-1", "amount": 1, "reason": "spot_bonus", "metadata": '
            + b'{"a":' * 5000
            + b"1"
            + b"}" * 5000
            + b"}]}",
        ),
    ):
        r = await client.post(
            path, content=body, headers={"content-type": "application/json", **key()}
        )
        problem(r, 400, "invalid_request")


# --- fuzzing (hypothesis) ------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=int(os.environ.get("TOKENLEDGER_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Every route that decodes a body, with a valid body whose fields the fuzzer
# replaces one at a time (so that the decoders past the top level are reached).
EVENT = {
    "source": "gw",
    "event_id": "x",
    "account": "employee:e-1",
    "model": "m",
    "input_tokens": 1,
    "output_tokens": 1,
}
GRANT = {"employee": "e-1", "amount": 1, "reason": "spot_bonus"}
BODIES: dict[str, dict[str, Any]] = {
    "/v1/debits": {"account": "employee:e-1", "amount": 1, "memo": "m", "metadata": {"a": 1}},
    "/v1/transfers": {"from": "employee:e-1", "to": "employee:e-2", "amount": 1},
    "/v1/grants": {**GRANT, "expires_at": "2030-01-01T00:00:00Z", "priority": 5},
    "/v1/grants:batch": {"grants": [{**GRANT, "key": "k"}]},
    "/v1/reservations": {"account": "employee:e-1", "amount": 1, "ttl_seconds": 60},
    "/v1/usage": EVENT,
    "/v1/usage:batch": {"events": [EVENT]},
    "/v1/prices": {
        "model": "m",
        "input_per_mtok": 1,
        "cached_input_per_mtok": 1,
        "output_per_mtok": 1,
    },
}


@FUZZ
@given(value=JSON | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
async def test_fuzzed_cursors_never_500(client: Any, value: Any) -> None:
    """Any JSON value (or junk) as a cursor of any list answers 200 or 400."""
    for path in LISTS:
        raw = cursor(value) if not isinstance(value, str) else value
        r = await client.get(path, params={"cursor": raw})
        assert r.status_code in (200, 400, 404), (path, value, r.text)


@FUZZ
@given(data=st.data(), path=st.sampled_from(sorted(BODIES)), value=JSON)
async def test_fuzzed_bodies_never_500(client: Any, data: Any, path: str, value: Any) -> None:
    """Any JSON value in place of any field of any write's body (or in place
    of the whole body) answers a 4xx problem, never a 5xx."""
    body: Any = dict(BODIES[path])
    field = data.draw(st.sampled_from([None, *sorted(body)]))
    if field is None:
        body = value
    else:
        body[field] = value
    r = await client.post(path, json=body, headers=key())
    assert r.status_code < 500, (path, body, r.text)
