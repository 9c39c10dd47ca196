"""Grant programs (API.md, Grant programs): monthly allotments issued exactly
once per (program, cycle, employee), by the API, the scheduler or an
onboarding, expiring with the cycle, rolling over up to a cap, and funded
by a department while its budget lasts. Time is the injected clock; nothing
sleeps."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service import db as service_db
from service.background import SCHEDULER, Background
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, problem

T0 = datetime(2026, 1, 5, tzinfo=UTC)


def ts6(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def program(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 1000,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "expiry": {"at": "end_of_cycle"},
        "starts_on": "2026-01-01",
        "active": True,
    }
    body.update(overrides)
    return body


async def put_program(api: Api, pid: str = "monthly", **overrides: Any) -> dict[str, Any]:
    r = await api.c.put(f"/v1/grant-programs/{pid}", json=program(**overrides))
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


async def run(api: Api, cycle: str, pid: str = "monthly") -> dict[str, Any]:
    r = await api.c.post(f"/v1/grant-programs/{pid}/runs", json={"cycle": cycle})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def lots(api: Api, address: str) -> list[dict[str, Any]]:
    r = await api.c.get(f"/v1/accounts/{address}/lots", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def schedule(client: AsyncTestClient[Any]) -> list[dict[str, Any]]:
    return await Background(client.app.state.ledger).run_programs()  # type: ignore[return-value]


async def sweep(client: AsyncTestClient[Any]) -> int:
    return await Background(client.app.state.ledger).sweep_expired()


async def grants_of(database_url: str, pid: str = "monthly") -> list[asyncpg.Record]:
    conn = await service_db.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT cycle, employee_id, amount FROM program_grants WHERE program_id = $1 "
            "ORDER BY cycle, employee_id",
            pid,
        )
    finally:
        await conn.close()


# ---------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------


async def test_put_get_list_program(api: Api, clock: FakeClock) -> None:
    """PUT creates (201) then updates (200, version + 1); GET shows the cycle in
    progress and the next one, in the program's time zone."""
    clock.set(datetime(2026, 3, 10, tzinfo=UTC))
    await api.department("eng")
    r = await api.c.put("/v1/grant-programs/monthly", json=program(funded_by="department:eng"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["version"] == 1 and body["funded_by"] == "department:eng"
    assert body["current_cycle"] == {
        "cycle": "2026-03",
        "starts_at": "2026-03-01T00:00:00.000000Z",
        "ends_at": "2026-04-01T00:00:00.000000Z",
    }
    assert body["next_cycle"]["cycle"] == "2026-04"
    r = await api.c.put("/v1/grant-programs/monthly", json=program(amount=2000, rollover_max=10))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2 and r.json()["amount"] == 2000
    assert r.json()["rollover_max"] == 10 and r.json()["funded_by"] == "system:issuance"
    got = await api.c.get("/v1/grant-programs/monthly")
    assert got.status_code == 200 and got.json() == r.json()
    listed = await api.c.get("/v1/grant-programs")
    assert [p["id"] for p in listed.json()["items"]] == ["monthly"]
    problem(await api.c.get("/v1/grant-programs/nope"), 404, "grant_program_not_found")
    problem(
        await api.c.post("/v1/grant-programs/nope/runs", json={"cycle": "2026-01"}),
        404,
        "grant_program_not_found",
    )


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"audience": {"all": True, "employees": ["a"]}}, "$.audience"),
        ({"audience": {}}, "$.audience"),
        ({"audience": {"all": False}}, "$.audience.all"),
        ({"audience": {"employees": ["a", "a"]}}, "$.audience.employees"),
        ({"expiry": {"at": "end_of_cycle", "after_days": 3}}, "$.expiry"),
        ({"expiry": {"after_days": 3}, "rollover_max": 5}, "$.rollover_max"),
        ({"expiry": None, "rollover_max": 5}, "$.rollover_max"),
        ({"ends_on": "2025-12-31"}, "$.ends_on"),
        ({"time_zone": "Mars/Olympus"}, "$.time_zone"),
        ({"cadence": {"every": "month", "day": 29}}, "$.cadence.day"),
        ({"cadence": {"every": "week", "day": 1}}, "$.cadence.every"),
        ({"amount": 0}, "$.amount"),
        ({"rollover_max": -1}, "$.rollover_max"),
        ({"funded_by": "employee:someone"}, "$.funded_by"),
        ({"funded_by": "system:usage"}, "$.funded_by"),
        ({"surprise": 1}, "$"),
    ],
)
async def test_invalid_program_is_refused(
    api: Api, database_url: str, overrides: dict[str, Any], path: str
) -> None:
    await api.employee("someone")
    r = await api.c.put("/v1/grant-programs/p", json=program(**overrides))
    body = problem(r, 400, "invalid_request")
    paths = [e.get("path", "") for e in body.get("errors", [])] + [body.get("path", "")]
    assert any(p.startswith(path) for p in paths), body
    assert (await api.c.get("/v1/grant-programs/p")).status_code == 404


async def test_unknown_audience_members_answer_404(api: Api) -> None:
    problem(
        await api.c.put("/v1/grant-programs/p", json=program(audience={"departments": ["nope"]})),
        404,
        "department_not_found",
    )
    problem(
        await api.c.put("/v1/grant-programs/p", json=program(audience={"employees": ["nope"]})),
        404,
        "employee_not_found",
    )
    problem(
        await api.c.put("/v1/grant-programs/p", json=program(funded_by="department:nope")),
        404,
        "department_not_found",
    )


async def test_run_outside_the_program_or_before_its_start(api: Api, clock: FakeClock) -> None:
    """A cycle before the program's first, after its last, not started yet, or of
    an inactive program issues nothing (400)."""
    clock.set(datetime(2026, 3, 10, tzinfo=UTC))
    await api.employee("e1")
    await put_program(api, starts_on="2026-01-15", ends_on="2026-05-31")  # cycles 2026-02..05
    for cycle, why in (
        ("2026-01", "outside"),
        ("2026-06", "outside"),
        ("2026-04", "starts at"),
        ("2026-13", "cycle"),
    ):
        r = await api.c.post("/v1/grant-programs/monthly/runs", json={"cycle": cycle})
        assert why in problem(r, 400, "invalid_request")["detail"], r.text
    await put_program(api, starts_on="2026-01-15", active=False)
    r = await api.c.post("/v1/grant-programs/monthly/runs", json={"cycle": "2026-02"})
    assert "not active" in problem(r, 400, "invalid_request")["detail"]
    assert await api.available("employee:e1") == 0


# ---------------------------------------------------------------------------
# Exactly once
# ---------------------------------------------------------------------------


async def test_run_twice_issues_once(api: Api, clock: FakeClock, database_url: str) -> None:
    clock.set(T0)
    for emp in ("e1", "e2", "e3"):
        await api.employee(emp)
    await put_program(api)
    first = await run(api, "2026-01")
    assert first["issued"] == 3 and first["credits"] == 3000 and first["skipped"] == {}
    assert first["trigger"] == "api" and first["ran_at"] == ts6(T0)
    again = await run(api, "2026-01")
    assert again["issued"] == 0 and again["skipped"] == {"already_granted": 3}
    assert [a["available"] for a in [await api.account(f"employee:e{i}") for i in (1, 2, 3)]] == [
        1000
    ] * 3
    lot = (await lots(api, "employee:e1"))[0]
    assert lot["expires_at"] == "2026-02-01T00:00:00.000000Z"
    assert lot["effective_at"] == "2026-01-01T00:00:00.000000Z"
    txn = (await api.c.get(f"/v1/transactions/{lot['grant_transaction_id']}")).json()
    assert txn["kind"] == "grant"
    assert txn["details"]["program"] == "monthly" and txn["details"]["cycle"] == "2026-01"
    assert [e["amount"] for e in txn["entries"]] == [1000, -1000]
    runs = (await api.c.get("/v1/grant-programs/monthly/runs")).json()["items"]
    assert [r["id"] for r in runs] == [again["id"], first["id"]]
    assert len(await grants_of(database_url)) == 3
    await assert_audit_clean(database_url)


async def test_concurrent_runs_issue_once(api: Api, clock: FakeClock, database_url: str) -> None:
    """Two runs of the same cycle at once (two replicas): one grant per employee."""
    clock.set(T0)
    for i in range(20):
        await api.employee(f"e{i:02}")
    await put_program(api)
    results = await asyncio.gather(*(run(api, "2026-01") for _ in range(4)))
    assert sum(r["issued"] for r in results) == 20
    assert sorted(r["skipped"].get("already_granted", 0) for r in results) == [0, 20, 20, 20]
    rows = await grants_of(database_url)
    assert len(rows) == 20 and {r["employee_id"] for r in rows} == {f"e{i:02}" for i in range(20)}
    for i in range(20):
        assert await api.available(f"employee:e{i:02}") == 1000
    r = await api.c.get("/v1/accounts/system:issuance")
    assert r.json()["posted"] == -20_000
    await assert_audit_clean(database_url)


async def test_offboarded_employees_are_skipped(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    clock.set(T0)
    for emp in ("e1", "e2"):
        await api.employee(emp)
    r = await api.c.post("/v1/employees/e2/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    await put_program(api)
    result = await run(api, "2026-01")
    assert result["issued"] == 1 and result["skipped"] == {"offboarded": 1}
    assert result["skipped_employees"] == [{"employee": "e2", "reason": "offboarded"}]
    assert await api.available("employee:e1") == 1000
    assert [g["employee_id"] for g in await grants_of(database_url)] == ["e1"]


async def test_audience_by_department_and_by_name(api: Api, clock: FakeClock) -> None:
    clock.set(T0)
    await api.employee("a1", "eng")
    await api.employee("a2", "eng")
    await api.employee("b1", "ops")
    await put_program(api, "eng-only", audience={"departments": ["eng"]})
    await put_program(api, "named", audience={"employees": ["b1"]}, amount=7)
    assert (await run(api, "2026-01", "eng-only"))["issued"] == 2
    assert (await run(api, "2026-01", "named"))["issued"] == 1
    assert [await api.available(f"employee:{e}") for e in ("a1", "a2", "b1")] == [1000, 1000, 7]


# ---------------------------------------------------------------------------
# Cycles and the scheduler
# ---------------------------------------------------------------------------


async def test_scheduler_catches_up_after_an_outage(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Down from before January's start until mid-April: the scheduler issues
    January to April once each, oldest first, each lot expiring with its own
    cycle; then nothing more until May starts, and never past ends_on."""
    clock.set(datetime(2025, 12, 20, tzinfo=UTC))
    await api.employee("e1")
    await put_program(api, ends_on="2026-05-15")
    assert await schedule(client) == []  # the first cycle has not started
    clock.set(datetime(2026, 4, 14, 9, tzinfo=UTC))
    runs = await schedule(client)
    assert [(r["cycle"], r["issued"], r["trigger"]) for r in runs] == [
        (c, 1, "scheduler") for c in ("2026-01", "2026-02", "2026-03", "2026-04")
    ]
    assert await schedule(client) == []
    conn = await service_db.connect(database_url)
    try:
        expiries = await conn.fetch(
            "SELECT g.cycle, tl_ts(l.effective_at) AS starts, tl_ts(l.expires_at) AS ends "
            "FROM program_grants g JOIN lots l ON l.id = g.lot_id ORDER BY g.cycle"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in expiries] == [
        (f"2026-{m:02}", f"2026-{m:02}-01T00:00:00.000000Z", f"2026-{m + 1:02}-01T00:00:00.000000Z")
        for m in (1, 2, 3, 4)
    ]
    assert [lot["expires_at"] for lot in await lots(api, "employee:e1")] == [
        "2026-05-01T00:00:00.000000Z"
    ]
    # Past cycles expired with their cycle: only April's grant is spendable.
    assert await api.available("employee:e1") == 1000
    clock.set(datetime(2026, 4, 30, 23, 59, 59, tzinfo=UTC))
    assert await schedule(client) == []
    clock.set(datetime(2026, 5, 1, tzinfo=UTC))
    assert [r["cycle"] for r in await schedule(client)] == ["2026-05"]
    clock.set(datetime(2026, 9, 1, tzinfo=UTC))
    assert await schedule(client) == []  # ends_on 2026-05-15: May was the last cycle
    rows = await grants_of(database_url)
    assert [r["cycle"] for r in rows] == ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05"]
    await sweep(client)
    assert await api.available("employee:e1") == 0
    metrics = (await client.get("/metrics")).text
    assert 'tokenledger_program_grants_total{outcome="issued",program="monthly"} 5.0' in metrics
    assert 'tokenledger_program_scheduler_last_run_timestamp_seconds{program="monthly"}' in metrics
    await assert_audit_clean(database_url)


async def test_scheduler_skips_inactive_programs_and_manual_runs(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    clock.set(datetime(2025, 12, 20, tzinfo=UTC))
    await api.employee("e1")
    await put_program(api, "paused", active=False)
    await put_program(api, "manual")
    clock.set(datetime(2026, 2, 10, tzinfo=UTC))
    await run(api, "2026-02", "manual")
    assert [(r["program"], r["cycle"]) for r in await schedule(client)] == [("manual", "2026-01")]


async def test_scheduler_does_not_catch_up_a_pause(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """Paused in January and resumed in April: the scheduler owes April, not the
    cycles that ended while the program was inactive (those stay available to
    an explicit run). A program created mid-cycle owes that cycle."""
    clock.set(datetime(2026, 1, 5, tzinfo=UTC))
    await api.employee("e1")
    created = await put_program(api, expiry=None)
    assert created["activated_at"] == ts6(datetime(2026, 1, 5, tzinfo=UTC))
    assert [r["cycle"] for r in await schedule(client)] == ["2026-01"]
    clock.set(datetime(2026, 1, 20, tzinfo=UTC))
    paused = await put_program(api, expiry=None, active=False)
    assert paused["activated_at"] is None
    clock.set(datetime(2026, 4, 10, tzinfo=UTC))
    assert await schedule(client) == []
    resumed = await put_program(api, expiry=None)
    assert resumed["activated_at"] == ts6(datetime(2026, 4, 10, tzinfo=UTC))
    assert [r["cycle"] for r in await schedule(client)] == ["2026-04"]
    edited = await put_program(api, expiry=None, amount=7)  # still active: unchanged
    assert edited["activated_at"] == resumed["activated_at"]
    assert await api.available("employee:e1") == 2000


async def test_cycles_follow_local_midnight_across_dst(api: Api, clock: FakeClock) -> None:
    """New York: March's cycle starts at 05:00Z (EST) and ends at 04:00Z (EDT);
    November's starts at 04:00Z and ends at 05:00Z."""
    await api.employee("e1")
    await put_program(api, time_zone="America/New_York")
    cases = {
        datetime(2026, 3, 15, tzinfo=UTC): ("2026-03", "2026-03-01T05:00", "2026-04-01T04:00"),
        datetime(2026, 11, 15, tzinfo=UTC): ("2026-11", "2026-11-01T04:00", "2026-12-01T05:00"),
        # 03:30Z on 1 April is still 31 March, 23:30 in New York.
        datetime(2026, 4, 1, 3, 30, tzinfo=UTC): (
            "2026-03",
            "2026-03-01T05:00",
            "2026-04-01T04:00",
        ),
    }
    for now, (cycle, start, end) in cases.items():
        clock.set(now)
        current = (await api.c.get("/v1/grant-programs/monthly")).json()["current_cycle"]
        assert current == {
            "cycle": cycle,
            "starts_at": f"{start}:00.000000Z",
            "ends_at": f"{end}:00.000000Z",
        }
    clock.set(datetime(2026, 3, 1, 4, 59, 59, tzinfo=UTC))  # 23:59:59 on 28 Feb in New York
    r = await api.c.post("/v1/grant-programs/monthly/runs", json={"cycle": "2026-03"})
    problem(r, 400, "invalid_request")
    clock.set(datetime(2026, 3, 1, 5, tzinfo=UTC))
    assert (await run(api, "2026-03"))["issued"] == 1
    (lot,) = await lots(api, "employee:e1")
    assert lot["effective_at"] == "2026-03-01T05:00:00.000000Z"
    assert lot["expires_at"] == "2026-04-01T04:00:00.000000Z"
    clock.set(datetime(2026, 4, 1, 3, 59, 59, 999999, tzinfo=UTC))
    assert await api.available("employee:e1") == 1000
    clock.set(datetime(2026, 4, 1, 4, tzinfo=UTC))
    assert await api.available("employee:e1") == 0


async def test_day_28_in_february(api: Api, clock: FakeClock) -> None:
    await api.employee("e1")
    await put_program(api, cadence={"every": "month", "day": 28}, starts_on="2026-02-01")
    clock.set(datetime(2026, 2, 27, 23, tzinfo=UTC))
    body = (await api.c.get("/v1/grant-programs/monthly")).json()
    assert body["current_cycle"] is None  # January's cycle is before the program
    assert body["next_cycle"]["starts_at"] == "2026-02-28T00:00:00.000000Z"
    clock.set(datetime(2026, 3, 27, tzinfo=UTC))
    assert (await run(api, "2026-02"))["issued"] == 1
    (lot,) = await lots(api, "employee:e1")
    assert lot["effective_at"] == "2026-02-28T00:00:00.000000Z"
    assert lot["expires_at"] == "2026-03-28T00:00:00.000000Z"
    body = (await api.c.get("/v1/grant-programs/monthly")).json()
    assert body["current_cycle"]["cycle"] == "2026-02"


async def test_after_days_and_never_expiry(api: Api, clock: FakeClock) -> None:
    clock.set(T0)
    await api.employee("e1")
    await put_program(api, "ten-days", expiry={"after_days": 10})
    await put_program(api, "forever", expiry=None)
    await run(api, "2026-01", "ten-days")
    await run(api, "2026-01", "forever")
    expiries = sorted((lot["expires_at"] or "never") for lot in await lots(api, "employee:e1"))
    assert expiries == ["2026-01-11T00:00:00.000000Z", "never"]


# ---------------------------------------------------------------------------
# Rollover
# ---------------------------------------------------------------------------


async def test_rollover_below_equal_above_cap_and_zero(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """At the cycle's end up to rollover_max of what is left moves to a lot that
    expires at the end of the next cycle, exact at the instant (before the
    sweeper writes it); the rolled credits never roll again."""
    clock.set(T0)
    spend = {"below": 800, "equal": 700, "above": 300, "zero": 1000}
    for emp in spend:
        await api.employee(emp)
    await put_program(api, rollover_max=300)
    await run(api, "2026-01")
    for emp, amount in spend.items():
        r = await api.debit(f"employee:{emp}", amount)
        assert r.status_code == 201, r.text
    expected = {"below": 200, "equal": 300, "above": 300, "zero": 0}
    clock.set(datetime(2026, 2, 1, tzinfo=UTC))
    for emp, amount in expected.items():
        account = await api.account(f"employee:{emp}")
        assert account["available"] == amount, (emp, account)
        if amount:
            assert account["expiring"] == [
                {"amount": amount, "expires_at": "2026-03-01T00:00:00.000000Z"}
            ]

    async def posted_at(emp: str, at: str) -> int:
        r = await api.c.get(f"/v1/accounts/employee:{emp}/balance", params={"at": at})
        assert r.status_code == 200, r.text
        return int(r.json()["posted"])

    later = "2026-02-10T00:00:00Z"
    for emp, amount in expected.items():  # as-of, before the rollover is written
        assert await posted_at(emp, later) == amount, emp
    await sweep(client)
    for emp, amount in expected.items():
        assert await posted_at(emp, later) == amount, emp  # and after
        assert await posted_at(emp, "2026-01-31T23:59:59Z") == 1000 - spend[emp], emp
        assert await api.available(f"employee:{emp}") == amount
        live = [lot for lot in await lots(api, f"employee:{emp}") if lot["remaining"] > 0]
        assert [(lot["amount"], lot["expires_at"]) for lot in live] == (
            [(amount, "2026-03-01T00:00:00.000000Z")] if amount else []
        )
    r = await api.c.get("/v1/transactions", params={"kind": "rollover", "limit": 50})
    assert len(r.json()["items"]) == 3
    # February's own grant (not run here) aside, the rolled credits die with February.
    clock.set(datetime(2026, 3, 1, tzinfo=UTC))
    await sweep(client)
    for emp in expected:
        assert await api.available(f"employee:{emp}") == 0
    r = await api.c.get("/v1/transactions", params={"kind": "rollover", "limit": 50})
    assert len(r.json()["items"]) == 3
    await assert_audit_clean(database_url)


async def test_reserved_credits_at_the_cycle_end_do_not_roll_over(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """700 left, 400 of them held by a reservation that outlives the cycle: 300
    are free at the end, so min(300, cap 250) = 250 roll over. The reservation,
    released later, frees credits of an expired lot: they expire at once."""
    clock.set(T0)
    await api.employee("e1")
    await put_program(api, rollover_max=250)
    await run(api, "2026-01")
    assert (await api.debit("employee:e1", 300)).status_code == 201
    clock.set(datetime(2026, 1, 31, 12, tzinfo=UTC))
    r = await api.c.post(
        "/v1/reservations",
        json={"account": "employee:e1", "amount": 400, "ttl_seconds": 86400},
        headers=key(),
    )
    assert r.status_code == 201, r.text
    reservation = r.json()["id"]
    clock.set(datetime(2026, 2, 1, 6, tzinfo=UTC))
    account = await api.account("employee:e1")
    assert account["available"] == 250 and account["reserved"] == 400
    r = await api.c.post(f"/v1/reservations/{reservation}/release", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert await api.available("employee:e1") == 250
    account = await api.account("employee:e1")
    assert account["posted"] == 250 and account["reserved"] == 0
    await sweep(client)
    assert await api.available("employee:e1") == 250
    await assert_audit_clean(database_url)


async def test_reservation_that_expired_before_the_cycle_end_rolls_its_credits(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """A hold whose reservation expired before the cycle's end held nothing at
    that instant: those credits count as free for the rollover, even when no
    one wrote the reservation's expiry in between."""
    clock.set(datetime(2026, 1, 31, 12, tzinfo=UTC))
    await api.employee("e1")
    await put_program(api, rollover_max=5000)
    await run(api, "2026-01")
    r = await api.c.post(
        "/v1/reservations",
        json={"account": "employee:e1", "amount": 600, "ttl_seconds": 60},
        headers=key(),
    )
    assert r.status_code == 201, r.text
    clock.set(datetime(2026, 2, 1, 1, tzinfo=UTC))
    assert await api.available("employee:e1") == 1000
    await sweep(client)
    assert await api.available("employee:e1") == 1000
    await assert_audit_clean(database_url)


# ---------------------------------------------------------------------------
# Department budgets
# ---------------------------------------------------------------------------


async def test_department_budget_covers_part_of_the_audience(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A department holding 250 funds 100-credit grants for the first two
    employees by id; the other two are skipped for insufficient budget, and
    the department keeps 50, never below zero. Funding it later lets a second
    run issue the rest."""
    clock.set(T0)
    await api.department("eng")
    for emp in ("d", "b", "a", "c"):
        await api.employee(emp, "eng")
    r = await api.transfer("system:issuance", "department:eng", 250)
    assert r.status_code == 201, r.text
    await put_program(
        api, amount=100, funded_by="department:eng", audience={"departments": ["eng"]}
    )
    result = await run(api, "2026-01")
    assert result["issued"] == 2 and result["credits"] == 200
    assert result["skipped"] == {"insufficient_budget": 2}
    assert result["skipped_employees"] == [
        {"employee": "c", "reason": "insufficient_budget"},
        {"employee": "d", "reason": "insufficient_budget"},
    ]
    assert [await api.available(f"employee:{e}") for e in "abcd"] == [100, 100, 0, 0]
    assert await api.available("department:eng") == 50
    (lot,) = await lots(api, "employee:a")
    assert lot["funded_by"] == "department:eng"
    r = await api.transfer("system:issuance", "department:eng", 1000)
    assert r.status_code == 201, r.text
    again = await run(api, "2026-01")
    assert again["issued"] == 2 and again["skipped"] == {"already_granted": 2}
    assert [await api.available(f"employee:{e}") for e in "abcd"] == [100] * 4
    assert await api.available("department:eng") == 850
    await assert_audit_clean(database_url)


async def test_department_lot_expiry_bounds_the_grant(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Department credits that expire mid-cycle make a grant lot that expires
    with them (and such a lot does not roll over)."""
    clock.set(T0)
    await api.department("eng")
    await api.employee("a", "eng")
    await api.employee("boss", "eng")
    grant = await api.grant("boss", 500, expires_at="2026-01-20T00:00:00Z")
    r = await api.transfer("employee:boss", "department:eng", 500)
    assert r.status_code == 201, r.text
    await put_program(
        api,
        amount=100,
        funded_by="department:eng",
        audience={"employees": ["a"]},
        rollover_max=50,
    )
    assert (await run(api, "2026-01"))["issued"] == 1
    (lot,) = await lots(api, "employee:a")
    assert lot["expires_at"] == "2026-01-20T00:00:00.000000Z"
    assert grant["lot"]["expires_at"] == "2026-01-20T00:00:00.000000Z"
    await assert_audit_clean(database_url)


# ---------------------------------------------------------------------------
# Onboarding
# ---------------------------------------------------------------------------


async def test_onboarded_mid_cycle_gets_the_grant_at_once(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    await api.employee("early")
    await put_program(api)
    await run(api, "2026-04")
    clock.set(datetime(2026, 4, 16, tzinfo=UTC))
    await api.employee("late")
    assert await api.available("employee:late") == 1000
    # Updating the employee, or running the cycle again, issues nothing more.
    await api.employee("late")
    assert (await run(api, "2026-04"))["skipped"] == {"already_granted": 2}
    assert await api.available("employee:late") == 1000
    runs = (await api.c.get("/v1/grant-programs/monthly/runs")).json()["items"]
    assert [r["trigger"] for r in runs] == ["api", "onboarding", "api"]
    assert runs[1]["issued"] == 1
    assert len(await grants_of(database_url)) == 2
    await assert_audit_clean(database_url)


async def test_onboarded_mid_cycle_is_prorated(api: Api, clock: FakeClock) -> None:
    """Joining with 15 of April's 30 days left gets half; moving into the
    audience department mid-cycle counts as joining."""
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    await api.department("eng")
    await api.department("ops")
    await put_program(api, prorate=True, audience={"departments": ["eng"]})
    await run(api, "2026-04")
    clock.set(datetime(2026, 4, 16, tzinfo=UTC))
    await api.employee("late", "eng")
    assert await api.available("employee:late") == 500
    (lot,) = await lots(api, "employee:late")
    assert lot["effective_at"] == "2026-04-16T00:00:00.000000Z"
    assert lot["expires_at"] == "2026-05-01T00:00:00.000000Z"
    await api.employee("mover", "ops")
    assert await api.available("employee:mover") == 0
    clock.set(datetime(2026, 4, 22, tzinfo=UTC))  # 9 of 30 days left
    await api.employee("mover", "eng")
    assert await api.available("employee:mover") == 300
    await api.employee("mover", "ops")
    await api.employee("mover", "eng")
    assert await api.available("employee:mover") == 300  # once per cycle


async def test_onboarding_outside_the_program_issues_nothing(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    clock.set(datetime(2025, 12, 15, tzinfo=UTC))
    await put_program(api)
    await api.employee("early")
    assert await api.available("employee:early") == 0
    assert (await api.c.get("/v1/grant-programs/monthly/runs")).json()["items"] == []
    assert await grants_of(database_url) == []


async def test_program_run_is_set_based(api: Api, clock: FakeClock, database_url: str) -> None:
    """A run of 300 employees is one statement's worth of work: it leaves one
    grant transaction per employee with versions and balances the audit accepts."""
    clock.set(T0)
    conn = await service_db.connect(database_url)
    try:
        await conn.execute("INSERT INTO departments (id, name) VALUES ('eng', 'Eng')")
        await conn.execute(
            "INSERT INTO employees (id, name, email, department) "
            "SELECT 'e' || i, 'E', 'e@example.com', 'eng' FROM generate_series(1, 300) i"
        )
        await conn.execute(
            "INSERT INTO accounts (address, type, ref) "
            "SELECT 'employee:e' || i, 'employee', 'e' || i FROM generate_series(1, 300) i"
        )
    finally:
        await conn.close()
    await put_program(api)
    result = await run(api, "2026-01")
    assert result["issued"] == 300 and result["credits"] == 300_000
    issuance = await api.account("system:issuance")
    assert issuance["posted"] == -300_000
    await assert_audit_clean(database_url)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def small_batches(client: AsyncTestClient[Any], size: int) -> None:
    ledger = client.app.state.ledger
    ledger.config = msgspec.structs.replace(ledger.config, program_run_batch_size=size)


async def test_run_in_batches_reports_one_run(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Batches of two: the run's totals, skips (in employee-id order) and
    department budget come out as if it were one transaction."""
    small_batches(client, 2)
    clock.set(T0)
    await api.department("eng")
    for emp in ("a", "b", "c", "d", "e"):
        await api.employee(emp, "eng")
    r = await api.c.post("/v1/employees/b/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    r = await api.transfer("system:issuance", "department:eng", 250)
    assert r.status_code == 201, r.text
    await put_program(api, amount=100, funded_by="department:eng")
    result = await run(api, "2026-01")
    assert result["issued"] == 2 and result["credits"] == 200
    assert result["skipped"] == {"offboarded": 1, "insufficient_budget": 2}
    assert [s["employee"] for s in result["skipped_employees"]] == ["b", "d", "e"]
    assert result["completed_at"] == ts6(T0)
    assert [await api.available(f"employee:{e}") for e in "acde"] == [100, 100, 0, 0]
    runs = (await api.c.get("/v1/grant-programs/monthly/runs")).json()["items"]
    assert len(runs) == 1 and runs[0] == result
    await assert_audit_clean(database_url)


async def test_a_run_stopped_half_way_is_completed_by_the_scheduler(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Only the first batch of a run committed (the replica died): the run stays
    incomplete, the scheduler still owes the cycle, and its run issues the
    rest, each grant once."""
    clock.set(T0)
    for i in range(5):
        await api.employee(f"e{i}")
    await put_program(api)
    ledger = client.app.state.ledger
    ctx = ledger.context_json(SCHEDULER)
    first = await ledger.fetchval(
        "run_program", "monthly", "2026-01", "scheduler", ctx, None, None, 2
    )
    assert first["next"] == "e1" and first["run"]["completed_at"] is None
    assert first["run"]["issued"] == 2
    runs = await schedule(client)
    assert [(r["cycle"], r["issued"], r["skipped"]) for r in runs] == [
        ("2026-01", 3, {"already_granted": 2})
    ]
    assert await schedule(client) == []
    assert len(await grants_of(database_url)) == 5
    for i in range(5):
        assert await api.available(f"employee:e{i}") == 1000
    await assert_audit_clean(database_url)


async def test_two_schedulers_at_once_issue_once(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Two replicas' schedulers catching up the same three cycles at the same
    time: one grant per (cycle, employee), and no lost cycle."""
    small_batches(client, 3)
    clock.set(datetime(2025, 12, 2, tzinfo=UTC))
    for i in range(7):
        await api.employee(f"e{i}")
    await put_program(api, expiry=None)
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))
    first, second = await asyncio.gather(schedule(client), schedule(client))
    issued = {c: 0 for c in ("2026-01", "2026-02", "2026-03")}
    for r in first + second:
        issued[r["cycle"]] += r["issued"]
    assert issued == {"2026-01": 7, "2026-02": 7, "2026-03": 7}
    assert len(await grants_of(database_url)) == 21
    for i in range(7):
        assert await api.available(f"employee:e{i}") == 3000
    assert await schedule(client) == []
    await assert_audit_clean(database_url)
