"""Accounts, entries, balances over time, lots and expiry (API.md, Accounts and balances)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from service.api.resources import Account, Entry, Lot
from tests.api.conftest import Api, FakeClock, mismatch, problem, ts

T0 = datetime(2030, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


async def get_ok(client: AsyncTestClient[Any], url: str, **params: Any) -> Any:
    r = await client.get(url, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def history(api: Api, clock: FakeClock) -> None:
    """e-1: +100 at T0, -30 at T0+1h, -20 at T0+2h, +5 at T0+26h (one entry each)."""
    clock.set(T0)
    await api.employee("e-1")
    await api.grant("e-1", 100)
    clock.set(T0 + timedelta(hours=1))
    assert (await api.debit("employee:e-1", 30)).status_code == 201
    clock.set(T0 + timedelta(hours=2))
    assert (await api.debit("employee:e-1", 20)).status_code == 201
    clock.set(T0 + timedelta(hours=26))
    await api.grant("e-1", 5)


# The account view ------------------------------------------------------------------


async def test_account_shape(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """GET of an account returns every field of the Account resource with the current balances."""
    clock.set(T0)
    await api.employee("e-1")
    await api.grant("e-1", 100, expires_at="2030-02-01T00:00:00Z")
    await api.grant("e-1", 40, effective_at="2030-01-02T00:00:00Z")
    clock.set(T0 + timedelta(minutes=5))
    assert (await api.debit("employee:e-1", 10)).status_code == 201

    body = await get_ok(client, "/v1/accounts/employee:e-1")
    assert set(body) == set(Account.__struct_fields__)
    msgspec.convert(body, Account)  # every field has the documented type
    assert body == {
        "address": "employee:e-1",
        "type": "employee",
        "asset": "CREDIT",
        "posted": 130,
        "reserved": 0,
        "pending": 40,
        "available": 90,
        "overdraft_limit": 0,
        "status": "open",
        "version": 3,
        "expiring": [{"amount": 90, "expires_at": "2030-02-01T00:00:00.000000Z"}],
        "updated_at": ts(T0 + timedelta(minutes=5)),
    }

    system = await get_ok(client, "/v1/accounts/system:issuance")
    assert set(system) == set(Account.__struct_fields__)
    msgspec.convert(system, Account)
    assert system["type"] == "system" and system["posted"] == -140
    assert system["available"] is None and system["overdraft_limit"] is None
    assert system["expiring"] == []

    dept = await get_ok(client, "/v1/accounts/department:eng")
    assert (dept["type"], dept["posted"], dept["available"], dept["status"]) == (
        "department",
        0,
        0,
        "open",
    )


async def test_account_not_found_and_bad_address(client: AsyncTestClient[Any]) -> None:
    """An unknown account answers 404 with its type's code; a malformed address answers 400
    invalid_request."""
    cases = {
        "employee:nobody": (404, "employee_not_found"),
        "department:nope": (404, "department_not_found"),
        "system:nope": (404, "account_not_found"),
        "bogus": (400, "invalid_request"),
        "employee:Ada": (400, "invalid_request"),
        "wallet:e-1": (400, "invalid_request"),
        "employee:": (400, "invalid_request"),
    }
    bad = {}
    for address, (status, code) in cases.items():
        for suffix in ("", "/entries", "/lots", "/balance"):
            why = mismatch(await client.get(f"/v1/accounts/{address}{suffix}"), status, code)
            if why:
                bad[address + suffix] = why
    assert bad == {}


# Entries -----------------------------------------------------------------------------


async def test_entries_pages_and_time_filters(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """Entries list newest first, page by cursor without gaps or repeats, and filter on [from,
    to)."""
    await history(api, clock)
    url = "/v1/accounts/employee:e-1/entries"

    every = await get_ok(client, url)
    assert [e["amount"] for e in every["items"]] == [5, -20, -30, 100]
    assert [e["balance_after"] for e in every["items"]] == [55, 50, 70, 100]
    assert [e["version"] for e in every["items"]] == [4, 3, 2, 1]
    assert [e["kind"] for e in every["items"]] == ["grant", "debit", "debit", "grant"]
    assert every["items"][1]["created_at"] == ts(T0 + timedelta(hours=2))
    assert every["next_cursor"] is None
    for e in every["items"]:
        assert set(e) == set(Entry.__struct_fields__)
        msgspec.convert(e, Entry)

    first = await get_ok(client, url, limit=3)
    assert [e["amount"] for e in first["items"]] == [5, -20, -30]
    assert first["next_cursor"] is not None
    second = await get_ok(client, url, limit=3, cursor=first["next_cursor"])
    assert [e["amount"] for e in second["items"]] == [100]
    assert second["next_cursor"] is None

    window = await get_ok(
        client, url, **{"from": ts(T0 + timedelta(hours=1)), "to": ts(T0 + timedelta(hours=26))}
    )
    assert [e["amount"] for e in window["items"]] == [-20, -30]
    window = await get_ok(client, url, **{"from": ts(T0 + timedelta(hours=1) + US)})
    assert [e["amount"] for e in window["items"]] == [5, -20]
    window = await get_ok(client, url, to=ts(T0 + timedelta(hours=1)))
    assert [e["amount"] for e in window["items"]] == [100]
    window = await get_ok(client, url, limit=1, **{"from": ts(T0)}, to=ts(T0 + timedelta(hours=3)))
    assert [e["amount"] for e in window["items"]] == [-20]
    window = await get_ok(
        client,
        url,
        limit=1,
        cursor=window["next_cursor"],
        **{"from": ts(T0)},
        to=ts(T0 + timedelta(hours=3)),
    )
    assert [e["amount"] for e in window["items"]] == [-30]


async def test_entries_bad_query(api: Api, client: AsyncTestClient[Any]) -> None:
    """A bad limit, cursor or timestamp without offset on entries answers 400 invalid_request."""
    await api.employee("e-1")
    bad = {}
    for params in [
        {"limit": 0},
        {"limit": 501},
        {"cursor": "!!"},
        {"from": "2030-01-01T00:00:00"},
        {"to": "yesterday"},
    ]:
        why = mismatch(
            await client.get("/v1/accounts/employee:e-1/entries", params=params),
            400,
            "invalid_request",
        )
        if why:
            bad[str(params)] = why
    assert bad == {}


# Balance as of an instant -----------------------------------------------------------


async def test_balance_at(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """The balance at an instant includes every entry made at or before it and none after."""
    await history(api, clock)
    url = "/v1/accounts/employee:e-1/balance"
    expected = [
        (T0 - US, 0),
        (T0, 100),
        (T0 + timedelta(hours=1) - US, 100),
        (T0 + timedelta(hours=1), 70),
        (T0 + timedelta(hours=2) - US, 70),
        (T0 + timedelta(hours=2), 50),
        (T0 + timedelta(hours=26) - US, 50),
        (T0 + timedelta(hours=26), 55),
    ]
    got = [(at, (await get_ok(client, url, at=ts(at)))["posted"]) for at, _ in expected]
    assert got == expected
    body = await get_ok(client, url, at="2030-01-01T01:00:00+01:00")
    assert body == {"address": "employee:e-1", "at": "2030-01-01T00:00:00Z", "posted": 100}

    clock.set(T0 + timedelta(hours=1, minutes=30))
    assert (await get_ok(client, url))["posted"] == 70
    problem(await client.get(url, params={"at": "2030-01-01T00:00:00"}), 400, "invalid_request")


# Series --------------------------------------------------------------------------------


async def test_series_hour_and_day(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A series gives the posted balance at each step from `from` to `to`, both included."""
    await history(api, clock)
    url = "/v1/accounts/employee:e-1/series"
    hourly = await get_ok(
        client,
        url,
        interval="hour",
        **{"from": ts(T0 - timedelta(hours=1))},
        to=ts(T0 + timedelta(hours=3)),
    )
    assert hourly["interval"] == "hour" and hourly["address"] == "employee:e-1"
    assert hourly["items"] == [
        {"at": "2029-12-31T23:00:00Z", "posted": 0},
        {"at": "2030-01-01T00:00:00Z", "posted": 100},
        {"at": "2030-01-01T01:00:00Z", "posted": 70},
        {"at": "2030-01-01T02:00:00Z", "posted": 50},
        {"at": "2030-01-01T03:00:00Z", "posted": 50},
    ]
    daily = await get_ok(
        client,
        url,
        interval="day",
        **{"from": ts(T0 - timedelta(days=1))},
        to=ts(T0 + timedelta(days=2)),
    )
    assert [(p["at"], p["posted"]) for p in daily["items"]] == [
        ("2029-12-31T00:00:00Z", 0),
        ("2030-01-01T00:00:00Z", 100),
        ("2030-01-02T00:00:00Z", 50),
        ("2030-01-03T00:00:00Z", 55),
    ]
    default = await get_ok(client, url, **{"from": ts(T0)}, to=ts(T0))
    assert default["interval"] == "day" and default["items"] == [
        {"at": "2030-01-01T00:00:00Z", "posted": 100}
    ]


async def test_series_limits(api: Api, client: AsyncTestClient[Any]) -> None:
    """A series of at most 1000 points answers 200; more points, or `to` before `from`, answer 400
    invalid_request."""
    await api.employee("e-1")
    url = "/v1/accounts/employee:e-1/series"
    start = T0
    body = await get_ok(
        client, url, interval="hour", **{"from": ts(start)}, to=ts(start + timedelta(hours=999))
    )
    assert len(body["items"]) == 1000
    bad = {}
    for name, params in {
        "1001 hourly points": {"interval": "hour", "to": ts(start + timedelta(hours=1000))},
        "1001 daily points": {"interval": "day", "to": ts(start + timedelta(days=1000))},
        "a year of hours": {"interval": "hour", "to": ts(start + timedelta(days=365))},
        "to before from": {"interval": "day", "to": ts(start - US)},
        "unknown interval": {"interval": "week", "to": ts(start + timedelta(days=7))},
        "missing to": {"interval": "day"},
    }.items():
        why = mismatch(
            await client.get(url, params={"from": ts(start), **params}), 400, "invalid_request"
        )
        if why:
            bad[name] = why
    assert bad == {}


# Lots and expiry -------------------------------------------------------------------------


async def test_lots_listing(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """Lots list live lots (pending included, spent and expired excluded) in consumption order,
    paged by cursor."""
    clock.set(T0)
    await api.employee("e-1")
    spent = (await api.grant("e-1", 10, priority=0))["lot"]
    never = (await api.grant("e-1", 20))["lot"]
    soon = (await api.grant("e-1", 30, expires_at=ts(T0 + timedelta(days=2))))["lot"]
    pending = (await api.grant("e-1", 40, priority=5, effective_at=ts(T0 + timedelta(days=1))))[
        "lot"
    ]
    gone = (await api.grant("e-1", 50, priority=1, expires_at=ts(T0 + timedelta(hours=1))))["lot"]
    assert (await api.debit("employee:e-1", 10)).status_code == 201  # spends `spent` (priority 0)

    clock.set(T0 + timedelta(hours=1))
    items = (await get_ok(client, "/v1/accounts/employee:e-1/lots"))["items"]
    assert [x["id"] for x in items] == [pending["id"], soon["id"], never["id"]]
    assert spent["id"] not in [x["id"] for x in items] and gone["id"] not in [
        x["id"] for x in items
    ]
    for x in items:
        assert set(x) == set(Lot.__struct_fields__)
        msgspec.convert(x, Lot)
    assert items[0]["effective_at"] == ts(T0 + timedelta(days=1)) and items[0]["priority"] == 5

    page1 = await get_ok(client, "/v1/accounts/employee:e-1/lots", limit=2)
    assert [x["id"] for x in page1["items"]] == [pending["id"], soon["id"]]
    page2 = await get_ok(
        client, "/v1/accounts/employee:e-1/lots", limit=2, cursor=page1["next_cursor"]
    )
    assert [x["id"] for x in page2["items"]] == [never["id"]] and page2["next_cursor"] is None


async def test_expiring_schedule(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """`expiring` groups the unspent credits of expiring lots by expires_at, soonest first."""
    clock.set(T0)
    await api.employee("e-1")
    x, y = T0 + timedelta(days=10), T0 + timedelta(days=3)
    await api.grant("e-1", 30, expires_at=ts(x))
    await api.grant("e-1", 20, expires_at=x.astimezone(UTC).isoformat().replace("+00:00", "-00:00"))
    await api.grant("e-1", 15, expires_at=ts(y))
    await api.grant("e-1", 1000)
    assert (await api.debit("employee:e-1", 5)).status_code == 201  # from the lot expiring at y
    acct = await api.account("employee:e-1")
    assert acct["expiring"] == [
        {"amount": 10, "expires_at": ts(y)},
        {"amount": 50, "expires_at": ts(x)},
    ]
    assert acct["posted"] == 1060


async def test_expired_lot_excluded_at_exact_instant(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """An unswept lot counts until 1 µs before expires_at and is excluded from posted and available
    at exactly expires_at."""
    clock.set(T0)
    await api.employee("e-1")
    expiry = T0 + timedelta(hours=1)
    await api.grant("e-1", 100, expires_at=ts(expiry))
    await api.grant("e-1", 7)

    clock.set(expiry - US)
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"]) == (107, 107)
    assert acct["expiring"] == [{"amount": 100, "expires_at": ts(expiry)}]
    assert len((await get_ok(client, "/v1/accounts/employee:e-1/lots"))["items"]) == 2
    emp = await get_ok(client, "/v1/employees/e-1")
    assert emp["wallet"]["available"] == 107

    clock.set(expiry)
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"], acct["expiring"]) == (7, 7, [])
    assert [
        x["remaining"] for x in (await get_ok(client, "/v1/accounts/employee:e-1/lots"))["items"]
    ] == [7]
    emp = await get_ok(client, "/v1/employees/e-1")
    assert (emp["wallet"]["posted"], emp["wallet"]["available"]) == (7, 7)
    # Nothing was written: the journal has only the two grants.
    entries = (await get_ok(client, "/v1/accounts/employee:e-1/entries"))["items"]
    assert [e["kind"] for e in entries] == ["grant", "grant"]
