"""A request body is decoded once, strictly, and that value is the handler's `data`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from litestar import Litestar, post
from litestar.params import JSONBody
from litestar.testing import TestClient

from service.bodies import strict_body
from service.problems import EXCEPTION_HANDLERS

DECODED: list[Any] = []


class Charge(msgspec.Struct, forbid_unknown_fields=True):
    amount: int
    memo: str | None = None

    def __post_init__(self) -> None:
        # Called each time a Charge is made from a body: counts the decodes.
        DECODED.append(self)


class Expiring(msgspec.Struct, forbid_unknown_fields=True):
    at: datetime

    def __post_init__(self) -> None:
        DECODED.append(self)


RECEIVED: list[Any] = []


@post("/charge")
async def charge(data: JSONBody[Charge]) -> dict[str, Any]:
    RECEIVED.append(data)
    return {"amount": data.amount}


@post("/expiring")
async def expiring(data: JSONBody[Expiring]) -> dict[str, Any]:
    RECEIVED.append(data)
    return {"at": data.at.isoformat()}


@pytest.fixture
def client() -> Iterator[TestClient[Litestar]]:
    DECODED.clear()
    RECEIVED.clear()
    app = Litestar(
        route_handlers=[charge, expiring],
        before_request=strict_body,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    with TestClient(app) as test_client:
        yield test_client


def test_a_body_is_decoded_once(client: TestClient[Litestar]) -> None:
    """The handler gets the very value the strict check decoded: one Charge
    is made per request, not a second one by Litestar's own conversion."""
    r = client.post("/charge", json={"amount": 5, "memo": "lunch"})
    assert r.status_code == 201, r.text
    assert len(DECODED) == 1
    assert RECEIVED == DECODED


def test_a_whole_float_is_an_integer_and_text_is_not(client: TestClient[Litestar]) -> None:
    """5.0 is taken as 5 (one Charge made); "5" and 1.5 are refused with the
    path of the field, before the handler runs."""
    r = client.post("/charge", json={"amount": 5.0})
    assert (r.status_code, r.json(), len(DECODED)) == (201, {"amount": 5}, 1)
    assert type(RECEIVED[0].amount) is int
    for amount in ("5", 1.5):
        r = client.post("/charge", json={"amount": amount})
        assert r.status_code == 400
        assert r.json()["errors"][0]["path"] == "$.amount"
    assert len(RECEIVED) == 1


def test_nul_text_and_malformed_json_are_refused(client: TestClient[Litestar]) -> None:
    """Text with NUL and a body that is not JSON answer 400 naming where."""
    r = client.post("/charge", json={"amount": 1, "memo": "a\x00b"})
    assert r.status_code == 400
    assert r.json()["errors"] == [
        {"path": "$.memo", "message": "text may not contain the NUL character"}
    ]
    r = client.post("/charge", content=b'{"amount": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("the body is not valid JSON")
    assert RECEIVED == []


def test_a_timestamp_reaches_the_handler_in_utc(client: TestClient[Litestar]) -> None:
    """A timestamp in another offset reaches the handler in UTC (its body is
    the one kind converted again, from its UTC form); one in UTC is decoded
    once like any other body."""
    r = client.post("/expiring", json={"at": "2030-01-01T23:30:00+23:59"})
    assert r.status_code == 201, r.text
    assert RECEIVED[0].at == datetime(2029, 12, 31, 23, 31, tzinfo=UTC)
    assert RECEIVED[0].at.tzinfo is UTC
    assert len(DECODED) == 2
    DECODED.clear()
    r = client.post("/expiring", json={"at": "2030-01-01T23:30:00Z"})
    assert r.status_code == 201, r.text
    assert RECEIVED[1].at == datetime(2030, 1, 1, 23, 30, tzinfo=UTC)
    assert RECEIVED[1].at.tzinfo is UTC
    assert len(DECODED) == 1
