"""Spend policy (issue 12): period limits checked inside the operation's own
database call, exact windows in a time zone (daylight-saving days too),
department limits over their members' summed spend, model rules, usage that
is never dropped (overdraft, then system:overage), soft-limit events.

The clock is injected (FakeClock): windows are crossed by setting it, never
by sleeping.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service import db as service_db
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, posted, problem
from tests.api.test_report_periods import archive_before

T = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
WALLET = "employee:e-1"
STANDARD = "std-model"
PREMIUM = "premium-model"


async def put_policy(client: Any, address: str, **body: Any) -> dict[str, Any]:
    r = await client.put(f"/v1/accounts/{address}/policy", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def get_policy(client: Any, address: str) -> dict[str, Any]:
    r = await client.get(f"/v1/accounts/{address}/policy")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def reserve(client: Any, account: str = WALLET, **body: Any) -> Any:
    return await client.post("/v1/reservations", json={"account": account, **body}, headers=key())


async def add_prices(client: Any) -> None:
    """A standard model at 10 credits per output token and a premium one at 100."""
    for model, tier, out in ((STANDARD, "standard", 10_000_000), (PREMIUM, "premium", 100_000_000)):
        body = {
            "model": model,
            "effective_from": "2029-01-01T00:00:00Z",
            "input_per_mtok": 1_000_000,
            "cached_input_per_mtok": 0,
            "output_per_mtok": out,
            "tier": tier,
        }
        r = await client.post("/v1/prices", json=body, headers=key())
        assert r.status_code == 201, r.text


async def setup(api: Api, clock: FakeClock, wallets: dict[str, int], dept: str = "eng") -> None:
    clock.set(T - timedelta(days=20))
    for emp, amount in wallets.items():
        await api.employee(emp, dept)
        if amount:
            await api.grant(emp, amount)
    clock.set(T)


async def outbox(database_url: str) -> list[dict[str, Any]]:
    """The limit.reached events (grants put grant.created events in the outbox too)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT type, data::text AS data, dedup_key FROM outbox"
            " WHERE type = 'limit.reached' ORDER BY seq"
        )
    finally:
        await conn.close()
    import json

    return [
        {"type": r["type"], "data": json.loads(r["data"]), "dedup_key": r["dedup_key"]}
        for r in rows
    ]


# Policy resource --------------------------------------------------------------


async def test_put_and_get_policy_with_current_windows(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """PUT stores limits, model rules and the overdraft; GET shows each limit's window at
    the request's instant, with what was spent in it before the limit was set."""
    await setup(api, clock, {"e-1": 1000})
    assert (await api.debit(WALLET, 70)).status_code == 201
    body = await put_policy(
        client,
        WALLET,
        limits=[
            {"window": "day", "amount": 500},
            {"window": "month", "amount": 5000, "mode": "soft", "time_zone": "Europe/Paris"},
        ],
        models={"tiers": ["standard"], "deny": ["x-model"]},
        overdraft_limit=25,
    )
    assert body["account"] == WALLET
    assert body["overdraft_limit"] == 25
    assert body["models"] == {"tiers": ["standard"], "deny": ["x-model"]}
    assert body["limits"] == [
        {
            "window": "day",
            "amount": 500,
            "mode": "hard",
            "time_zone": "UTC",
            "spent": 70,
            "remaining": 430,
            "starts_at": "2030-01-15T00:00:00.000000Z",
            "resets_at": "2030-01-16T00:00:00.000000Z",
        },
        {
            "window": "month",
            "amount": 5000,
            "mode": "soft",
            "time_zone": "Europe/Paris",
            "spent": 70,
            "remaining": 4930,
            "starts_at": "2029-12-31T23:00:00.000000Z",
            "resets_at": "2030-01-31T23:00:00.000000Z",
        },
    ]
    assert await get_policy(client, WALLET) == body
    assert (await api.account(WALLET))["overdraft_limit"] == 25


async def test_policy_input_is_checked(client: Any, api: Api, clock: FakeClock) -> None:
    """An unknown time zone, a system account, an unknown field or a zero amount answer 400;
    an unknown employee 404."""
    await setup(api, clock, {"e-1": 0})
    r = await client.put(
        f"/v1/accounts/{WALLET}/policy",
        json={"limits": [{"window": "day", "amount": 5, "time_zone": "Mars/Olympus"}]},
    )
    assert problem(r, 400, "invalid_request")["errors"][0]["path"] == "$.limits[0].time_zone"
    r = await client.put("/v1/accounts/system:usage/policy", json={})
    problem(r, 400, "invalid_request")
    r = await client.put(
        f"/v1/accounts/{WALLET}/policy", json={"limits": [{"window": "day", "amount": 0}]}
    )
    problem(r, 400, "invalid_request")
    r = await client.put(f"/v1/accounts/{WALLET}/policy", json={"colour": "red"})
    problem(r, 400, "invalid_request")
    r = await client.put("/v1/accounts/employee:nobody/policy", json={})
    problem(r, 404, "employee_not_found")


# Hard limits ------------------------------------------------------------------


async def test_daily_hard_limit_under_40_concurrent_reservations(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A daily hard limit of 1000 and 40 concurrent reservations of 30: exactly 33 succeed,
    the rest answer 409 limit_exceeded, and the window's spent never passes the limit
    while they run."""
    await setup(api, clock, {"e-1": 100_000})
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 1000}])
    seen: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append((await get_policy(client, WALLET))["limits"][0]["spent"])
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(reserve(client, amount=30) for _ in range(40)))
    done.set()
    await watcher
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 33 + [409] * 7, [
        r.text for r in answers if r.status_code not in (201, 409)
    ]
    refused = [problem(r, 409, "limit_exceeded") for r in answers if r.status_code == 409]
    assert {(p["window"], p["limit"], p["remaining"]) for p in refused} == {("day", 1000, 10)}
    assert {p["resets_at"] for p in refused} == {"2030-01-16T00:00:00.000000Z"}
    assert seen and max(seen) <= 1000
    assert (await get_policy(client, WALLET))["limits"][0]["spent"] == 990
    await assert_audit_clean(database_url)


async def test_window_resets_at_local_midnight_on_daylight_saving_days(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """In America/New_York the day daylight saving starts lasts 23 hours: the window that
    starts at 05:00Z resets at 04:00Z the next day, and at that very instant reservations
    succeed again; a microsecond before, they are still refused."""
    await setup(api, clock, {"e-1": 100_000})
    await put_policy(
        client, WALLET, limits=[{"window": "day", "amount": 100, "time_zone": "America/New_York"}]
    )
    clock.set(datetime(2030, 3, 10, 4, 59, 59, 999999, tzinfo=UTC))  # 23:59:59.999999 EST, March 9
    assert (await reserve(client, amount=100)).status_code == 201
    refused = problem(await reserve(client, amount=1), 409, "limit_exceeded")
    assert refused["resets_at"] == "2030-03-10T05:00:00.000000Z"
    clock.set(datetime(2030, 3, 10, 5, 0, tzinfo=UTC))  # local midnight, March 10 (DST day)
    assert (await reserve(client, amount=100, ttl_seconds=86_400)).status_code == 201
    refused = problem(await reserve(client, amount=1), 409, "limit_exceeded")
    assert refused["resets_at"] == "2030-03-11T04:00:00.000000Z"  # 23 hours later
    window = (await get_policy(client, WALLET))["limits"][0]
    assert (window["starts_at"], window["spent"]) == ("2030-03-10T05:00:00.000000Z", 100)
    clock.set(datetime(2030, 3, 11, 3, 59, 59, 999999, tzinfo=UTC))
    problem(await reserve(client, amount=1), 409, "limit_exceeded")
    clock.set(datetime(2030, 3, 11, 4, 0, tzinfo=UTC))
    assert (await reserve(client, amount=100)).status_code == 201
    # The day daylight saving ends lasts 25 hours.
    clock.set(datetime(2030, 11, 3, 12, 0, tzinfo=UTC))
    window = (await get_policy(client, WALLET))["limits"][0]
    assert (window["starts_at"], window["resets_at"], window["spent"]) == (
        "2030-11-03T04:00:00.000000Z",
        "2030-11-04T05:00:00.000000Z",
        0,
    )
    await assert_audit_clean(database_url)


async def test_debits_are_limited_and_reversals_give_spend_back(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A debit that would pass a hard limit answers 409 limit_exceeded and changes nothing;
    reversing a debit the next day gives its spend back to the day it was counted in."""
    await setup(api, clock, {"e-1": 10_000})
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 500}])
    first = await api.debit(WALLET, 300)
    assert first.status_code == 201, first.text
    problem(await api.debit(WALLET, 201), 409, "limit_exceeded")
    assert await posted(api, WALLET) == 9700
    clock.set(T + timedelta(days=1))
    r = await client.post(f"/v1/transactions/{first.json()['id']}/reverse", json={}, headers=key())
    assert r.status_code == 201, r.text
    clock.set(T)
    assert (await get_policy(client, WALLET))["limits"][0]["spent"] == 0
    assert (await api.debit(WALLET, 500)).status_code == 201
    await assert_audit_clean(database_url)


async def test_reservations_count_until_captured_released_or_expired(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An active reservation counts from the moment it is made; capture trues it up to the
    captured amount, release and expiry give it back (expiry at its exact instant)."""
    await setup(api, clock, {"e-1": 10_000})
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 1000}])

    async def spent() -> int:
        return int((await get_policy(client, WALLET))["limits"][0]["spent"])

    a = (await reserve(client, amount=400)).json()
    assert await spent() == 400
    r = await client.post(
        f"/v1/reservations/{a['id']}/capture", json={"amount": 150}, headers=key()
    )
    assert r.status_code == 200, r.text
    assert await spent() == 150
    b = (await reserve(client, amount=300)).json()
    r = await client.post(f"/v1/reservations/{b['id']}/release", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert await spent() == 150
    c = await reserve(client, amount=800, ttl_seconds=60)
    assert c.status_code == 201, c.text
    problem(await reserve(client, amount=100), 409, "limit_exceeded")
    clock.set(T + timedelta(seconds=60))
    assert await spent() == 150  # expired at its instant, before any write noticed
    e = await reserve(client, amount=850)
    assert e.status_code == 201, e.text
    # Capturing more than held counts the excess, and is refused past the limit.
    capture = f"/v1/reservations/{e.json()['id']}/capture"
    problem(await client.post(capture, json={"amount": 851}, headers=key()), 409, "limit_exceeded")
    assert (await client.post(capture, json={"amount": 850}, headers=key())).status_code == 200
    assert await spent() == 1000
    await assert_audit_clean(database_url)


# Departments ------------------------------------------------------------------


async def test_department_limit_binds_members_reserving_concurrently(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A department's monthly hard limit of 1000 shared by 5 members each reserving 30 ten
    times at once: exactly 33 succeed, their summed spend never passes 1000, and each
    member's spend is kept in a row of its own."""
    members = [f"m-{i}" for i in range(5)]
    await setup(api, clock, {m: 10_000 for m in members})
    await put_policy(client, "department:eng", limits=[{"window": "month", "amount": 1000}])
    answers = await asyncio.gather(
        *(reserve(client, account=f"employee:{m}", amount=30) for m in members for _ in range(10))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 33 + [409] * 17, [
        r.text for r in answers if r.status_code not in (201, 409)
    ]
    refused = problem(next(r for r in answers if r.status_code == 409), 409, "limit_exceeded")
    assert (refused["account"], refused["window"], refused["limit"]) == (
        "department:eng",
        "month",
        1000,
    )
    window = (await get_policy(client, "department:eng"))["limits"][0]
    assert (window["spent"], window["remaining"]) == (990, 10)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT account_id, spent FROM policy_spend WHERE department = 'eng'"
        )
    finally:
        await conn.close()
    assert sum(r["spent"] for r in rows) == 990
    assert len({r["account_id"] for r in rows}) == len(rows) >= 5
    await assert_audit_clean(database_url)


async def test_member_joining_a_department_is_bound_by_its_policy(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An employee hired into, or moved to, a department with a policy is bound by it at
    once; moved out, no longer."""
    await setup(api, clock, {"e-1": 1000})
    await api.department("ops")
    await put_policy(client, "department:ops", limits=[{"window": "day", "amount": 10}])
    await api.employee("e-2", "ops")
    await api.grant("e-2", 1000)
    problem(await api.debit("employee:e-2", 11), 409, "limit_exceeded")
    assert (await api.debit(WALLET, 11)).status_code == 201
    await api.employee("e-1", "ops")
    problem(await api.debit(WALLET, 11), 409, "limit_exceeded")
    await api.employee("e-2", "eng")
    assert (await api.debit("employee:e-2", 11)).status_code == 201
    await assert_audit_clean(database_url)


# Estimates --------------------------------------------------------------------


async def test_estimate_is_cut_to_the_limit_or_refused_below_min_output(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Under a limit tighter than the balance a reservation by estimate holds what the limit
    allows (max_output_tokens_allowed says so); below min_output_tokens it answers 409
    limit_exceeded, not insufficient_credits."""
    await setup(api, clock, {"e-1": 100_000})
    await add_prices(client)
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 1000}])
    estimate = {
        "model": STANDARD,
        "input_tokens": 100,
        "max_output_tokens": 500,
        "min_output_tokens": 50,
    }
    r = await reserve(client, estimate=estimate)
    assert r.status_code == 201, r.text
    # 100 input at 1/token + 90 output at 10/token = 1000.
    assert (r.json()["amount"], r.json()["max_output_tokens_allowed"]) == (1000, 90)
    clock.set(T + timedelta(days=1))
    await api.debit(WALLET, 500)
    refused = problem(await reserve(client, estimate=estimate), 409, "limit_exceeded")
    assert (refused["spent"], refused["remaining"], refused["requested"]) == (500, 500, 600)
    await assert_audit_clean(database_url)


# Models -----------------------------------------------------------------------


async def test_standard_only_employee_and_premium_model(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A standard-tier-only employee is refused a premium model on reserve and on a debit
    naming it (before anything is held); a usage event for it is recorded and flagged."""
    await setup(api, clock, {"e-1": 100_000})
    await add_prices(client)
    await put_policy(client, WALLET, models={"tiers": ["standard"]})
    est = {"model": PREMIUM, "input_tokens": 10, "max_output_tokens": 10}
    refused = problem(await reserve(client, estimate=est), 409, "model_not_allowed")
    assert refused["model"] == PREMIUM
    problem(await api.debit(WALLET, 5, metadata={"model": PREMIUM}), 409, "model_not_allowed")
    assert (await api.account(WALLET))["available"] == 100_000
    ok = await reserve(client, estimate={**est, "model": STANDARD})
    assert ok.status_code == 201, ok.text
    assert (await api.debit(WALLET, 5, metadata={"model": STANDARD})).status_code == 201
    assert (await api.debit(WALLET, 5, metadata={"model": "unpriced"})).status_code == 201
    usage = {
        "source": "gw",
        "event_id": "p-1",
        "account": WALLET,
        "model": PREMIUM,
        "input_tokens": 10,
        "output_tokens": 1,
    }
    r = await client.post("/v1/usage", json=usage)
    assert r.status_code == 201, r.text
    assert (r.json()["violation"], r.json()["cost"]) == ("model_not_allowed", 110)
    batch = await client.post("/v1/usage:batch", json={"events": [{**usage, "event_id": "p-2"}]})
    assert batch.json()["results"][0]["status"] == "recorded", batch.text
    conn = await asyncpg.connect(database_url)
    try:
        flagged = await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE violation = 'model_not_allowed'"
        )
    finally:
        await conn.close()
    assert flagged == 2
    await assert_audit_clean(database_url)


async def test_allow_deny_and_department_rules_narrow(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """`allow` admits only the models listed, `deny` refuses those listed, and a department
    rule narrows a member's own: both must allow the model."""
    await setup(api, clock, {"e-1": 100_000, "e-2": 100_000})
    await add_prices(client)

    async def debit(account: str, model: str) -> int:
        return int((await api.debit(account, 1, metadata={"model": model})).status_code)

    await put_policy(client, WALLET, models={"allow": [STANDARD]})
    assert (await debit(WALLET, STANDARD), await debit(WALLET, PREMIUM)) == (201, 409)
    await put_policy(client, WALLET, models={"deny": [STANDARD]})
    assert (await debit(WALLET, STANDARD), await debit(WALLET, PREMIUM)) == (409, 201)
    await put_policy(client, WALLET, models={"tiers": ["standard", "premium"]})
    await put_policy(client, "department:eng", models={"tiers": ["standard"]})
    assert (await debit(WALLET, STANDARD), await debit(WALLET, PREMIUM)) == (201, 409)
    assert (await debit("employee:e-2", PREMIUM)) == 409


# Usage beyond the balance -----------------------------------------------------


async def test_usage_beyond_balance_and_overdraft_goes_to_overage(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Usage beyond balance plus overdraft is recorded: the wallet goes to -overdraft_limit
    and no further, the rest is the shortfall on system:overage; a hard limit never drops
    usage; the liability of each party is exact and audit passes."""
    await setup(api, clock, {"e-1": 100})
    await add_prices(client)
    await put_policy(client, WALLET, overdraft_limit=50, limits=[{"window": "day", "amount": 10}])
    usage = {
        "source": "gw",
        "event_id": "u-1",
        "account": WALLET,
        "model": STANDARD,
        "input_tokens": 0,
        "output_tokens": 20,
    }
    r = await client.post("/v1/usage", json=usage)
    assert r.status_code == 201, r.text
    assert (r.json()["cost"], r.json()["shortfall"]) == (200, 50)
    assert await posted(api, WALLET) == -50
    assert await posted(api, "system:overage") == -50
    r = await client.post("/v1/usage", json={**usage, "event_id": "u-2", "output_tokens": 1})
    assert (r.json()["cost"], r.json()["shortfall"]) == (10, 10)
    assert await posted(api, WALLET) == -50
    assert (await get_policy(client, WALLET))["limits"][0]["spent"] == 210
    # The overdraft cannot be lowered below what was overdrawn.
    r = await client.put(f"/v1/accounts/{WALLET}/policy", json={"overdraft_limit": 10})
    problem(r, 400, "invalid_request")
    # A batch records the same way, and answers the shortfall.
    r = await client.post("/v1/usage:batch", json={"events": [{**usage, "event_id": "u-3"}]})
    assert r.json()["results"][0] | {"id": None, "transaction_id": None} == {
        "event_id": "u-3",
        "status": "recorded",
        "cost": 200,
        "shortfall": 200,
        "id": None,
        "transaction_id": None,
    }
    problem(await api.debit(WALLET, 1), 409, "insufficient_credits")
    await add_limit_refusal(client)
    metrics = (await client.get("/metrics")).text
    assert "tokenledger_overage_credits_total 260.0" in metrics
    assert 'tokenledger_refusals_total{code="limit_exceeded"} 1.0' in metrics
    assert 'tokenledger_refusals_total{code="insufficient_credits"} 1.0' in metrics
    await assert_audit_clean(database_url)
    # Retention moves the events to the archive with their shortfall and violation, so the
    # overage invariant still holds after it (issue 21's archive met issue 12's overage).
    conn = await asyncpg.connect(database_url)
    try:
        moved = await conn.fetchval("SELECT tl_archive_usage_events('2100-01-01', 100)")
        assert moved == 3
        archived = await conn.fetch(
            "SELECT event_id, shortfall FROM usage_events_archive ORDER BY event_id"
        )
    finally:
        await conn.close()
    assert [(a["event_id"], a["shortfall"]) for a in archived] == [
        ("u-1", 50),
        ("u-2", 10),
        ("u-3", 200),
    ]
    await assert_audit_clean(database_url)


async def add_limit_refusal(client: Any) -> None:
    """One limit_exceeded answer, on a fresh wallet with a daily limit of 1."""
    r = await client.put(
        "/v1/employees/e-9", json={"name": "e9", "email": "e9@x.io", "department": "eng"}
    )
    assert r.status_code == 201, r.text
    await put_policy(client, "employee:e-9", limits=[{"window": "day", "amount": 1}])
    g = {"employee": "e-9", "amount": 10, "reason": "spot_bonus"}
    assert (await client.post("/v1/grants", json=g, headers=key())).status_code == 201
    problem(await reserve(client, "employee:e-9", amount=2), 409, "limit_exceeded")


# Soft limits ------------------------------------------------------------------


async def test_soft_limit_never_refuses_and_emits_once_per_threshold(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A soft limit never refuses; limit.reached is written to the outbox once at 80 % and
    once at 100 % of each window, however often spend passes them."""
    await setup(api, clock, {"e-1": 10_000})
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 100, "mode": "soft"}])
    for amount in (50, 30, 10, 20, 40):
        assert (await api.debit(WALLET, amount)).status_code == 201
    clock.set(T + timedelta(days=1))
    assert (await api.debit(WALLET, 85)).status_code == 201
    events = await outbox(database_url)
    assert [
        (e["type"], e["data"]["threshold_percent"], e["data"]["starts_at"]) for e in events
    ] == [
        ("limit.reached", 80, "2030-01-15T00:00:00.000000Z"),
        ("limit.reached", 100, "2030-01-15T00:00:00.000000Z"),
        ("limit.reached", 80, "2030-01-16T00:00:00.000000Z"),
    ]
    assert events[0]["data"]["account"] == WALLET
    await assert_audit_clean(database_url)


# Reports ----------------------------------------------------------------------


async def test_usage_reports_show_overage_and_violations(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Usage reports per employee and per department carry each group's overage (credits
    charged to system:overage) and model violations, from the roll-ups (whole days and
    months) and from raw events (any instant) alike, and the usage export; still so once
    the retention job moved the events to usage_events_archive."""
    await setup(api, clock, {"e-1": 100, "e-2": 10_000})
    await api.employee("e-3", "ops")
    await api.grant("e-3", 10_000)
    await add_prices(client)
    await put_policy(client, WALLET, models={"tiers": ["standard"]})
    base = {"source": "gw", "input_tokens": 0, "output_tokens": 20}
    for event_id, account, model in (
        ("r-1", WALLET, STANDARD),  # 200 of which 100 overage
        ("r-2", WALLET, PREMIUM),  # 2000, all overage, a violation
        ("r-3", "employee:e-2", STANDARD),
        ("r-4", "employee:e-3", STANDARD),
    ):
        body = {**base, "event_id": event_id, "account": account, "model": model}
        r = await client.post("/v1/usage", json=body)
        assert r.status_code == 201, r.text
    windows = (
        ("2030-01-01T00:00:00Z", "2030-02-01T00:00:00Z"),  # whole month: monthly roll-ups
        ("2030-01-15T00:00:00Z", "2030-01-16T00:00:00Z"),  # whole day: daily roll-ups
        ("2030-01-15T11:00:00Z", "2030-01-15T13:00:00Z"),  # raw events
    )
    await _overage_in_reports(client, windows)
    conn = await service_db.connect(database_url)
    try:
        assert await archive_before(conn, "2030-02-01") == 4
    finally:
        await conn.close()
    await _overage_in_reports(client, windows)


async def _usage_items(client: Any, start: str, end: str, group_by: str) -> list[dict[str, Any]]:
    params = {"from": start, "to": end, "group_by": group_by}
    items: list[dict[str, Any]] = (await client.get("/v1/reports/usage", params=params)).json()[
        "items"
    ]
    return items


async def _overage_in_reports(client: Any, windows: tuple[tuple[str, str], ...]) -> None:
    """The checks of test_usage_reports_show_overage_and_violations over `windows`."""
    items = await _usage_items(client, *windows[0], "employee,model,project")
    exported = {(i["employee"], i["model"]): (i["overage"], i["violations"]) for i in items}
    assert exported == {
        ("e-1", STANDARD): (100, 0),
        ("e-1", PREMIUM): (2000, 1),
        ("e-2", STANDARD): (0, 0),
        ("e-3", STANDARD): (0, 0),
    }
    for start, end in windows:
        items = await _usage_items(client, start, end, "employee")
        brief = {i["employee"]: (i["credits"], i["overage"], i["violations"]) for i in items}
        assert brief == {"e-1": (2200, 2100, 1), "e-2": (200, 0, 0), "e-3": (200, 0, 0)}, start
        items = await _usage_items(client, start, end, "department,model")
        by_model = {(i["department"], i["model"]): (i["overage"], i["violations"]) for i in items}
        assert by_model == {
            ("eng", STANDARD): (100, 0),
            ("eng", PREMIUM): (2000, 1),
            ("ops", STANDARD): (0, 0),
        }, start


# The set-based batch path -----------------------------------------------------


async def decide_on_twin(
    client: Any,
    database_url: str,
    twin: str,
    items: list[Any],
    one_by_one: bool,
    accounts: tuple[str, ...],
) -> tuple[list[Any], list[Any], list[list[int]], list[tuple[Any, ...]]]:
    """Runs a twin's items one by one, or set-based in one coalesced batch (all of
    them must go set-based), and answers what the two ways must agree on, the
    twin's name replaced by TWIN: the answers, the wallet states of `accounts`'
    employee wallets, each account's window totals, and the limit.reached events."""
    from tests.api.test_coalescing import _wallet_state, ledger_of, run_twin

    outcomes = await run_twin(ledger_of(client), twin, items, one_by_one)
    names = {twin: "TWIN"}
    wallets = [a for a in accounts if a.startswith("employee:")]
    states = [await _wallet_state(client, w, names) for w in wallets]
    spent = [[w["spent"] for w in (await get_policy(client, a))["limits"]] for a in accounts]
    events = [
        (
            e["data"]["account"].replace(twin, "TWIN"),
            e["data"]["window"],
            e["data"]["threshold_percent"],
            e["data"]["spent"],
        )
        for e in await outbox(database_url)
        if twin in e["data"]["account"]
    ]
    return outcomes, states, spent, events


async def test_bound_wallets_go_set_based_and_decide_as_one_by_one(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Debits, reservations, captures (under, over and beyond a limit) and releases
    of wallets bound by their own hard and soft limits and by their department's
    hard and soft limits and model rules are decided set-based in one coalesced
    batch (tl_batch_fast), with exactly the answers, wallet states, window totals
    and limit.reached events (with the spend at the crossing) of the same
    operations run one by one on a twin department."""
    from tests.api.test_coalescing import item, reservation_item

    clock.set(None)  # type: ignore[arg-type]  # why: the batch path needs one shared instant
    for model, tier in (("fast-std", "standard"), ("fast-premium", "premium")):
        body = {
            "model": model,
            "effective_from": "2020-01-01T00:00:00Z",
            "input_per_mtok": 1_000_000,
            "cached_input_per_mtok": 0,
            "output_per_mtok": 1_000_000,
            "tier": tier,
        }
        assert (await client.post("/v1/prices", json=body, headers=key())).status_code == 201
    outcomes = {}
    states = {}
    spent = {}
    events = {}
    for twin, one_by_one in (("batch", False), ("single", True)):
        w1, w2 = f"employee:{twin}-1", f"employee:{twin}-2"
        for emp in (f"{twin}-1", f"{twin}-2"):
            await api.employee(emp, twin)
            await api.grant(emp, 500)
            await put_policy(
                client,
                f"employee:{emp}",
                limits=[
                    {"window": "day", "amount": 150},
                    {"window": "month", "amount": 140, "mode": "soft"},
                ],
            )
        await put_policy(
            client,
            f"department:{twin}",
            limits=[
                {"window": "day", "amount": 250},
                {"window": "month", "amount": 300, "mode": "soft"},
            ],
            models={"tiers": ["standard"]},
        )
        held = []  # w1 25 and 10, w2 20 and 15: 35 each, 70 for the department
        for wallet, amount in ((w1, 25), (w2, 20), (w1, 10), (w2, 15)):
            r = await reserve(client, wallet, amount=amount)
            assert r.status_code == 201, r.text
            held.append(r.json()["id"])
        keys = (f"{twin}-{k}" for k in range(100))
        res = {"ttl_seconds": 600, "metadata": None}
        items = [
            item("debit", {"account": w1, "amount": 40}, next(keys)),  # w1 75, dept 110
            item("reserve", {"account": w1, "amount": 50, **res}, next(keys)),  # w1 125: 80 %
            # Over the held 25 by 10: w1 135, dept 170.
            reservation_item(
                "capture", {"amount": 35, "metadata": None}, held[0], next(keys), status=200
            ),
            # The department allows standard models only.
            item(
                "debit",
                {"account": w1, "amount": 5, "metadata": {"model": "fast-premium"}},
                next(keys),
            ),
            item(
                "debit",
                {"account": w2, "amount": 30, "metadata": {"model": "fast-std"}},
                next(keys),
            ),
            reservation_item("release", {}, held[1], next(keys), status=200),  # w2 45, dept 180
            # 20 over its hold would take w1 to 155 > 150.
            reservation_item(
                "capture", {"amount": 30, "metadata": None}, held[2], next(keys), status=200
            ),
            item("debit", {"account": w2, "amount": 80}, next(keys)),  # dept 260 > 250
            item(
                "reserve", {"account": w2, "amount": 70, **res}, next(keys)
            ),  # dept 250: 80 % of 300
            item("debit", {"account": w1, "amount": 900}, next(keys)),  # insufficient first
            # Under its hold by 12: w2 103, dept 238.
            reservation_item(
                "capture", {"amount": 3, "metadata": None}, held[3], next(keys), status=200
            ),
            item("debit", {"account": w1, "amount": 12}, next(keys)),  # w1 147: 100 %; dept 250
            item("debit", {"account": w2, "amount": 1}, next(keys)),  # dept 251 > 250
        ]
        outcomes[twin], states[twin], spent[twin], events[twin] = await decide_on_twin(
            client, database_url, twin, items, one_by_one, (w1, w2, f"department:{twin}")
        )
    statuses = [o[0] for o in outcomes["batch"]]
    assert statuses == [201, 201, 200, 409, 201, 200, 409, 409, 201, 409, 200, 201, 409], outcomes
    codes = [o[1].get("code") for o in outcomes["batch"]]
    assert [c for c in codes if c] == [
        "model_not_allowed",
        "limit_exceeded",
        "limit_exceeded",
        "insufficient_credits",
        "limit_exceeded",
    ]
    assert outcomes["batch"] == outcomes["single"]
    assert states["batch"] == states["single"]
    assert spent["batch"] == spent["single"] == [[147, 147], [103, 103], [250, 250]]
    assert (
        events["batch"]
        == events["single"]
        == [
            ("employee:TWIN-1", "month", 80, 125),
            ("employee:TWIN-2", "month", 80, 115),
            ("department:TWIN", "month", 80, 250),
            ("employee:TWIN-1", "month", 100, 147),
        ]
    ), events
    await assert_audit_clean(database_url)


async def test_wallets_bound_by_their_own_limits_only_decide_as_one_by_one(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A batch whose wallets are bound by their own limits only, their window
    rows already made, takes tl_policy_batch_links's short way (no department
    lock, no limit shared by two wallets): the same answers, wallet states,
    window totals and limit.reached events as one by one on a twin."""
    from tests.api.test_coalescing import item, reservation_item

    clock.set(None)  # type: ignore[arg-type]  # why: the batch path needs one shared instant
    outcomes, states, spent, events = {}, {}, {}, {}
    for twin, one_by_one in (("own-batch", False), ("own-single", True)):
        w1, w2 = f"employee:{twin}-1", f"employee:{twin}-2"
        for emp, day in ((f"{twin}-1", 100), (f"{twin}-2", 60)):
            await api.employee(emp, twin)
            await api.grant(emp, 500)
            await put_policy(
                client,
                f"employee:{emp}",
                limits=[
                    {"window": "month", "amount": 80, "mode": "soft"},
                    {"window": "day", "amount": day},
                ],
            )
        held = []  # made before the batch: their window rows exist (w1 30, w2 20)
        for wallet, amount in ((w1, 30), (w2, 20)):
            r = await reserve(client, wallet, amount=amount)
            assert r.status_code == 201, r.text
            held.append(r.json()["id"])
        keys = (f"{twin}-{k}" for k in range(100))
        res = {"ttl_seconds": 600, "metadata": None}
        items = [
            item("debit", {"account": w1, "amount": 40}, next(keys)),  # w1 70
            item("debit", {"account": w2, "amount": 30}, next(keys)),  # w2 50
            item("debit", {"account": w2, "amount": 11}, next(keys)),  # w2 61 > 60
            # Over its hold by 5: w1 75.
            reservation_item(
                "capture", {"amount": 35, "metadata": None}, held[0], next(keys), status=200
            ),
            item("reserve", {"account": w1, "amount": 10, **res}, next(keys)),  # w1 85: soft 100 %
            item("debit", {"account": w1, "amount": 16}, next(keys)),  # w1 101 > 100
            reservation_item("release", {}, held[1], next(keys), status=200),  # w2 30
            item("debit", {"account": w2, "amount": 30}, next(keys)),  # w2 60, under 64
            item("debit", {"account": w1, "amount": 15}, next(keys)),  # w1 100
        ]
        outcomes[twin], states[twin], spent[twin], events[twin] = await decide_on_twin(
            client, database_url, twin, items, one_by_one, (w1, w2)
        )
    assert [o[0] for o in outcomes["own-batch"]] == [201, 201, 409, 200, 201, 409, 200, 201, 201]
    assert outcomes["own-batch"] == outcomes["own-single"]
    assert states["own-batch"] == states["own-single"]
    assert spent["own-batch"] == spent["own-single"] == [[100, 100], [60, 60]]
    assert (
        events["own-batch"]
        == events["own-single"]
        == [
            ("employee:TWIN-1", "month", 80, 70),
            ("employee:TWIN-1", "month", 100, 85),
        ]
    ), events
    await assert_audit_clean(database_url)


async def test_capture_of_a_reservation_from_an_earlier_window_goes_one_by_one(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A capture trues up the window its reservation was made in: when that is
    not the current one, the wallet goes one by one (and the answer is right)."""
    from tests.api.test_coalescing import fast_items, item, ledger_of, reservation_item

    await setup(api, clock, {"e-1": 1000})
    await put_policy(client, WALLET, limits=[{"window": "day", "amount": 100}])
    clock.set(T.replace(hour=23, minute=55))
    r = await reserve(client, amount=60, ttl_seconds=3600)
    assert r.status_code == 201, r.text
    now = T.replace(hour=0) + timedelta(days=1, minutes=1)  # the next day
    clock.set(now)
    ledger = ledger_of(client)
    capture = reservation_item(
        "capture", {"amount": 80, "metadata": None}, r.json()["id"], "k1", status=200
    )
    debit = item("debit", {"account": WALLET, "amount": 90}, "k2")
    for i in (capture, debit):
        i.ctx["now"] = now.isoformat()
    assert await fast_items(ledger, [capture, debit]) == [False, False]
    assert [x["status"] for x in await ledger._execute_batch([capture, debit])] == [200, 201]
    limits = (await get_policy(client, WALLET))["limits"]
    assert limits[0]["spent"] == 90
    await assert_audit_clean(database_url)
