"""Debits, consumption order and transfers (API.md, Debits, transfers, transactions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, FakeClock, key, mismatch, posted, problem, ts

T0 = datetime(2030, 1, 1, tzinfo=UTC)


async def lots_of(client: AsyncTestClient[Any], address: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/accounts/{address}/lots")
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def movements(txn: dict[str, Any]) -> dict[str, int]:
    return {m["lot_id"]: m["amount"] for m in txn["lots"]}


# Debits ------------------------------------------------------------------------


async def test_debit_moves_credits_to_usage(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A debit answers 201 with entries wallet -X and system:usage +X, the wallet's balance_after
    and version."""
    clock.set(T0)
    await api.employee("e-1")
    lot = (await api.grant("e-1", 100))["lot"]
    r = await api.debit("employee:e-1", 40, metadata={"model": "gpt-x"}, memo="chat")
    assert r.status_code == 201, r.text
    txn = r.json()
    assert txn["id"].startswith("txn_") and txn["kind"] == "debit"
    assert txn["metadata"] == {"model": "gpt-x"} and txn["memo"] == "chat"
    assert txn["created_at"] == ts(T0)
    assert txn["reverses"] is None and txn["reversed_by"] is None
    assert [(e["account"], e["amount"]) for e in txn["entries"]] == [
        ("employee:e-1", -40),
        ("system:usage", 40),
    ]
    wallet = txn["entries"][0]
    assert (wallet["balance_after"], wallet["version"], wallet["asset"]) == (60, 2, "CREDIT")
    assert txn["entries"][1]["balance_after"] == 40
    assert txn["lots"] == [{"lot_id": lot["id"], "amount": -40}]

    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"], acct["version"]) == (60, 60, 2)
    assert await posted(api, "system:usage") == 40
    assert (await lots_of(client, "employee:e-1"))[0]["remaining"] == 60


async def test_debit_more_than_available(api: Api, client: AsyncTestClient[Any]) -> None:
    """A debit beyond the available credits answers 409 insufficient_credits with available and
    requested, and changes nothing."""
    await api.employee("e-1")
    await api.grant("e-1", 30)
    body = problem(await api.debit("employee:e-1", 31), 409, "insufficient_credits")
    assert body["available"] == 30 and body["requested"] == 31
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"], acct["version"]) == (30, 30, 1)
    assert await posted(api, "system:usage") == 0
    assert (await lots_of(client, "employee:e-1"))[0]["remaining"] == 30
    r = await api.debit("employee:e-1", 30)
    assert r.status_code == 201, r.text
    assert await api.available("employee:e-1") == 0


async def test_debit_empty_wallet(api: Api) -> None:
    """A debit of a wallet that never had credits answers 409 insufficient_credits with available
    0."""
    await api.employee("e-1")
    body = problem(await api.debit("employee:e-1", 1), 409, "insufficient_credits")
    assert body["available"] == 0 and body["requested"] == 1


async def test_debit_unknown_account(api: Api) -> None:
    """A debit of an unknown account answers 404 with the not-found code of its type; a
    system account, known or not, is no account a debit draws on (400, as its schema says)."""
    bad = {}
    for account, status, code in [
        ("employee:nobody", 404, "employee_not_found"),
        ("department:nope", 404, "department_not_found"),
        ("system:nope", 400, "invalid_request"),
        ("system:issuance", 400, "invalid_request"),
    ]:
        why = mismatch(await api.debit(account, 5), status, code)
        if why:
            bad[account] = why
    assert bad == {}


async def test_debit_system_account(api: Api) -> None:
    """A debit of a system account answers 400 invalid_request."""
    bad = {}
    for account in ["system:usage", "system:issuance", "system:expired"]:
        why = mismatch(await api.debit(account, 5), 400, "invalid_request")
        if why:
            bad[account] = why
    assert bad == {}
    assert await posted(api, "system:usage") == 0


async def test_debit_malformed_address(api: Api) -> None:
    """A debit of a malformed address answers 400 invalid_request."""
    bad = {}
    for account in ["e-1", "employee:E-1", "wallet:e-1", "employee:"]:
        why = mismatch(await api.debit(account, 5), 400, "invalid_request")
        if why:
            bad[account] = why
    assert bad == {}


async def test_debit_department_account(api: Api) -> None:
    """A department account can be debited from the credits it holds."""
    await api.department("eng")
    assert (await api.transfer("system:issuance", "department:eng", 50)).status_code == 201
    r = await api.debit("department:eng", 20)
    assert r.status_code == 201, r.text
    assert await api.available("department:eng") == 30
    assert await posted(api, "system:usage") == 20


# Consumption order ---------------------------------------------------------------


async def test_consumption_order(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """Debits consume lots by priority, then soonest expiry (never-expiring last), then
    effective_at, then id."""
    clock.set(T0)
    await api.employee("e-1")

    async def lot(**extra: Any) -> str:
        return str((await api.grant("e-1", 10, **extra))["lot"]["id"])

    late_prio = await lot(priority=200, expires_at=(T0 + timedelta(days=1)).isoformat())
    no_expiry_later = await lot(effective_at=(T0 + timedelta(hours=1)).isoformat())
    exp_10d = await lot(expires_at=(T0 + timedelta(days=10)).isoformat())
    tie_a = await lot(effective_at=(T0 + timedelta(hours=2)).isoformat())
    no_expiry_now = await lot()
    exp_5d = await lot(expires_at=(T0 + timedelta(days=5)).isoformat())
    tie_b = await lot(effective_at=(T0 + timedelta(hours=2)).isoformat())
    first = await lot(priority=50)
    tie_lo, tie_hi = sorted([tie_a, tie_b])
    order = [first, exp_5d, exp_10d, no_expiry_now, no_expiry_later, tie_lo, tie_hi, late_prio]

    clock.set(T0 + timedelta(hours=3))
    assert [x["id"] for x in await lots_of(client, "employee:e-1")] == order

    r = await api.debit("employee:e-1", 15)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {first: -10, exp_5d: -5}

    r = await api.debit("employee:e-1", 20)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {exp_5d: -5, exp_10d: -10, no_expiry_now: -5}
    listed = await lots_of(client, "employee:e-1")
    assert [(x["id"], x["remaining"]) for x in listed] == [
        (no_expiry_now, 5),
        (no_expiry_later, 10),
        (tie_lo, 10),
        (tie_hi, 10),
        (late_prio, 10),
    ]

    r = await api.debit("employee:e-1", 30)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {no_expiry_now: -5, no_expiry_later: -10, tie_lo: -10, tie_hi: -5}

    r = await api.debit("employee:e-1", 15)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {tie_hi: -5, late_prio: -10}
    assert await lots_of(client, "employee:e-1") == []
    assert await api.available("employee:e-1") == 0
    assert await posted(api, "system:usage") == 80


async def test_pending_lot_is_skipped_by_debits(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A lot that is not yet effective is not consumed even when it comes first in priority."""
    clock.set(T0)
    await api.employee("e-1")
    pending = (
        await api.grant("e-1", 50, priority=0, effective_at=(T0 + timedelta(days=1)).isoformat())
    )["lot"]
    live = (await api.grant("e-1", 50))["lot"]
    assert [x["id"] for x in await lots_of(client, "employee:e-1")] == [pending["id"], live["id"]]
    r = await api.debit("employee:e-1", 20)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {live["id"]: -20}
    problem(await api.debit("employee:e-1", 31), 409, "insufficient_credits")


async def test_expired_lot_is_not_consumed(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A debit at or after a lot's expires_at does not consume it; its credits go to
    system:expired."""
    clock.set(T0)
    await api.employee("e-1")
    expiring = (
        await api.grant("e-1", 50, priority=0, expires_at=(T0 + timedelta(hours=1)).isoformat())
    )["lot"]
    live = (await api.grant("e-1", 50))["lot"]
    clock.set(T0 + timedelta(hours=1))
    body = problem(await api.debit("employee:e-1", 60), 409, "insufficient_credits")
    assert body["available"] == 50
    r = await api.debit("employee:e-1", 20)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {live["id"]: -20}
    assert expiring["id"] not in {x["id"] for x in await lots_of(client, "employee:e-1")}
    assert await posted(api, "system:expired") == 50
    assert await posted(api, "employee:e-1") == 30


# Transfers ---------------------------------------------------------------------


async def test_transfer_carries_expiry_and_priority(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A transfer between wallets makes lots in the receiver that keep each source lot's expiry,
    priority and funder."""
    clock.set(T0)
    await api.employee("e-1")
    await api.employee("e-2")
    expiry = T0 + timedelta(days=5)
    soon = (await api.grant("e-1", 30, priority=10, expires_at=expiry.isoformat()))["lot"]
    forever = (await api.grant("e-1", 50))["lot"]

    clock.set(T0 + timedelta(hours=1))
    r = await api.transfer("employee:e-1", "employee:e-2", 40, memo="thanks")
    assert r.status_code == 201, r.text
    txn = r.json()
    assert txn["kind"] == "transfer" and txn["memo"] == "thanks"
    assert [(e["account"], e["amount"], e["balance_after"]) for e in txn["entries"]] == [
        ("employee:e-1", -40, 40),
        ("employee:e-2", 40, 40),
    ]

    received = await lots_of(client, "employee:e-2")
    assert [(x["remaining"], x["priority"], x["expires_at"], x["funded_by"]) for x in received] == [
        (30, 10, ts(expiry), "system:issuance"),
        (10, 100, None, "system:issuance"),
    ]
    assert all(x["grant_transaction_id"] == txn["id"] for x in received)
    assert movements(txn) == {
        soon["id"]: -30,
        forever["id"]: -10,
        received[0]["id"]: 30,
        received[1]["id"]: 10,
    }
    assert [(x["id"], x["remaining"]) for x in await lots_of(client, "employee:e-1")] == [
        (forever["id"], 40)
    ]
    assert (await api.account("employee:e-2"))["expiring"] == [
        {"amount": 30, "expires_at": ts(expiry)}
    ]

    # The carried credits still expire at the original instant.
    clock.set(expiry)
    assert await api.available("employee:e-2") == 10


async def test_transfer_to_self(api: Api) -> None:
    """A transfer from an account to itself answers 400 invalid_request."""
    await api.employee("e-1")
    await api.grant("e-1", 10)
    problem(await api.transfer("employee:e-1", "employee:e-1", 5), 400, "invalid_request")
    assert (await api.account("employee:e-1"))["version"] == 1


async def test_transfer_with_usage_or_expired(api: Api) -> None:
    """Transfers from or to system:usage or system:expired answer 400 invalid_request."""
    await api.employee("e-1")
    await api.grant("e-1", 10)
    bad = {}
    for src, dst in [
        ("system:usage", "employee:e-1"),
        ("system:expired", "employee:e-1"),
        ("employee:e-1", "system:usage"),
        ("employee:e-1", "system:expired"),
    ]:
        why = mismatch(await api.transfer(src, dst, 5), 400, "invalid_request")
        if why:
            bad[f"{src}->{dst}"] = why
    assert bad == {}
    assert await posted(api, "employee:e-1") == 10
    assert await posted(api, "system:usage") == 0


async def test_transfer_from_issuance_funds_department(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """A transfer from system:issuance to a department answers 201 and gives the department a never-
    expiring lot."""
    await api.department("eng")
    r = await api.transfer("system:issuance", "department:eng", 700)
    assert r.status_code == 201, r.text
    assert sorted((e["account"], e["amount"]) for e in r.json()["entries"]) == [
        ("department:eng", 700),
        ("system:issuance", -700),
    ]
    acct = await api.account("department:eng")
    assert (acct["posted"], acct["available"], acct["expiring"]) == (700, 700, [])
    lots = await lots_of(client, "department:eng")
    assert [(x["remaining"], x["expires_at"], x["funded_by"]) for x in lots] == [
        (700, None, "system:issuance")
    ]
    assert await posted(api, "system:issuance") == -700


async def test_transfer_more_than_available(api: Api, client: AsyncTestClient[Any]) -> None:
    """A transfer beyond the sender's available credits answers 409 insufficient_credits and changes
    nothing."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 25)
    body = problem(
        await api.transfer("employee:e-1", "employee:e-2", 26), 409, "insufficient_credits"
    )
    assert body["available"] == 25 and body["requested"] == 26
    assert await posted(api, "employee:e-1") == 25
    assert await posted(api, "employee:e-2") == 0
    assert await lots_of(client, "employee:e-2") == []


async def test_transfer_unknown_account(api: Api) -> None:
    """A transfer naming an unknown account answers 404 with the not-found code of its type."""
    await api.employee("e-1")
    await api.grant("e-1", 10)
    bad = {}
    for src, dst, code in [
        ("employee:nobody", "employee:e-1", "employee_not_found"),
        ("employee:e-1", "department:nope", "department_not_found"),
        ("system:nope", "employee:e-1", "account_not_found"),
    ]:
        why = mismatch(await api.transfer(src, dst, 5), 404, code)
        if why:
            bad[f"{src}->{dst}"] = why
    assert bad == {}
    assert await posted(api, "employee:e-1") == 10


async def test_balances_cannot_overflow(api: Api, client: Any, database_url: str) -> None:
    """An account's posted balance stays within ±2^62, so no sum of balances
    or amounts overflows a bigint: a grant that would take system:issuance
    past it answers 409 balance_limit_exceeded and changes nothing."""
    import asyncpg

    await api.employee("e-1")
    conn = await asyncpg.connect(database_url)
    try:
        # Every shard of system:issuance just inside the limit (as after a
        # very long life), its entries left as they are.
        await conn.execute(
            "UPDATE account_shards SET posted = -(2::bigint ^ 62)::bigint + 5 "
            "WHERE account_id = (SELECT id FROM accounts WHERE address = 'system:issuance')"
        )
    finally:
        await conn.close()
    r = await client.post(
        "/v1/grants", json={"employee": "e-1", "amount": 10, "reason": "spot_bonus"}, headers=key()
    )
    body = problem(r, 409, "balance_limit_exceeded")
    assert "balance limit" in body["detail"], body
    assert await api.available("employee:e-1") == 0
