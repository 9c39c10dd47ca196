"""Idempotency keys (API.md, Conventions, Idempotency)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, key, mismatch, posted, problem

REPLAYED = "Idempotent-Replayed"


async def balances(api: Api, *addresses: str) -> dict[str, tuple[int, int]]:
    """(posted, version) of each account: any write changes the version."""
    out = {}
    for a in addresses:
        acct = await api.account(a)
        out[a] = (int(acct["posted"]), int(acct["version"]))
    return out


async def assert_replay(send: Callable[[], Awaitable[Any]], status: int) -> Any:
    """Send once, then again: the same status and bytes, the second marked replayed."""
    first = await send()
    assert first.status_code == status, first.text
    assert REPLAYED not in first.headers
    again = await send()
    assert again.status_code == status, again.text
    assert again.headers.get(REPLAYED) == "true"
    assert again.json() == first.json()
    assert again.content == first.content
    return first


# Replays -------------------------------------------------------------------------------


async def test_replay_grant(api: Api, client: AsyncTestClient[Any]) -> None:
    """A grant replayed with the same key and body returns the stored 201 and grants once."""
    await api.employee("e-1")
    k = key()
    body = {"employee": "e-1", "amount": 100, "reason": "spot_bonus", "metadata": {"a": 1}}
    await assert_replay(lambda: client.post("/v1/grants", json=body, headers=k), 201)
    # Key order and whitespace do not change the request.
    r = await client.post(
        "/v1/grants",
        content=b'{"reason":"spot_bonus", "metadata":{"a":1},"amount":100,"employee":"e-1"}',
        headers={**k, "content-type": "application/json"},
    )
    assert r.status_code == 201 and r.headers.get(REPLAYED) == "true", r.text
    assert await posted(api, "employee:e-1") == 100
    assert await posted(api, "system:issuance") == -100


async def test_replay_debit(api: Api, client: AsyncTestClient[Any]) -> None:
    """A debit replayed with the same key and body returns the stored 201 and debits once."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    k = key()
    body = {"account": "employee:e-1", "amount": 30}
    await assert_replay(lambda: client.post("/v1/debits", json=body, headers=k), 201)
    assert await posted(api, "employee:e-1") == 70
    assert await posted(api, "system:usage") == 30


async def test_replay_transfer(api: Api, client: AsyncTestClient[Any]) -> None:
    """A transfer replayed with the same key and body returns the stored 201 and transfers once."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 100)
    k = key()
    body = {"from": "employee:e-1", "to": "employee:e-2", "amount": 40}
    await assert_replay(lambda: client.post("/v1/transfers", json=body, headers=k), 201)
    assert await posted(api, "employee:e-1") == 60
    assert await posted(api, "employee:e-2") == 40


async def test_replay_void(api: Api, client: AsyncTestClient[Any]) -> None:
    """A lot void replayed with the same key returns the stored 200, not lot_not_active."""
    await api.employee("e-1")
    lot = (await api.grant("e-1", 100))["lot"]
    k = key()
    await assert_replay(
        lambda: client.post(f"/v1/lots/{lot['id']}/void", json={"memo": "m"}, headers=k), 200
    )
    assert await posted(api, "employee:e-1") == 0
    assert await posted(api, "system:issuance") == 0


async def test_replay_reverse(api: Api, client: AsyncTestClient[Any]) -> None:
    """A reversal replayed with the same key returns the stored 201, not already_reversed."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    debit = (await api.debit("employee:e-1", 30)).json()
    k = key()
    await assert_replay(
        lambda: client.post(f"/v1/transactions/{debit['id']}/reverse", json={}, headers=k), 201
    )
    assert await posted(api, "employee:e-1") == 100
    assert await posted(api, "system:usage") == 0


async def test_replay_offboard(api: Api, client: AsyncTestClient[Any]) -> None:
    """An offboard replayed with the same key returns the stored 200, not account_closed."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    k = key()
    await assert_replay(lambda: client.post("/v1/employees/e-1/offboard", json={}, headers=k), 200)
    assert await posted(api, "system:issuance") == 0


async def test_replay_stored_conflict(api: Api, client: AsyncTestClient[Any]) -> None:
    """A 409 is stored: replaying its key returns the same 409 body, marked replayed, even once it
    would now succeed."""
    await api.employee("e-1")
    await api.grant("e-1", 10)
    k = key()
    body = {"account": "employee:e-1", "amount": 50}
    first = await client.post("/v1/debits", json=body, headers=k)
    problem(first, 409, "insufficient_credits")
    assert first.json()["available"] == 10 and first.json()["requested"] == 50
    assert REPLAYED not in first.headers

    await api.grant("e-1", 100)
    before = await balances(api, "employee:e-1")
    again = await client.post("/v1/debits", json=body, headers=k)
    problem(again, 409, "insufficient_credits")
    assert again.headers.get(REPLAYED) == "true"
    assert again.json() == first.json()
    assert await balances(api, "employee:e-1") == before
    assert await posted(api, "system:usage") == 0


# Mismatches ------------------------------------------------------------------------------


async def test_same_key_different_body(api: Api, client: AsyncTestClient[Any]) -> None:
    """The same key with a different body answers 422 idempotency_key_reused and changes nothing."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    k = key()
    assert (
        await client.post("/v1/debits", json={"account": "employee:e-1", "amount": 10}, headers=k)
    ).status_code == 201
    before = await balances(api, "employee:e-1")
    r = await client.post("/v1/debits", json={"account": "employee:e-1", "amount": 11}, headers=k)
    problem(r, 422, "idempotency_key_reused")
    r = await client.post(
        "/v1/debits",
        json={"account": "employee:e-1", "amount": 10, "metadata": {"x": "y"}},
        headers=k,
    )
    problem(r, 422, "idempotency_key_reused")
    assert await balances(api, "employee:e-1") == before
    assert await posted(api, "system:usage") == 10


async def test_same_key_different_route(api: Api, client: AsyncTestClient[Any]) -> None:
    """A key used on one route answers 422 idempotency_key_reused on another, and changes
    nothing."""
    await api.employee("e-1")
    await api.employee("e-2")
    k = key()
    r = await client.post(
        "/v1/grants", json={"employee": "e-1", "amount": 100, "reason": "spot_bonus"}, headers=k
    )
    assert r.status_code == 201, r.text
    lot = r.json()["lot"]
    before = await balances(api, "employee:e-1", "employee:e-2")
    bad = {}
    for name, send in {
        "debit": lambda: client.post(
            "/v1/debits", json={"account": "employee:e-1", "amount": 5}, headers=k
        ),
        "transfer": lambda: client.post(
            "/v1/transfers",
            json={"from": "employee:e-1", "to": "employee:e-2", "amount": 5},
            headers=k,
        ),
        "void": lambda: client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=k),
        "offboard": lambda: client.post("/v1/employees/e-2/offboard", json={}, headers=k),
    }.items():
        why = mismatch(await send(), 422, "idempotency_key_reused")
        if why:
            bad[name] = why
    assert bad == {}
    assert await balances(api, "employee:e-1", "employee:e-2") == before
    assert (await api.account("employee:e-2"))["status"] == "open"


async def test_rejected_request_is_not_stored(api: Api, client: AsyncTestClient[Any]) -> None:
    """A 400 is not stored: the same key with the corrected body then succeeds with 201."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 100)
    k = key()
    # Rejected by the body's types.
    r = await client.post("/v1/debits", json={"account": "employee:e-1", "amount": 0}, headers=k)
    problem(r, 400, "invalid_request")
    r = await client.post("/v1/debits", json={"account": "employee:e-1", "amount": 5}, headers=k)
    assert r.status_code == 201 and REPLAYED not in r.headers, r.text
    # Rejected by the database function (a transfer to itself).
    k = key()
    r = await client.post(
        "/v1/transfers", json={"from": "employee:e-1", "to": "employee:e-1", "amount": 5}, headers=k
    )
    problem(r, 400, "invalid_request")
    r = await client.post(
        "/v1/transfers", json={"from": "employee:e-1", "to": "employee:e-2", "amount": 5}, headers=k
    )
    assert r.status_code == 201 and REPLAYED not in r.headers, r.text
    assert await posted(api, "employee:e-1") == 90
    assert await posted(api, "employee:e-2") == 5


# The header itself -----------------------------------------------------------------------


async def test_missing_key(api: Api, client: AsyncTestClient[Any]) -> None:
    """Every state-changing POST without an Idempotency-Key answers 400 idempotency_key_required and
    changes nothing."""
    await api.employee("e-1")
    g = await api.grant("e-1", 100)
    debit = (await api.debit("employee:e-1", 10)).json()
    before = await balances(api, "employee:e-1")
    bad = {}
    for path, body in {
        "/v1/grants": {"employee": "e-1", "amount": 5, "reason": "spot_bonus"},
        "/v1/debits": {"account": "employee:e-1", "amount": 5},
        "/v1/transfers": {"from": "employee:e-1", "to": "department:eng", "amount": 5},
        f"/v1/lots/{g['lot']['id']}/void": {},
        f"/v1/transactions/{debit['id']}/reverse": {},
        "/v1/employees/e-1/offboard": {},
    }.items():
        why = mismatch(await client.post(path, json=body), 400, "idempotency_key_required")
        if why:
            bad[path] = why
    assert bad == {}
    assert await balances(api, "employee:e-1") == before
    assert (await api.account("employee:e-1"))["status"] == "open"


async def test_malformed_keys(api: Api, client: AsyncTestClient[Any]) -> None:
    """A key that is empty, longer than 255 characters or not printable ASCII answers 400; 255
    printable characters are accepted."""
    await api.employee("e-1")
    body = {"employee": "e-1", "amount": 5, "reason": "spot_bonus"}
    bad = {}
    for name, k in {
        "empty": "",
        "256 characters": "k" * 256,
        "control character": "abc\x01def",
        "tab": "abc\tdef",
        "delete": "abc\x7fdef",
    }.items():
        why = mismatch(
            await client.post("/v1/grants", json=body, headers={"Idempotency-Key": k}),
            400,
            "idempotency_key_required",
        )
        if why:
            bad[name] = why
    assert bad == {}
    assert await posted(api, "employee:e-1") == 0
    longest = "~" * 200 + " !#$%&'()*+,-./:;<=>?@[\\]^_`{|}" + "z" * 24
    assert len(longest) == 255
    r = await client.post("/v1/grants", json=body, headers={"Idempotency-Key": longest})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/grants", json=body, headers={"Idempotency-Key": longest})
    assert r.status_code == 201 and r.headers.get(REPLAYED) == "true", r.text
    assert await posted(api, "employee:e-1") == 5


# Concurrency -----------------------------------------------------------------------------


async def test_concurrent_requests_with_one_key(api: Api, client: AsyncTestClient[Any]) -> None:
    """20 concurrent debits with one key have exactly one effect and all answer 201 with the same
    transaction."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    k = key()
    body = {"account": "employee:e-1", "amount": 7}
    answers = await asyncio.gather(
        *(client.post("/v1/debits", json=body, headers=k) for _ in range(20))
    )
    assert [r.status_code for r in answers] == [201] * 20, [
        r.text[:200] for r in answers if r.status_code != 201
    ]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum(1 for r in answers if r.headers.get(REPLAYED) != "true") == 1
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["version"]) == (93, 2)
    assert await posted(api, "system:usage") == 7
