"""Key scopes by department and per-key spend rate caps (issue 11, defect 8), both checked
inside the operation's own database call: a key limited to departments charges only their
employees' wallets and department accounts (403 `forbidden`); a key capped at N credits a
minute has its (N+1)th credit refused (429 `key_rate_limited`, Retry-After) in single
calls, inside a coalesced batch and inside a usage batch, where only the offending item is
refused, nothing is written for it, other keys are unaffected, and the next minute (the
injected clock) it works again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from service import db, errors
from service.app import create_app
from service.config import Config
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, problem, running
from tests.api.test_auth import service_key
from tests.api.test_coalescing import fast_items, item, ledger_of

T = datetime(2030, 3, 4, 12, 0, 30, tzinfo=UTC)  # 30 s into a minute
# One credit per input token, nothing for output: a usage event costs its input tokens.
PRICE = {
    "model": "flat",
    "effective_from": "2029-01-01T00:00:00Z",
    "input_per_mtok": 1_000_000,
    "cached_input_per_mtok": 0,
    "output_per_mtok": 0,
}


async def limit_key(
    database_url: str, role: str, *, departments: Any = None, rate_limit: int | None = None
) -> tuple[str, str]:
    """A new service key with these limits: (its Authorization value, its actor id)."""
    secret = await service_key(database_url, role)
    conn = await db.connect(database_url)
    try:
        row = await conn.fetchrow(
            db.load_queries()["set_key_limits"], secret.split("_")[1], departments, rate_limit
        )
        assert row is not None
    finally:
        await conn.close()
    return f"Bearer {secret}", f"key:{row['id']}"


async def world(api: Api, clock: FakeClock) -> None:
    clock.set(T - timedelta(days=1))
    for emp, dept in (("e-eng", "eng"), ("e-ops", "ops")):
        await api.employee(emp, dept)
        await api.grant(emp, 10_000)
    for dept in ("eng", "ops"):
        r = await api.c.post(
            "/v1/transfers",
            json={"from": "system:issuance", "to": f"department:{dept}", "amount": 1_000},
            headers=key(),
        )
        assert r.status_code == 201, r.text
    r = await api.c.post("/v1/prices", json=PRICE, headers=key())
    assert r.status_code == 201, r.text
    clock.set(T)


def usage(event_id: str, tokens: int, account: str = "employee:e-eng") -> dict[str, Any]:
    return {
        "source": "gw",
        "event_id": event_id,
        "account": account,
        "model": "flat",
        "input_tokens": tokens,
        "output_tokens": 0,
    }


async def test_a_key_limited_to_departments_charges_only_their_accounts(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A meter key limited to eng debits, reserves and records usage for an eng employee
    and department:eng; ops's are refused 403 and nothing moves; in a usage batch only the
    ops event is rejected; an employee who moves to eng is in scope at once."""
    await world(api, clock)
    auth, _ = await limit_key(database_url, "meter", departments=["eng"])
    h = {"Authorization": auth}
    for account in ("employee:e-eng", "department:eng"):
        r = await api.c.post(
            "/v1/debits", json={"account": account, "amount": 5}, headers={**h, **key()}
        )
        assert r.status_code == 201, r.text
        r = await api.c.post(
            "/v1/reservations", json={"account": account, "amount": 5}, headers={**h, **key()}
        )
        assert r.status_code == 201, r.text
    before = await api.account("employee:e-ops")
    for account in ("employee:e-ops", "department:ops"):
        for path, body in (
            ("/v1/debits", {"account": account, "amount": 5}),
            ("/v1/reservations", {"account": account, "amount": 5}),
            ("/v1/usage", usage(f"out-{account}", 5, account)),
        ):
            r = await api.c.post(path, json=body, headers={**h, **key()})
            assert problem(r, 403, "forbidden")["account"] == account, (path, r.text)
    assert await api.account("employee:e-ops") == before
    r = await api.c.post(
        "/v1/usage:batch",
        json={"events": [usage("b1", 3), usage("b2", 4, "employee:e-ops"), usage("b3", 5)]},
        headers=h,
    )
    assert r.status_code == 200, r.text
    results = [(x["status"], x.get("code")) for x in r.json()["results"]]
    assert results == [("recorded", None), ("rejected", "forbidden"), ("recorded", None)]
    await api.employee("e-ops", "eng")
    r = await api.c.post(
        "/v1/debits", json={"account": "employee:e-ops", "amount": 5}, headers={**h, **key()}
    )
    assert r.status_code == 201, r.text
    await assert_audit_clean(database_url)


async def test_department_scope_in_a_coalesced_batch(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """In a coalesced batch, only the item outside the key's departments is refused, and
    its idempotency key is given back; the others go set-based."""
    await world(api, clock)
    ledger = ledger_of(api.c)
    ctx = {"departments": ["eng"]}
    inside = item("debit", {"account": "employee:e-eng", "amount": 2}, "d1")
    outside = item("debit", {"account": "employee:e-ops", "amount": 2}, "d2")
    other = item("debit", {"account": "department:eng", "amount": 2}, "d3")
    for i in (inside, outside, other):
        i.ctx.update(ctx, now=T.isoformat())
    assert await fast_items(ledger, [inside, outside, other]) == [True, False, True]
    results = await ledger._execute_batch([inside, outside, other])
    assert isinstance(results[1], errors.Forbidden), results
    assert [r["status"] for r in (results[0], results[2])] == [201, 201]
    assert await api.available("employee:e-ops") == 10_000


async def test_a_key_capped_per_minute_in_single_calls(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A key capped at 100 credits a minute: a debit of 60 and a reservation of 40 pass, the
    next credit is refused 429 with Retry-After (30 s to the minute's end) and nothing is
    written, a usage event too; another key is unaffected; the next minute it works again."""
    await world(api, clock)
    auth, _ = await limit_key(database_url, "meter", rate_limit=100)
    h = {"Authorization": auth}
    debit = {"account": "employee:e-eng", "amount": 60}
    assert (await api.c.post("/v1/debits", json=debit, headers={**h, **key()})).status_code == 201
    r = await api.c.post(
        "/v1/reservations", json={"account": "employee:e-eng", "amount": 40}, headers={**h, **key()}
    )
    assert r.status_code == 201, r.text
    before = await api.account("employee:e-eng")
    again = key()
    r = await api.c.post(
        "/v1/debits", json={"account": "employee:e-eng", "amount": 1}, headers={**h, **again}
    )
    body = problem(r, 429, "key_rate_limited")
    assert (body["limit"], body["spent"], body["requested"]) == (100, 100, 1)
    assert r.headers["Retry-After"] == "30"
    r = await api.c.post("/v1/usage", json=usage("u1", 1), headers=h)
    problem(r, 429, "key_rate_limited")
    assert await api.account("employee:e-eng") == before
    # Another key (the admin's) is not counted against this one.
    assert (await api.debit("employee:e-eng", 500)).status_code == 201
    clock.set(T + timedelta(seconds=30))  # the next minute
    r = await api.c.post(
        "/v1/debits", json={"account": "employee:e-eng", "amount": 1}, headers={**h, **again}
    )
    assert r.status_code == 201, r.text  # the refused key was given back
    r = await api.c.post("/v1/usage", json=usage("u1", 99), headers=h)
    assert r.status_code == 201, r.text
    r = await api.c.post("/v1/usage", json=usage("u2", 1), headers=h)
    problem(r, 429, "key_rate_limited")
    await assert_audit_clean(database_url)


async def test_a_key_capped_per_minute_in_a_coalesced_batch(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """In one coalesced batch, set-based, the debit or reservation that would pass the key's
    cap is refused alone (its idempotency key given back), a later smaller one still fits,
    and another caller's items in the batch are not counted; the next call knows the total."""
    await world(api, clock)
    ledger = ledger_of(api.c)
    capped = {"actor": "key:capped", "rate_limit": 10, "now": T.isoformat(), "admin": False}
    items = [
        item("debit", {"account": "employee:e-eng", "amount": 4}, "c1"),
        item(
            "reserve",
            {"account": "employee:e-eng", "amount": 4, "ttl_seconds": 60, "metadata": None},
            "c2",
        ),
        item("debit", {"account": "employee:e-eng", "amount": 4}, "c3"),  # 12 > 10
        item("debit", {"account": "employee:e-ops", "amount": 50}, "o1"),  # another caller
        item("debit", {"account": "employee:e-ops", "amount": 2}, "c4"),  # 10
    ]
    for i in items:
        if i.key != "o1":
            i.ctx.update(capped)
        else:
            i.ctx.update(now=T.isoformat())
    assert await fast_items(ledger, items) == [True] * 5
    results = await ledger._execute_batch(items)
    assert isinstance(results[2], errors.KeyRateLimited), results
    assert results[2].headers["Retry-After"] == "30"
    assert [results[k]["status"] for k in (0, 1, 3, 4)] == [201, 201, 201, 201]
    assert await api.available("employee:e-eng") == 10_000 - 8
    one = item("debit", {"account": "employee:e-eng", "amount": 1}, "c5")
    one.ctx.update(capped)
    with pytest.raises(errors.KeyRateLimited):
        await ledger._execute_one(one)
    # The refused item's key was given back: the same request, next minute, is applied.
    nxt = (T + timedelta(seconds=30)).isoformat()
    items[2].ctx.update(now=nxt)
    assert (await ledger._execute_batch([items[2]]))[0]["status"] == 201
    await assert_audit_clean(database_url)


async def test_a_key_capped_per_minute_in_a_usage_batch(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """In a usage batch of a key capped at 100, the event that would pass the cap is
    rejected alone and recorded nowhere; a later smaller one still fits."""
    await world(api, clock)
    auth, _ = await limit_key(database_url, "meter", rate_limit=100)
    events = [usage("e1", 60), usage("e2", 50), usage("e3", 40), usage("e4", 1)]
    r = await api.c.post(
        "/v1/usage:batch", json={"events": events}, headers={"Authorization": auth}
    )
    assert r.status_code == 200, r.text
    results = [(x["status"], x.get("code")) for x in r.json()["results"]]
    assert results == [
        ("recorded", None),
        ("rejected", "key_rate_limited"),
        ("recorded", None),
        ("rejected", "key_rate_limited"),
    ]
    assert await api.available("employee:e-eng") == 10_000 - 100
    r = await api.c.get("/v1/usage", params={"account": "employee:e-eng"})
    if r.status_code == 200:
        assert sorted(x["event_id"] for x in r.json()["items"]) == ["e1", "e3"]
    await assert_audit_clean(database_url)


async def test_a_capped_keys_rejected_usage_events_do_not_count(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Only what a usage batch charges counts against the key's cap: an event for an
    offboarded employee's closed wallet is rejected (account_closed) and leaves the key's
    minute untouched, so the events after it in the batch, and a single one after the
    batch, still fit the cap of 100."""
    await world(api, clock)
    r = await api.c.post("/v1/employees/e-ops/offboard", json={"memo": "left"}, headers=key())
    assert r.status_code == 200, r.text
    auth, actor = await limit_key(database_url, "meter", rate_limit=100)
    h = {"Authorization": auth}
    events = [usage("x1", 60, "employee:e-ops"), usage("x2", 50), usage("x3", 40)]
    r = await api.c.post("/v1/usage:batch", json={"events": events}, headers=h)
    assert r.status_code == 200, r.text
    results = [(x["status"], x.get("code")) for x in r.json()["results"]]
    assert results == [("rejected", "account_closed"), ("recorded", None), ("recorded", None)]
    assert await key_spent(database_url, actor) == 90
    r = await api.c.post("/v1/usage", json=usage("x4", 10), headers=h)
    assert r.status_code == 201, r.text
    r = await api.c.post("/v1/usage", json=usage("x5", 1), headers=h)
    problem(r, 429, "key_rate_limited")
    assert await api.available("employee:e-eng") == 10_000 - 100
    await assert_audit_clean(database_url)


async def test_a_wallet_closed_while_a_capped_batch_waits_gives_its_count_back(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A wallet closed after a capped key's usage batch counted its event against the cap,
    while the batch waits for the wallet's lock: the event is rejected (account_closed)
    and the key's minute counts only what the batch charged."""
    await world(api, clock)
    auth, actor = await limit_key(database_url, "meter", rate_limit=100)
    events = [usage("w1", 30), usage("w2", 45, "employee:e-ops")]
    holder = await db.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM accounts WHERE address = 'employee:e-ops' FOR UPDATE")
        post = asyncio.create_task(
            api.c.post("/v1/usage:batch", json={"events": events}, headers={"Authorization": auth})
        )
        # The batch has counted both events and waits for e-ops's row (the only
        # lock wait in this database).
        assert await lock_waits(holder) == 1
        await holder.execute(
            "UPDATE accounts SET status = 'closed' WHERE address = 'employee:e-ops'"
        )
        await tx.commit()
        r = await post
    finally:
        await holder.close()
    assert r.status_code == 200, r.text
    results = [(x["status"], x.get("code")) for x in r.json()["results"]]
    assert results == [("recorded", None), ("rejected", "account_closed")]
    assert await key_spent(database_url, actor) == 30


async def test_an_event_claimed_meanwhile_gives_a_capped_keys_count_back(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """An event of a capped key's usage batch that another request claims while the batch
    runs (its INSERT waits for that request, then finds the event recorded) answers
    `duplicate`, charges nothing and leaves nothing counted against the key."""
    await world(api, clock)
    auth, actor = await limit_key(database_url, "meter", rate_limit=100)
    events = [usage("m1", 30), usage("m2", 45)]
    holder = await db.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        # Another request records m2, uncommitted (as an uncapped caller).
        await holder.fetchval(
            "SELECT tl_record_usage_batch($1::jsonb, $2::jsonb)::text",
            [{**usage("m2", 45), "occurred_at": T.isoformat()}],
            {"actor": "admin", "now": T.isoformat()},
        )
        post = asyncio.create_task(
            api.c.post("/v1/usage:batch", json={"events": events}, headers={"Authorization": auth})
        )
        # The batch has counted both events and its claim of m2 waits for the holder
        # (the only lock wait in this database).
        assert await lock_waits(holder) == 1
        await tx.commit()
        r = await post
    finally:
        await holder.close()
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["recorded", "duplicate"]
    assert await key_spent(database_url, actor) == 30
    assert await api.available("employee:e-eng") == 10_000 - 75


async def lock_waits(conn: Any) -> int:
    """How many sessions of this database wait for a lock, once one does (or after 4 s)."""
    waiting = 0
    for _ in range(200):
        waiting = int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
        )
        if waiting:
            break
        await asyncio.sleep(0.02)
    return waiting


async def key_spent(database_url: str, actor: str) -> int:
    """What the key's current minute has counted (key_spend)."""
    conn = await db.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT spent FROM key_spend WHERE actor = $1", actor))
    finally:
        await conn.close()


async def test_new_departments_and_cap_reach_a_replica_that_cached_the_key(
    config: Config, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A replica that has the key cached (TTL 60 s, so only the NOTIFY can drop it) applies a
    key's new departments, then its new cap, at once."""
    await world(api, clock)
    auth, _ = await limit_key(database_url, "meter")
    prefix = auth.split("_")[1]
    config = msgspec.structs.replace(config, key_cache_ttl_seconds=60.0)
    async with running(app := create_app(config, clock=clock)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://replica.local"
        ) as c:
            h = {"Authorization": auth}
            body = {"account": "department:eng", "amount": 5}
            r = await c.post("/v1/debits", json=body, headers={**h, **key()})
            assert r.status_code == 201, r.text
            for departments, cap, expected in ((["ops"], None, 403), (None, 1, 429)):
                conn = await db.connect(database_url)
                try:
                    await conn.fetchrow(
                        db.load_queries()["set_key_limits"], prefix, departments, cap
                    )
                finally:
                    await conn.close()
                statuses: list[int] = []
                for _ in range(100):
                    r = await c.post("/v1/debits", json=body, headers={**h, **key()})
                    statuses.append(r.status_code)
                    if statuses[-1] == expected:
                        break
                    await asyncio.sleep(0.01)
                assert statuses[-1] == expected, statuses


def test_cli_sets_a_keys_departments_and_cap(database_url: str) -> None:
    """`keys create --departments --rate-limit` stores them; `keys scope` replaces them (an
    omitted one becomes unrestricted); a cap that is not a positive number is refused."""
    env = {**os.environ, "DATABASE_URL": database_url, "TOKENLEDGER_DATABASE_URL": database_url}

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603  # why: our own interpreter and module
            [sys.executable, "-m", "service", "keys", *args],
            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
            timeout=60, check=check,
        )  # fmt: skip

    secret = cli(
        "create", "--name", "gw", "--role", "meter", "--departments", "eng,ops",
        "--rate-limit", "100",
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    prefix = secret.split("_")[1]

    async def limits() -> tuple[Any, Any]:
        conn = await db.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT departments, rate_limit FROM api_keys WHERE prefix = $1", prefix
            )
        finally:
            await conn.close()
        assert row is not None
        return row["departments"], row["rate_limit"]

    assert asyncio.run(limits()) == (["eng", "ops"], 100)
    out = cli("scope", prefix, "--rate-limit", "5").stdout
    assert "departments any, credits 5/min" in out, out
    assert asyncio.run(limits()) == (None, 5)
    refused = cli("scope", prefix, "--rate-limit", "0", check=False)
    assert refused.returncode == 2 and "positive" in refused.stderr, refused.stderr
    assert asyncio.run(limits()) == (None, 5)
