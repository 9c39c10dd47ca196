"""Reservations (API.md, Reservations; DESIGN.md, Expiry): a hold earmarks
lots and lowers `available`; a capture debits the real cost in one `capture`
transaction; a release frees the hold; a reservation is a promise that outlives
the expiry of its lots but not its own `expires_at`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from service import db as service_db
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, posted, problem, ts

T = datetime(2030, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


# Helpers -----------------------------------------------------------------------


def ts6(when: datetime) -> str:
    """The service's rendering of a time: UTC with six fractional digits."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def not_active(r: Any, status: str) -> dict[str, Any]:
    """Assert 409 reservation_not_active whose `reservation_status` extra is the
    reservation's status (`status` is the HTTP status)."""
    body = problem(r, 409, "reservation_not_active")
    assert body["detail"].endswith(f" is {status}"), body
    assert body["reservation_status"] == status, f"reservation_status should be {status!r}: {body}"
    return body


async def reserve(api: Api, account: str, amount: Any, **extra: Any) -> Any:
    return await api.c.post(
        "/v1/reservations", json={"account": account, "amount": amount, **extra}, headers=key()
    )


async def reserved_ok(api: Api, account: str, amount: int, **extra: Any) -> dict[str, Any]:
    r = await reserve(api, account, amount, **extra)
    assert r.status_code == 201, r.text
    return r.json()


async def capture(api: Api, rid: str, amount: Any, **extra: Any) -> Any:
    return await api.c.post(
        f"/v1/reservations/{rid}/capture", json={"amount": amount, **extra}, headers=key()
    )


async def release(api: Api, rid: str) -> Any:
    return await api.c.post(f"/v1/reservations/{rid}/release", headers=key())


async def extend(api: Api, rid: str, ttl_seconds: Any) -> Any:
    return await api.c.post(
        f"/v1/reservations/{rid}/extend", json={"ttl_seconds": ttl_seconds}, headers=key()
    )


def plain(rsv: dict[str, Any]) -> dict[str, Any]:
    """A reservation without `available_after`, which only the create call fills in."""
    return {k: v for k, v in rsv.items() if k != "available_after"}


async def get_rsv(api: Api, rid: str) -> dict[str, Any]:
    r = await api.c.get(f"/v1/reservations/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


async def balances(api: Api, address: str) -> tuple[int, int, int]:
    """(posted, reserved, available) of an account as GET /v1/accounts shows it."""
    a = await api.account(address)
    return a["posted"], a["reserved"], a["available"]


async def lots(api: Api, address: str) -> list[tuple[str, int, int]]:
    """(id, remaining, reserved) of the live lots, in consumption order."""
    r = await api.c.get(f"/v1/accounts/{address}/lots")
    assert r.status_code == 200, r.text
    return [(lot["id"], lot["remaining"], lot["reserved"]) for lot in r.json()["items"]]


async def entries(api: Api, address: str) -> list[tuple[str, int]]:
    r = await api.c.get(f"/v1/accounts/{address}/entries")
    assert r.status_code == 200, r.text
    return [(e["kind"], e["amount"]) for e in r.json()["items"]]


async def transactions(api: Api, kind: str) -> list[dict[str, Any]]:
    r = await api.c.get("/v1/transactions", params={"kind": kind, "limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def legs(txn: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in txn["entries"]:
        out[e["account"]] = out.get(e["account"], 0) + e["amount"]
    return out


def lot_moves(txn: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in txn["lots"]:
        out[m["lot_id"]] = out.get(m["lot_id"], 0) + m["amount"]
    return out


@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the service's codecs for the sweeper and direct reads, opened and
    closed inside the test body (never through the app's pool)."""
    conn = await service_db.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def sweep(sql: asyncpg.Connection, now: datetime) -> dict[str, int]:
    result = await sql.fetchval(
        "SELECT tl_sweep_expired(100, $1)",
        {"actor": "system:sweeper", "request_id": "sweeper", "now": now.isoformat()},
    )
    return result


async def wallet(api: Api, emp: str, *grants: int | tuple[int, dict[str, Any]]) -> list[str]:
    """An employee with the given grants; returns the lot ids."""
    await api.employee(emp)
    ids = []
    for g in grants:
        amount, extra = g if isinstance(g, tuple) else (g, {})
        ids.append((await api.grant(emp, amount, **extra))["lot"]["id"])
    return ids


# Create ------------------------------------------------------------------------


async def test_reserve_holds_lots_in_consumption_order(api: Api, clock: FakeClock) -> None:
    """A reservation earmarks lots in consumption order, lowers available, raises reserved and
    writes no journal entry."""
    clock.set(T)
    soon, forever = await wallet(api, "e1", (100, {"expires_at": ts(T + timedelta(days=3))}), 50)

    body = await reserved_ok(api, "employee:e1", 120, metadata={"model": "gpt-x"})
    assert body["id"].startswith("rsv_") and len(body["id"]) == 36
    assert body["account"] == "employee:e1"
    assert body["amount"] == 120
    assert body["status"] == "active"
    assert body["captured"] is None and body["capture_transaction_id"] is None
    assert body["expires_at"] == ts6(T + timedelta(seconds=600))
    assert body["created_at"] == ts6(T)
    assert body["resolved_at"] is None
    assert body["metadata"] == {"model": "gpt-x"}
    assert body["available_after"] == 30
    assert {h["lot_id"]: h["amount"] for h in body["holds"]} == {soon: 100, forever: 20}

    assert await balances(api, "employee:e1") == (150, 120, 30)
    assert await lots(api, "employee:e1") == [(soon, 100, 100), (forever, 50, 20)]
    assert await entries(api, "employee:e1") == [("grant", 50), ("grant", 100)]
    assert plain(await get_rsv(api, body["id"])) == plain(body)


async def test_reserve_more_than_available_is_insufficient_credits(
    api: Api, clock: FakeClock
) -> None:
    """A reservation larger than available answers 409 insufficient_credits with available and
    requested, and holds nothing."""
    clock.set(T)
    await wallet(api, "e1", 100)
    await reserved_ok(api, "employee:e1", 70)
    body = problem(await reserve(api, "employee:e1", 31), 409, "insufficient_credits")
    assert (body["available"], body["requested"]) == (30, 31)
    assert await balances(api, "employee:e1") == (100, 70, 30)
    # Debits see the hold too.
    body = problem(await api.debit("employee:e1", 31), 409, "insufficient_credits")
    assert body["available"] == 30


async def test_department_account_can_be_reserved_against(api: Api, clock: FakeClock) -> None:
    """A department budget is reserved, refused and captured exactly like a wallet."""
    clock.set(T)
    await api.department("eng")
    r = await api.transfer("system:issuance", "department:eng", 200)
    assert r.status_code == 201, r.text
    ((lot_id, _, _),) = await lots(api, "department:eng")

    rsv = await reserved_ok(api, "department:eng", 150)
    assert rsv["account"] == "department:eng" and rsv["available_after"] == 50
    assert rsv["holds"] == [{"lot_id": lot_id, "amount": 150}]
    assert await balances(api, "department:eng") == (200, 150, 50)
    assert await lots(api, "department:eng") == [(lot_id, 200, 150)]
    body = problem(await reserve(api, "department:eng", 60), 409, "insufficient_credits")
    assert (body["available"], body["requested"]) == (50, 60)

    r = await capture(api, rsv["id"], 100)
    assert r.status_code == 200, r.text
    assert legs(r.json()["transaction"]) == {"department:eng": -100, "system:usage": 100}
    assert await balances(api, "department:eng") == (100, 0, 100)
    assert await lots(api, "department:eng") == [(lot_id, 100, 0)]


# Capture -----------------------------------------------------------------------


async def test_partial_capture_releases_the_rest(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Capturing less than held debits that amount in one capture transaction and gives the rest
    back to available."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60, metadata={"model": "gpt-x"})
    clock.set(T + timedelta(seconds=5))

    r = await capture(api, rsv["id"], 45)
    assert r.status_code == 200, r.text
    res, txn = r.json()["reservation"], r.json()["transaction"]
    assert res["id"] == rsv["id"]
    assert res["status"] == "captured" and res["captured"] == 45 and res["amount"] == 60
    assert res["resolved_at"] == ts6(T + timedelta(seconds=5))
    assert res["capture_transaction_id"] == txn["id"]
    assert txn["kind"] == "capture"
    assert [(e["account"], e["amount"]) for e in txn["entries"]] == [
        ("employee:e1", -45),
        ("system:usage", 45),
    ]
    assert lot_moves(txn) == {lot_id: -45}
    assert txn["details"]["reservation_id"] == rsv["id"]
    # Without capture metadata the reservation's metadata is recorded.
    assert txn["metadata"] == {"model": "gpt-x"}
    assert txn["created_at"] == ts6(T + timedelta(seconds=5))

    assert await balances(api, "employee:e1") == (55, 0, 55)
    assert await lots(api, "employee:e1") == [(lot_id, 55, 0)]
    assert await posted(api, "system:usage") == 45
    assert plain(await get_rsv(api, rsv["id"])) == plain(res)
    r = await api.c.get(f"/v1/transactions/{txn['id']}")
    assert r.status_code == 200 and legs(r.json()) == {"employee:e1": -45, "system:usage": 45}
    await assert_audit_clean(database_url)


async def test_full_capture(api: Api, clock: FakeClock, database_url: str) -> None:
    """Capturing exactly the held amount debits it all, with the capture's own metadata, and leaves
    the other credits available."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60, metadata={"model": "gpt-x"})

    r = await capture(api, rsv["id"], 60, metadata={"output_tokens": 1234})
    assert r.status_code == 200, r.text
    txn = r.json()["transaction"]
    assert r.json()["reservation"]["captured"] == 60
    assert [(e["account"], e["amount"]) for e in txn["entries"]] == [
        ("employee:e1", -60),
        ("system:usage", 60),
    ]
    assert txn["metadata"] == {"output_tokens": 1234}
    assert lot_moves(txn) == {lot_id: -60}
    assert await balances(api, "employee:e1") == (40, 0, 40)
    assert await lots(api, "employee:e1") == [(lot_id, 40, 0)]
    assert len(await transactions(api, "capture")) == 1
    await assert_audit_clean(database_url)


async def test_over_capture_debits_the_excess_from_free_credits(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Capturing more than held takes the hold plus the excess from available credits, all in one
    capture transaction of the whole amount."""
    clock.set(T)
    first, second = await wallet(api, "e1", (60, {"priority": 50}), 100)
    rsv = await reserved_ok(api, "employee:e1", 60)
    assert rsv["holds"] == [{"lot_id": first, "amount": 60}]

    r = await capture(api, rsv["id"], 80)
    assert r.status_code == 200, r.text
    txn = r.json()["transaction"]
    assert r.json()["reservation"]["status"] == "captured"
    assert r.json()["reservation"]["captured"] == 80
    assert [(e["account"], e["amount"]) for e in txn["entries"]] == [
        ("employee:e1", -80),
        ("system:usage", 80),
    ]
    assert lot_moves(txn) == {first: -60, second: -20}
    assert await balances(api, "employee:e1") == (80, 0, 80)
    assert await lots(api, "employee:e1") == [(second, 80, 0)]
    assert await posted(api, "system:usage") == 80
    assert len(await transactions(api, "capture")) == 1
    await assert_audit_clean(database_url)


async def test_over_capture_without_funds_changes_nothing(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """An over-capture whose excess the free credits cannot cover answers 409 insufficient_credits,
    changes nothing, and a covered capture still works."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60)
    assert (await api.debit("employee:e1", 30)).status_code == 201
    before = await api.account("employee:e1")
    assert (before["posted"], before["reserved"], before["available"]) == (70, 60, 10)
    lots_before = await lots(api, "employee:e1")
    assert lots_before == [(lot_id, 70, 60)]

    body = problem(await capture(api, rsv["id"], 81), 409, "insufficient_credits")
    # Whether the extras speak of the excess or of the whole capture, they are 11 short.
    assert body["requested"] - body["available"] == 81 - 60 - 10, body
    assert body["requested"] in (21, 81), body

    assert (await get_rsv(api, rsv["id"]))["status"] == "active"
    assert await api.account("employee:e1") == before
    assert await lots(api, "employee:e1") == lots_before
    assert await transactions(api, "capture") == []
    assert await posted(api, "system:usage") == 30

    r = await capture(api, rsv["id"], 70)
    assert r.status_code == 200, r.text
    assert legs(r.json()["transaction"]) == {"employee:e1": -70, "system:usage": 70}
    assert await balances(api, "employee:e1") == (0, 0, 0)
    assert await lots(api, "employee:e1") == []
    assert await posted(api, "system:usage") == 100
    await assert_audit_clean(database_url)


async def test_capture_and_release_need_an_idempotency_key_and_a_valid_amount(
    api: Api, clock: FakeClock
) -> None:
    """Capture without an Idempotency-Key or with a zero, negative or non-integer amount answers 400
    and leaves the reservation active."""
    clock.set(T)
    await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60)
    url = f"/v1/reservations/{rsv['id']}"
    problem(
        await api.c.post(f"{url}/capture", json={"amount": 10}), 400, "idempotency_key_required"
    )
    problem(await api.c.post(f"{url}/release"), 400, "idempotency_key_required")
    problem(
        await api.c.post(f"{url}/extend", json={"ttl_seconds": 10}), 400, "idempotency_key_required"
    )
    for amount in (0, -5, "5", 1.5, 2**53 + 1):
        problem(await capture(api, rsv["id"], amount), 400, "invalid_request")
    problem(await capture(api, rsv["id"], 10, typo=1), 400, "invalid_request")
    r = await api.c.post(f"{url}/release", json={"memo": "x"}, headers=key())
    problem(r, 400, "invalid_request")
    for ttl in (0, 86_401):
        problem(await extend(api, rsv["id"], ttl), 400, "invalid_request")
    assert (await get_rsv(api, rsv["id"]))["status"] == "active"
    assert await balances(api, "employee:e1") == (100, 60, 40)


# Release -----------------------------------------------------------------------


async def test_release_frees_the_hold(api: Api, clock: FakeClock, database_url: str) -> None:
    """Releasing gives the whole hold back to available without any journal entry, and the
    reservation cannot be captured afterwards."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60)
    clock.set(T + timedelta(seconds=7))

    r = await release(api, rsv["id"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == rsv["id"] and body["status"] == "released"
    assert body["captured"] is None and body["resolved_at"] == ts6(T + timedelta(seconds=7))
    assert await balances(api, "employee:e1") == (100, 0, 100)
    assert await lots(api, "employee:e1") == [(lot_id, 100, 0)]
    assert await entries(api, "employee:e1") == [("grant", 100)]
    assert plain(await get_rsv(api, rsv["id"])) == plain(body)

    await assert_audit_clean(database_url)
    not_active(await capture(api, rsv["id"], 10), "released")
    not_active(await release(api, rsv["id"]), "released")
    not_active(await extend(api, rsv["id"], 60), "released")


async def test_release_with_an_empty_json_body(api: Api, clock: FakeClock) -> None:
    """Release accepts an empty JSON object as well as no body."""
    clock.set(T)
    await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 60)
    r = await api.c.post(f"/v1/reservations/{rsv['id']}/release", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "released"
    assert await balances(api, "employee:e1") == (100, 0, 100)


# Expiry of the lots a reservation holds -----------------------------------------


async def _reserved_across_lot_expiry(api: Api, clock: FakeClock) -> tuple[str, str, str]:
    """e1 has 100 credits expiring at T and 50 that never expire; 60 of the expiring ones are
    reserved at T-1h for a day."""
    clock.set(T - timedelta(days=1))
    expiring, forever = await wallet(api, "e1", (100, {"expires_at": ts(T)}), 50)
    clock.set(T - timedelta(hours=1))
    rsv = await reserved_ok(api, "employee:e1", 60, ttl_seconds=86_400)
    assert rsv["holds"] == [{"lot_id": expiring, "amount": 60}]
    assert await balances(api, "employee:e1") == (150, 60, 90)
    return rsv["id"], expiring, forever


async def test_capture_after_the_held_lot_expired(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Credits a reservation holds stay capturable after their lot expires; the unheld rest of the
    lot expires at T and what the capture leaves expires at once."""
    rid, expiring, forever = await _reserved_across_lot_expiry(api, clock)

    clock.set(T + timedelta(minutes=1))
    # The 40 unheld credits are gone; the 60 held are still posted and reserved.
    assert await balances(api, "employee:e1") == (110, 60, 50)
    assert await lots(api, "employee:e1") == [(forever, 50, 0)]
    assert (await get_rsv(api, rid))["status"] == "active"

    r = await capture(api, rid, 45)
    assert r.status_code == 200, r.text
    txn = r.json()["transaction"]
    assert r.json()["reservation"]["status"] == "captured"
    assert legs(txn) == {"employee:e1": -45, "system:usage": 45}
    assert lot_moves(txn) == {expiring: -45}

    assert await balances(api, "employee:e1") == (50, 0, 50)
    assert await lots(api, "employee:e1") == [(forever, 50, 0)]
    assert await posted(api, "system:usage") == 45
    assert await posted(api, "system:expired") == 55
    got = await entries(api, "employee:e1")
    assert sorted(got[:3]) == sorted([("capture", -45), ("expiry", -40), ("expiry", -15)])
    assert got[3:] == [("grant", 50), ("grant", 100)]
    await assert_audit_clean(database_url)


async def test_full_capture_after_the_held_lot_expired(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A full capture after the held lot's expiry takes all 60 held credits from that lot."""
    rid, expiring, forever = await _reserved_across_lot_expiry(api, clock)
    clock.set(T)
    r = await capture(api, rid, 60)
    assert r.status_code == 200, r.text
    assert lot_moves(r.json()["transaction"]) == {expiring: -60}
    assert await balances(api, "employee:e1") == (50, 0, 50)
    assert await lots(api, "employee:e1") == [(forever, 50, 0)]
    assert await posted(api, "system:expired") == 40
    await assert_audit_clean(database_url)


async def test_release_after_the_held_lot_expired_expires_the_credits_at_once(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Releasing a reservation after its lot expired expires the released credits in the same
    operation."""
    rid, expiring, forever = await _reserved_across_lot_expiry(api, clock)

    clock.set(T + timedelta(minutes=1))
    assert await balances(api, "employee:e1") == (110, 60, 50)
    r = await release(api, rid)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "released"

    assert await balances(api, "employee:e1") == (50, 0, 50)
    assert await lots(api, "employee:e1") == [(forever, 50, 0)]
    assert await posted(api, "system:expired") == 100
    got = await entries(api, "employee:e1")
    assert sorted(got[:2]) == [("expiry", -60), ("expiry", -40)]
    assert got[2:] == [("grant", 50), ("grant", 100)]
    expiries = await transactions(api, "expiry")
    assert sum(legs(t).get("system:expired", 0) for t in expiries) == 100
    assert all(set(legs(t)) == {"employee:e1", "system:expired"} for t in expiries)
    assert sum(lot_moves(t).get(expiring, 0) for t in expiries) == -100
    assert all(t["created_at"] == ts6(T + timedelta(minutes=1)) for t in expiries)
    await assert_audit_clean(database_url)


# The reservation's own expiry ---------------------------------------------------


async def _reserved_for_a_minute(api: Api, clock: FakeClock) -> tuple[str, str, datetime]:
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rsv = await reserved_ok(api, "employee:e1", 40, ttl_seconds=60)
    expires = T + timedelta(seconds=60)
    assert rsv["expires_at"] == ts6(expires)
    return rsv["id"], lot_id, expires


async def test_reservation_is_active_until_the_last_microsecond(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """At expires_at - 1µs a reservation still reads active, still holds its credits and can be
    captured."""
    rid, lot_id, expires = await _reserved_for_a_minute(api, clock)
    clock.set(expires - US)
    got = await get_rsv(api, rid)
    assert got["status"] == "active" and got["resolved_at"] is None
    assert await balances(api, "employee:e1") == (100, 40, 60)
    assert await lots(api, "employee:e1") == [(lot_id, 100, 40)]
    r = await capture(api, rid, 40)
    assert r.status_code == 200, r.text
    assert r.json()["reservation"]["status"] == "captured"
    assert await balances(api, "employee:e1") == (60, 0, 60)
    await assert_audit_clean(database_url)


async def test_release_and_extend_at_the_last_microsecond(api: Api, clock: FakeClock) -> None:
    """At expires_at - 1µs release and extend still work (on two reservations)."""
    rid, _, expires = await _reserved_for_a_minute(api, clock)
    other = (await reserved_ok(api, "employee:e1", 10, ttl_seconds=60))["id"]
    clock.set(expires - US)
    r = await extend(api, rid, 60)
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] == ts6(expires - US + timedelta(seconds=60))
    r = await release(api, other)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "released"
    assert await balances(api, "employee:e1") == (100, 40, 60)


@pytest.mark.parametrize("sweeper_ran", [False, True], ids=["no_sweep", "swept"])
async def test_reservation_expires_at_its_exact_instant(
    api: Api, clock: FakeClock, database_url: str, sweeper_ran: bool
) -> None:
    """At expires_at a reservation reads expired, its credits are available again and capture,
    release and extend answer reservation_not_active "expired", swept or not."""
    rid, _, expires = await _reserved_for_a_minute(api, clock)
    clock.set(expires)
    async with connect(database_url) as sql:
        if sweeper_ran:
            assert await sweep(sql, expires) == {"accounts": 1, "credits": 0}
            row = await sql.fetchrow("SELECT status, resolved_at FROM reservations")
            assert row is not None
            assert (row["status"], row["resolved_at"]) == ("expired", expires)
            assert await sweep(sql, expires) == {"accounts": 0, "credits": 0}
            assert await sweep(sql, expires + timedelta(hours=1)) == {"accounts": 0, "credits": 0}

        got = await get_rsv(api, rid)
        assert got["status"] == "expired"
        assert got["resolved_at"] == ts6(expires)
        assert got["captured"] is None
        assert await balances(api, "employee:e1") == (100, 0, 100)
        r = await api.c.get("/v1/accounts/employee:e1/reservations", params={"status": "expired"})
        assert [x["id"] for x in r.json()["items"]] == [rid]
        r = await api.c.get("/v1/accounts/employee:e1/reservations", params={"status": "active"})
        assert r.json()["items"] == []

        # The freed credits are really spendable, and a later sweep finds nothing to do.
        again = await reserved_ok(api, "employee:e1", 100)
        assert again["available_after"] == 0
        assert await sweep(sql, expires + timedelta(seconds=1)) == {"accounts": 0, "credits": 0}
        row = await sql.fetchrow("SELECT status, resolved_at FROM reservations WHERE amount = 40")
        assert row is not None
        assert (row["status"], row["resolved_at"]) == ("expired", expires)
    assert await entries(api, "employee:e1") == [("grant", 100)]
    await assert_audit_clean(database_url)

    codes = [
        problem(await capture(api, rid, 40), 409, "reservation_not_active"),
        problem(await release(api, rid), 409, "reservation_not_active"),
        problem(await extend(api, rid, 600), 409, "reservation_not_active"),
    ]
    assert all("expired" in body["detail"] for body in codes), codes
    assert (await get_rsv(api, rid))["status"] == "expired"
    assert await balances(api, "employee:e1") == (100, 100, 0)
    assert await transactions(api, "capture") == []
    # The `status` extra, checked last so that it cannot hide the checks above.
    not_active(await capture(api, rid, 40), "expired")
    not_active(await release(api, rid), "expired")
    not_active(await extend(api, rid, 600), "expired")


@pytest.mark.parametrize("sweeper_ran", [False, True], ids=["no_sweep", "swept"])
async def test_expired_reservation_no_longer_earmarks_its_lots(
    api: Api, clock: FakeClock, database_url: str, sweeper_ran: bool
) -> None:
    """From expires_at the lots view shows the expired reservation's earmark gone, as the balance
    view does, swept or not."""
    rid, lot_id, expires = await _reserved_for_a_minute(api, clock)
    clock.set(expires - US)
    assert await lots(api, "employee:e1") == [(lot_id, 100, 40)]
    clock.set(expires)
    if sweeper_ran:
        async with connect(database_url) as sql:
            assert await sweep(sql, expires) == {"accounts": 1, "credits": 0}
    assert await balances(api, "employee:e1") == (100, 0, 100)
    assert await lots(api, "employee:e1") == [(lot_id, 100, 0)]
    # The first write brings the rows up to date; the views agree with it.
    assert (await api.debit("employee:e1", 100)).status_code == 201
    assert await lots(api, "employee:e1") == []
    assert (await get_rsv(api, rid))["status"] == "expired"


# Extend ------------------------------------------------------------------------


async def test_extend_moves_expires_at(api: Api, clock: FakeClock, database_url: str) -> None:
    """Extend sets expires_at to now + ttl_seconds, so the reservation is still capturable after its
    old expiry."""
    rid, _, expires = await _reserved_for_a_minute(api, clock)
    clock.set(T + timedelta(seconds=30))
    r = await extend(api, rid, 120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "active" and body["amount"] == 40
    assert body["expires_at"] == ts6(T + timedelta(seconds=150))
    assert (await get_rsv(api, rid))["expires_at"] == ts6(T + timedelta(seconds=150))

    clock.set(expires + timedelta(seconds=30))
    assert (await get_rsv(api, rid))["status"] == "active"
    assert await balances(api, "employee:e1") == (100, 40, 60)
    r = await capture(api, rid, 25)
    assert r.status_code == 200, r.text
    assert r.json()["reservation"]["status"] == "captured"
    assert await balances(api, "employee:e1") == (75, 0, 75)
    await assert_audit_clean(database_url)


async def test_extend_of_a_resolved_reservation_is_not_active(api: Api, clock: FakeClock) -> None:
    """Extending a captured or released reservation answers 409 reservation_not_active with its
    status."""
    clock.set(T)
    await wallet(api, "e1", 100)
    captured = (await reserved_ok(api, "employee:e1", 10))["id"]
    released = (await reserved_ok(api, "employee:e1", 10))["id"]
    assert (await capture(api, captured, 10)).status_code == 200
    assert (await release(api, released)).status_code == 200
    problem(await extend(api, captured, 60), 409, "reservation_not_active")
    problem(await extend(api, released, 60), 409, "reservation_not_active")
    assert (await get_rsv(api, captured))["expires_at"] == ts6(T + timedelta(seconds=600))
    assert (await get_rsv(api, released))["expires_at"] == ts6(T + timedelta(seconds=600))
    assert await balances(api, "employee:e1") == (90, 0, 90)
    not_active(await extend(api, captured, 60), "captured")
    not_active(await extend(api, released, 60), "released")
    not_active(await capture(api, captured, 5), "captured")
    not_active(await release(api, captured), "captured")


# Idempotency -------------------------------------------------------------------


async def test_create_replay_returns_the_stored_response(api: Api, clock: FakeClock) -> None:
    """A create replayed with the same key and body answers the stored 201 with Idempotent-Replayed
    and holds nothing more; another body under the key is 422."""
    clock.set(T)
    await wallet(api, "e1", 100)
    headers = key()
    body = {"account": "employee:e1", "amount": 30, "ttl_seconds": 60}
    first = await api.c.post("/v1/reservations", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.headers.get("Idempotent-Replayed") is None
    assert (await capture(api, first.json()["id"], 10)).status_code == 200

    clock.set(T + timedelta(seconds=5))
    again = await api.c.post("/v1/reservations", json=body, headers=headers)
    assert again.status_code == 201, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()  # the stored body: still "active"
    assert await balances(api, "employee:e1") == (90, 0, 90)
    r = await api.c.get("/v1/accounts/employee:e1/reservations")
    assert [x["id"] for x in r.json()["items"]] == [first.json()["id"]]

    r = await api.c.post("/v1/reservations", json={**body, "amount": 31}, headers=headers)
    problem(r, 422, "idempotency_key_reused")
    assert await balances(api, "employee:e1") == (90, 0, 90)


async def test_rejected_create_replays_its_409(api: Api, clock: FakeClock) -> None:
    """A create rejected for insufficient credits replays the same 409 under its key even after
    credits arrive."""
    clock.set(T)
    await wallet(api, "e1", 10)
    headers = key()
    body = {"account": "employee:e1", "amount": 30}
    first = await api.c.post("/v1/reservations", json=body, headers=headers)
    problem(first, 409, "insufficient_credits")
    await api.grant("e1", 100)
    again = await api.c.post("/v1/reservations", json=body, headers=headers)
    assert problem(again, 409, "insufficient_credits") == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await balances(api, "employee:e1") == (110, 0, 110)


async def test_capture_replay_returns_the_stored_response(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A capture replayed with the same key answers the stored 200 and debits once, even after a
    different capture of the same reservation was refused."""
    clock.set(T)
    await wallet(api, "e1", 100)
    rid = (await reserved_ok(api, "employee:e1", 60))["id"]
    url = f"/v1/reservations/{rid}/capture"
    k1, k2 = key(), key()
    first = await api.c.post(url, json={"amount": 30}, headers=k1)
    assert first.status_code == 200, first.text

    again = await api.c.post(url, json={"amount": 30}, headers=k1)
    assert again.status_code == 200, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()

    other = await api.c.post(url, json={"amount": 30}, headers=k2)
    refused = problem(other, 409, "reservation_not_active")
    assert other.headers.get("Idempotent-Replayed") is None

    replay = await api.c.post(url, json={"amount": 30}, headers=k1)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert replay.headers.get("Idempotent-Replayed") == "true"
    replay2 = await api.c.post(url, json={"amount": 30}, headers=k2)
    assert problem(replay2, 409, "reservation_not_active") == refused
    assert replay2.headers.get("Idempotent-Replayed") == "true"
    problem(await api.c.post(url, json={"amount": 31}, headers=k1), 422, "idempotency_key_reused")

    assert await balances(api, "employee:e1") == (70, 0, 70)
    assert len(await transactions(api, "capture")) == 1
    assert await posted(api, "system:usage") == 30
    await assert_audit_clean(database_url)
    not_active(other, "captured")


async def test_release_replay_returns_the_stored_response(api: Api, clock: FakeClock) -> None:
    """A release replayed with the same key answers the stored 200 with Idempotent-Replayed and
    changes nothing."""
    clock.set(T)
    await wallet(api, "e1", 100)
    rid = (await reserved_ok(api, "employee:e1", 60))["id"]
    url = f"/v1/reservations/{rid}/release"
    headers = key()
    first = await api.c.post(url, headers=headers)
    assert first.status_code == 200, first.text
    refused = await capture(api, rid, 10)
    problem(refused, 409, "reservation_not_active")

    again = await api.c.post(url, headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert await balances(api, "employee:e1") == (100, 0, 100)
    not_active(refused, "released")
    not_active(await release(api, rid), "released")


# Offboarding -------------------------------------------------------------------


async def test_offboarding_releases_active_reservations_then_voids(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Offboarding an employee releases their active reservation first, then voids all their credits
    back to issuance."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rid = (await reserved_ok(api, "employee:e1", 40))["id"]
    captured = (await reserved_ok(api, "employee:e1", 10))["id"]
    assert (await capture(api, captured, 10)).status_code == 200
    clock.set(T + timedelta(seconds=3))

    r = await api.c.post("/v1/employees/e1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "offboarded"

    got = await get_rsv(api, rid)
    assert got["status"] == "released" and got["resolved_at"] == ts6(T + timedelta(seconds=3))
    assert (await get_rsv(api, captured))["status"] == "captured"
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["reserved"], acct["available"], acct["status"]) == (
        0,
        0,
        0,
        "closed",
    )
    assert await lots(api, "employee:e1") == []
    void = await api.c.get(f"/v1/transactions/{body['void_transaction_id']}")
    assert void.status_code == 200, void.text
    assert legs(void.json()) == {"employee:e1": -90, "system:issuance": 90}
    assert lot_moves(void.json()) == {lot_id: -90}
    assert await posted(api, "system:issuance") == -10

    problem(await reserve(api, "employee:e1", 1), 409, "account_closed")
    await assert_audit_clean(database_url)
    not_active(await capture(api, rid, 10), "released")


async def test_offboarding_expires_held_credits_of_an_expired_lot(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Offboarding after a held lot expired releases the reservation, expires the released
    credits at once and voids only the live rest back to issuance."""
    rid, _, _ = await _reserved_across_lot_expiry(api, clock)
    clock.set(T + timedelta(minutes=1))
    r = await api.c.post("/v1/employees/e1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert (await get_rsv(api, rid))["status"] == "released"
    assert await balances(api, "employee:e1") == (0, 0, 0)
    # All 100 credits of the expired lot expired; only the 50 live ones went back.
    assert await posted(api, "system:expired") == 100
    assert await posted(api, "system:issuance") == -100
    await assert_audit_clean(database_url)


async def test_offboarding_with_a_held_expired_department_lot(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Offboarding after a held, department-funded lot expired answers 200, expires the
    released credits and gives the department nothing of them back."""
    clock.set(T - timedelta(days=1))
    await api.department("eng")
    assert (await api.transfer("system:issuance", "department:eng", 200)).status_code == 201
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(T), funded_by="department:eng")
    clock.set(T - timedelta(hours=1))
    rid = (await reserved_ok(api, "employee:e1", 60, ttl_seconds=86_400))["id"]

    clock.set(T + timedelta(minutes=1))
    r = await api.c.post("/v1/employees/e1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert (await get_rsv(api, rid))["status"] == "released"
    assert await balances(api, "employee:e1") == (0, 0, 0)
    assert await posted(api, "system:expired") == 100
    assert await balances(api, "department:eng") == (100, 0, 100)
    await assert_audit_clean(database_url)


async def test_voiding_a_held_lot_keeps_the_hold_capturable(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Voiding a lot returns only its unreserved credits; the reservation on it can still be
    captured, and what the capture leaves follows the lot back to its funder."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rid = (await reserved_ok(api, "employee:e1", 60))["id"]
    r = await api.c.post(f"/v1/lots/{lot_id}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert legs(r.json()) == {"employee:e1": -40, "system:issuance": 40}
    assert await balances(api, "employee:e1") == (60, 60, 0)

    r = await capture(api, rid, 45)
    assert r.status_code == 200, r.text
    assert lot_moves(r.json()["transaction"]) == {lot_id: -45}
    assert await balances(api, "employee:e1") == (0, 0, 0)
    assert await posted(api, "system:usage") == 45
    assert await posted(api, "system:issuance") == -45
    await assert_audit_clean(database_url)


async def test_releasing_a_hold_on_a_voided_lot_returns_it_to_the_funder(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Releasing a reservation whose lot was voided meanwhile sends the freed credits back to
    the lot's funder in a void transaction."""
    clock.set(T)
    (lot_id,) = await wallet(api, "e1", 100)
    rid = (await reserved_ok(api, "employee:e1", 60))["id"]
    r = await api.c.post(f"/v1/lots/{lot_id}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    r = await release(api, rid)
    assert r.status_code == 200, r.text
    assert await balances(api, "employee:e1") == (0, 0, 0)
    assert await posted(api, "system:issuance") == 0
    voids = await transactions(api, "void")
    assert sorted(legs(t)["employee:e1"] for t in voids) == [-60, -40]
    await assert_audit_clean(database_url)


@pytest.mark.parametrize("resolve", ["release", "capture", "expiry"])
async def test_resolving_a_hold_on_a_voided_department_lot_after_it_expired(
    api: Api, clock: FakeClock, database_url: str, resolve: str
) -> None:
    """A hold on a department-funded lot that was voided and then expired can still be released
    or captured after the expiry, or expire itself before the next write to the wallet; what it
    frees gives the department no live credits."""
    clock.set(T - timedelta(days=1))
    await api.department("eng")
    assert (await api.transfer("system:issuance", "department:eng", 200)).status_code == 201
    await api.employee("e1")
    lot_id = (await api.grant("e1", 100, expires_at=ts(T), funded_by="department:eng"))["lot"]["id"]
    clock.set(T - timedelta(hours=1))
    rid = (await reserved_ok(api, "employee:e1", 60, ttl_seconds=86_400))["id"]
    r = await api.c.post(f"/v1/lots/{lot_id}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert await balances(api, "department:eng") == (140, 0, 140)

    if resolve == "expiry":
        clock.set(T + timedelta(days=1))
        # The next write to the wallet finds the reservation expired and frees its hold.
        r = await api.c.post(
            "/v1/grants",
            json={"employee": "e1", "amount": 5, "reason": "spot_bonus"},
            headers=key(),
        )
        assert r.status_code == 201, r.text
        assert (await get_rsv(api, rid))["status"] == "expired"
        assert await balances(api, "employee:e1") == (5, 0, 5)
        assert (await api.account("department:eng"))["available"] == 100
        await assert_audit_clean(database_url)
        return
    clock.set(T + timedelta(minutes=1))
    r = await (release(api, rid) if resolve == "release" else capture(api, rid, 45))
    assert r.status_code == 200, r.text
    assert await balances(api, "employee:e1") == (0, 0, 0)
    # The 40 voided back before T expired in the department at T; nothing freed later is live.
    assert (await api.account("department:eng"))["available"] == 100
    await assert_audit_clean(database_url)


# Reading -----------------------------------------------------------------------


UNKNOWN_IDS = [
    "rsv_" + uuid.uuid4().hex,
    "rsv_" + "0" * 32,
    "rsv_" + "f" * 32,
    "rsv_xyz",
    "rsv_",
    "nope",
    "txn_" + uuid.uuid4().hex,
    uuid.uuid4().hex,
]


async def test_unknown_reservation_is_not_found(api: Api, client: Any) -> None:
    """GET, capture, release and extend of an unknown or malformed reservation id answer 404
    reservation_not_found."""
    for rid in UNKNOWN_IDS:
        problem(await client.get(f"/v1/reservations/{rid}"), 404, "reservation_not_found")
        problem(await capture(api, rid, 10), 404, "reservation_not_found")
        problem(await release(api, rid), 404, "reservation_not_found")
        problem(await extend(api, rid, 60), 404, "reservation_not_found")


async def test_list_by_status_and_cursor(api: Api, clock: FakeClock) -> None:
    """An account's reservations list newest first, filter by status (expired included without a
    sweep) and page by cursor."""
    clock.set(T)
    await wallet(api, "e1", 1000)
    await wallet(api, "e2", 1000)
    ids = [(await reserved_ok(api, "employee:e1", 10 + i))["id"] for i in range(6)]
    short = (await reserved_ok(api, "employee:e1", 5, ttl_seconds=1))["id"]
    ids.append(short)
    await reserved_ok(api, "employee:e2", 10)  # another account's: never listed
    assert (await capture(api, ids[0], 10)).status_code == 200
    assert (await release(api, ids[1])).status_code == 200
    clock.set(T + timedelta(seconds=1))
    newest_first = sorted(ids, reverse=True)

    url = "/v1/accounts/employee:e1/reservations"
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        r = await api.c.get(url, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 3
        seen += [x["id"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first

    async def by_status(status: str) -> list[str]:
        r = await api.c.get(url, params={"status": status})
        assert r.status_code == 200, r.text
        assert all(x["status"] == status for x in r.json()["items"])
        return [x["id"] for x in r.json()["items"]]

    assert await by_status("captured") == [ids[0]]
    assert await by_status("released") == [ids[1]]
    assert await by_status("expired") == [short]
    assert await by_status("active") == sorted(ids[2:6], reverse=True)

    r = await api.c.get(url, params={"status": "active", "limit": 2})
    first = r.json()
    assert [x["id"] for x in first["items"]] == sorted(ids[2:6], reverse=True)[:2]
    r = await api.c.get(
        url, params={"status": "active", "limit": 2, "cursor": first["next_cursor"]}
    )
    assert [x["id"] for x in r.json()["items"]] == sorted(ids[2:6], reverse=True)[2:]
    assert r.json()["next_cursor"] is None

    problem(await api.c.get(url, params={"status": "bogus"}), 400, "invalid_request")
    problem(await api.c.get(url, params={"cursor": "%%%"}), 400, "invalid_request")
    problem(await api.c.get(url, params={"limit": 0}), 400, "invalid_request")
    r = await api.c.get("/v1/accounts/employee:nobody/reservations")
    problem(r, 404, "employee_not_found")


# Validation --------------------------------------------------------------------


INVALID_RESERVE_BODIES = {
    "amount 0": {"amount": 0},
    "amount negative": {"amount": -1},
    "amount string": {"amount": "5"},
    "amount fraction": {"amount": 1.5},
    "amount 2^53+1": {"amount": 2**53 + 1},
    "amount null": {"amount": None},
    "amount missing": {},
    "ttl 0": {"amount": 5, "ttl_seconds": 0},
    "ttl 86401": {"amount": 5, "ttl_seconds": 86_401},
    "ttl string": {"amount": 5, "ttl_seconds": "60"},
    "unknown field": {"amount": 5, "amount_typo": 1},
    "bare ref": {"amount": 5, "account": "e1"},
    "bad address": {"amount": 5, "account": "employee:E1"},
    "metadata not an object": {"amount": 5, "metadata": "x"},
}


async def test_invalid_reserve_is_400(api: Api, clock: FakeClock) -> None:
    """A malformed reservation request (bad amount, ttl_seconds, account or an unknown field)
    answers 400 invalid_request and holds nothing."""
    clock.set(T)
    await wallet(api, "e1", 100)
    for name, body in INVALID_RESERVE_BODIES.items():
        r = await api.c.post(
            "/v1/reservations", json={"account": "employee:e1", **body}, headers=key()
        )
        assert r.status_code == 400, (name, r.text)
        assert r.json()["code"] == "invalid_request", (name, r.text)
    assert await balances(api, "employee:e1") == (100, 0, 100)
    r = await api.c.get("/v1/accounts/employee:e1/reservations")
    assert r.json()["items"] == []


async def test_reserve_limits_are_inclusive(api: Api, clock: FakeClock) -> None:
    """ttl_seconds 1 and 86400 are accepted, and an amount of 2^53 is a valid amount (refused only
    for want of credits)."""
    clock.set(T)
    await wallet(api, "e1", 100)
    r1 = await reserved_ok(api, "employee:e1", 1, ttl_seconds=1)
    assert r1["expires_at"] == ts6(T + timedelta(seconds=1))
    r2 = await reserved_ok(api, "employee:e1", 1, ttl_seconds=86_400)
    assert r2["expires_at"] == ts6(T + timedelta(days=1))
    body = problem(await reserve(api, "employee:e1", 2**53), 409, "insufficient_credits")
    assert (body["available"], body["requested"]) == (98, 2**53)


async def test_reserve_on_missing_system_or_closed_accounts(api: Api, clock: FakeClock) -> None:
    """Reserving on an unknown employee or department is 404, on a system account 400, on a closed
    wallet 409 account_closed, and without a key 400."""
    clock.set(T)
    await wallet(api, "e1", 100)
    problem(await reserve(api, "employee:nobody", 5), 404, "employee_not_found")
    problem(await reserve(api, "department:nowhere", 5), 404, "department_not_found")
    for system in ("system:usage", "system:issuance", "system:expired"):
        problem(await reserve(api, system, 5), 400, "invalid_request")
    r = await api.c.post("/v1/reservations", json={"account": "employee:e1", "amount": 5})
    problem(r, 400, "idempotency_key_required")

    await wallet(api, "gone", 50)
    r = await api.c.post("/v1/employees/gone/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    problem(await reserve(api, "employee:gone", 5), 409, "account_closed")
    assert await balances(api, "employee:e1") == (100, 0, 100)


async def test_extending_never_takes_a_reservation_past_its_lifetime(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Extensions stop at created_at + TOKENLEDGER_RESERVATION_MAX_LIFETIME (24 h):
    a reservation cannot keep expired credits capturable for ever."""
    rid, _, _ = await _reserved_for_a_minute(api, clock)
    cap = T + timedelta(hours=24)
    for at, ttl in (
        (timedelta(seconds=30), 3600),
        (timedelta(minutes=30), 86400),
        (timedelta(hours=23), 3600),
        (timedelta(hours=23, minutes=59), 60),
    ):
        clock.set(T + at)
        r = await extend(api, rid, ttl)
        assert r.status_code == 200, r.text
        assert r.json()["expires_at"] == ts6(min(T + at + timedelta(seconds=ttl), cap)), at
    clock.set(cap)
    not_active(await extend(api, rid, 3600), "expired")
    await assert_audit_clean(database_url)
