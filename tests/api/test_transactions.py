"""Reading, listing and reversing transactions (API.md, Debits, transfers, transactions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, FakeClock, key, mismatch, posted, problem

T0 = datetime(2030, 1, 1, tzinfo=UTC)


async def lots_of(client: AsyncTestClient[Any], address: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/accounts/{address}/lots")
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def reverse(client: AsyncTestClient[Any], txn_id: str, **body: Any) -> Any:
    return await client.post(f"/v1/transactions/{txn_id}/reverse", json=body, headers=key())


async def get_txn(client: AsyncTestClient[Any], txn_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/transactions/{txn_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# Reading -----------------------------------------------------------------------


async def test_get_transaction(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """GET of a transaction returns its entries, actor and the request id that created it."""
    clock.set(T0)
    await api.employee("e-1")
    await api.grant("e-1", 100)
    r = await client.post(
        "/v1/debits",
        json={"account": "employee:e-1", "amount": 25, "metadata": {"k": "v"}},
        headers={**key(), "X-Request-Id": "req-from-caller-42"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "req-from-caller-42"
    created = r.json()

    body = await get_txn(client, created["id"])
    assert body == created
    assert body["kind"] == "debit" and body["metadata"] == {"k": "v"}
    assert body["request_id"] == "req-from-caller-42"
    assert "actor" in body
    assert body["created_at"] == "2030-01-01T00:00:00.000000Z"
    assert [
        (e["account"], e["amount"], e["balance_after"], e["version"]) for e in body["entries"]
    ] == [("employee:e-1", -25, 75, 2), ("system:usage", 25, 25, 1)]


async def test_get_unknown_transaction(client: AsyncTestClient[Any]) -> None:
    """GET of an unknown or malformed transaction id answers 404 transaction_not_found."""
    bad = {}
    for txn_id in [
        "txn_" + "0" * 32,
        "txn_0123456789abcdef0123456789abcdef",
        "garbage",
        "txn_nothex",
        "lot_" + "0" * 32,
    ]:
        why = mismatch(await client.get(f"/v1/transactions/{txn_id}"), 404, "transaction_not_found")
        if why:
            bad[txn_id] = why
    assert bad == {}


# Listing -----------------------------------------------------------------------


async def test_list_transactions_filters_and_pages(api: Api, client: AsyncTestClient[Any]) -> None:
    """Listing by account pages newest first with a cursor, visiting every transaction once; kind
    filters."""
    await api.employee("e-1")
    await api.employee("e-2")
    ids = [(await api.grant("e-1", 100))["transaction"]["id"]]
    await api.grant("e-2", 100)  # another account's transaction, never listed below
    for amount in (1, 2, 3, 4):
        r = await api.debit("employee:e-1", amount)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    newest_first = list(reversed(ids))

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"account": "employee:e-1", "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        r = await client.get("/v1/transactions", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == newest_first
    assert pages == 3

    r = await client.get("/v1/transactions", params={"account": "employee:e-1", "kind": "debit"})
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["items"]] == newest_first[:4]
    assert all(t["kind"] == "debit" for t in r.json()["items"])
    assert r.json()["next_cursor"] is None

    r = await client.get("/v1/transactions", params={"account": "employee:e-1", "kind": "grant"})
    assert [t["id"] for t in r.json()["items"]] == [ids[0]]

    r = await client.get("/v1/transactions", params={"kind": "grant"})
    assert len(r.json()["items"]) == 2

    r = await client.get("/v1/transactions", params={"account": "employee:e-2", "kind": "debit"})
    assert r.json() == {"items": [], "next_cursor": None}


async def test_list_transactions_bad_query(client: AsyncTestClient[Any]) -> None:
    """A bad limit, kind, cursor or account address answers 400 invalid_request."""
    bad = {}
    for params in [
        {"limit": 0},
        {"limit": 501},
        {"limit": "x"},
        {"kind": "bogus"},
        {"cursor": "!!!not-a-cursor"},
        {"account": "nope"},
    ]:
        why = mismatch(await client.get("/v1/transactions", params=params), 400, "invalid_request")
        if why:
            bad[str(params)] = why
    assert bad == {}


async def test_list_transactions_limit_bounds(api: Api, client: AsyncTestClient[Any]) -> None:
    """limit=1 and limit=500 are accepted."""
    await api.employee("e-1")
    await api.grant("e-1", 10)
    await api.grant("e-1", 10)
    r = await client.get("/v1/transactions", params={"limit": 1})
    assert (
        r.status_code == 200 and len(r.json()["items"]) == 1 and r.json()["next_cursor"] is not None
    )
    r = await client.get("/v1/transactions", params={"limit": 500})
    assert r.status_code == 200 and len(r.json()["items"]) == 2 and r.json()["next_cursor"] is None


async def test_list_transactions_unknown_account(client: AsyncTestClient[Any]) -> None:
    """Listing the transactions of an unknown employee answers 404 employee_not_found."""
    problem(
        await client.get("/v1/transactions", params={"account": "employee:nobody"}),
        404,
        "employee_not_found",
    )


# Reversals ---------------------------------------------------------------------


async def test_reverse_debit(api: Api, client: AsyncTestClient[Any]) -> None:
    """Reversing a debit answers 201 with a reversal that restores the consumed lot and both
    balances, and links the two."""
    await api.employee("e-1")
    lot = (await api.grant("e-1", 100))["lot"]
    debit = (await api.debit("employee:e-1", 30)).json()
    assert await posted(api, "system:usage") == 30

    r = await reverse(client, debit["id"], memo="refund")
    assert r.status_code == 201, r.text
    rev = r.json()
    assert rev["kind"] == "reversal" and rev["reverses"] == debit["id"] and rev["memo"] == "refund"
    assert sorted((e["account"], e["amount"]) for e in rev["entries"]) == [
        ("employee:e-1", 30),
        ("system:usage", -30),
    ]
    wallet_leg = next(e for e in rev["entries"] if e["account"] == "employee:e-1")
    assert (wallet_leg["balance_after"], wallet_leg["version"]) == (100, 3)
    assert rev["lots"] == [{"lot_id": lot["id"], "amount": 30}]

    assert [(x["id"], x["remaining"]) for x in await lots_of(client, "employee:e-1")] == [
        (lot["id"], 100)
    ]
    assert await api.available("employee:e-1") == 100
    assert await posted(api, "system:usage") == 0
    assert (await get_txn(client, debit["id"]))["reversed_by"] == rev["id"]
    assert (await get_txn(client, rev["id"]))["reverses"] == debit["id"]

    body = problem(await reverse(client, debit["id"]), 409, "already_reversed")
    assert body.get("reversed_by", rev["id"]) == rev["id"]
    assert await api.available("employee:e-1") == 100
    assert await posted(api, "system:usage") == 0


async def test_reverse_unspent_grant(api: Api, client: AsyncTestClient[Any]) -> None:
    """Reversing an unspent grant takes its credits back to system:issuance."""
    await api.employee("e-1")
    g = await api.grant("e-1", 100)
    r = await reverse(client, g["transaction"]["id"])
    assert r.status_code == 201, r.text
    assert await posted(api, "employee:e-1") == 0
    assert await posted(api, "system:issuance") == 0
    assert await lots_of(client, "employee:e-1") == []


async def test_reverse_partly_spent_grant(api: Api, client: AsyncTestClient[Any]) -> None:
    """Reversing a grant whose credits are partly spent answers 409 insufficient_credits and changes
    nothing."""
    await api.employee("e-1")
    g = await api.grant("e-1", 100)
    assert (await api.debit("employee:e-1", 1)).status_code == 201
    body = problem(await reverse(client, g["transaction"]["id"]), 409, "insufficient_credits")
    assert body["available"] == 99 and body["requested"] == 100
    assert await posted(api, "employee:e-1") == 99
    assert await posted(api, "system:issuance") == -100
    assert (await get_txn(client, g["transaction"]["id"]))["reversed_by"] is None


async def test_reverse_expiry_transaction(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """Reversing an expiry transaction answers 400 invalid_request."""
    clock.set(T0)
    await api.employee("e-1")
    await api.grant("e-1", 100, expires_at=(T0 + timedelta(hours=1)).isoformat())
    clock.set(T0 + timedelta(hours=2))
    await api.grant("e-1", 5)  # a write to the wallet writes the due expiry first
    r = await client.get("/v1/transactions", params={"account": "employee:e-1", "kind": "expiry"})
    expiries = r.json()["items"]
    assert len(expiries) == 1
    problem(await reverse(client, expiries[0]["id"]), 400, "invalid_request")
    assert await posted(api, "system:expired") == 100
    assert await posted(api, "employee:e-1") == 5


async def test_reverse_reversal(api: Api, client: AsyncTestClient[Any]) -> None:
    """Reversing a reversal answers 400 invalid_request."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    debit = (await api.debit("employee:e-1", 30)).json()
    r = await reverse(client, debit["id"])
    assert r.status_code == 201, r.text
    problem(await reverse(client, r.json()["id"]), 400, "invalid_request")
    assert await api.available("employee:e-1") == 100


async def test_reverse_unknown_transaction(client: AsyncTestClient[Any]) -> None:
    """Reversing an unknown or malformed transaction id answers 404 transaction_not_found."""
    bad = {}
    for txn_id in ["txn_" + "0" * 32, "garbage"]:
        why = mismatch(await reverse(client, txn_id), 404, "transaction_not_found")
        if why:
            bad[txn_id] = why
    assert bad == {}


async def test_reverse_transfer(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """Reversing a transfer restores the sender's original lot and empties the receiver's carried
    lot."""
    clock.set(T0)
    await api.employee("e-1")
    await api.employee("e-2")
    lot = (await api.grant("e-1", 50, expires_at=(T0 + timedelta(days=5)).isoformat()))["lot"]
    t = (await api.transfer("employee:e-1", "employee:e-2", 20)).json()
    carried = await lots_of(client, "employee:e-2")
    assert [x["remaining"] for x in carried] == [20]

    r = await reverse(client, t["id"])
    assert r.status_code == 201, r.text
    assert {m["lot_id"]: m["amount"] for m in r.json()["lots"]} == {
        lot["id"]: 20,
        carried[0]["id"]: -20,
    }
    assert [(x["id"], x["remaining"]) for x in await lots_of(client, "employee:e-1")] == [
        (lot["id"], 50)
    ]
    assert await lots_of(client, "employee:e-2") == []
    assert await posted(api, "employee:e-1") == 50
    assert await posted(api, "employee:e-2") == 0


async def test_reverse_transfer_after_receiver_spent(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Reversing a transfer whose received credits were spent answers 409 insufficient_credits and
    changes nothing."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 50)
    t = (await api.transfer("employee:e-1", "employee:e-2", 20)).json()
    assert (await api.debit("employee:e-2", 5)).status_code == 201
    problem(await reverse(client, t["id"]), 409, "insufficient_credits")
    assert await posted(api, "employee:e-1") == 30
    assert await posted(api, "employee:e-2") == 15


async def test_reverse_debit_after_lot_expired(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """Reversing a debit whose lot has expired succeeds, and the restored credits expire at once
    into system:expired."""
    clock.set(T0)
    await api.employee("e-1")
    await api.grant("e-1", 100, expires_at=(T0 + timedelta(days=1)).isoformat())
    debit = (await api.debit("employee:e-1", 30)).json()

    clock.set(T0 + timedelta(days=2))
    assert await api.available("employee:e-1") == 0
    r = await reverse(client, debit["id"])
    assert r.status_code == 201, r.text
    rev = r.json()
    assert rev["kind"] == "reversal" and rev["reverses"] == debit["id"]

    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"]) == (0, 0)
    assert await posted(api, "system:usage") == 0
    assert await posted(api, "system:expired") == 100
    assert await lots_of(client, "employee:e-1") == []

    r = await client.get("/v1/transactions", params={"account": "employee:e-1", "kind": "expiry"})
    expiries = r.json()["items"]
    wallet_legs = sorted(
        e["amount"] for t in expiries for e in t["entries"] if e["account"] == "employee:e-1"
    )
    assert wallet_legs == [-70, -30]
    after = [
        t
        for t in expiries
        if any(e["amount"] == -30 for e in t["entries"] if e["account"] == "employee:e-1")
    ]
    assert len(after) == 1
    assert {(e["account"], e["amount"]) for e in after[0]["entries"]} == {
        ("employee:e-1", -30),
        ("system:expired", 30),
    }
    assert after[0]["created_at"] == rev["created_at"]
