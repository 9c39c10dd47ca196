"""Single usage events in a coalesced batch (tl_execute_batch, op `usage`): claimed in key
order before any account is locked, as a single call and a usage batch claim theirs; an
event twice in one batch recorded once; and a claim given back when its event fails."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service import db as service_db
from tests.db.test_usage_claims import CTX, _event, _setup, _waits_for_lock

COST = 1000 * 2 + 100 * 8  # an _event at m1's price: 2 + 8 credits per 1k tokens
CLAIM_Y = """
INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                          output_tokens, cost, occurred_at, recorded_at)
SELECT tl_uuid7(), 'gw', 'y', a.id, 'm1', p.id, 1000, 100, 2800, now(), now()
  FROM accounts a, prices p WHERE a.address = 'employee:e1' AND p.model = 'm1'
ON CONFLICT (source, event_id) DO NOTHING
"""


async def _usage_batch(
    conn: asyncpg.Connection, events: list[dict[str, Any]], ctx: dict[str, Any] = CTX
) -> list[dict[str, Any]]:
    """tl_execute_batch of usage events, as the coalescer sends them: no keys."""
    n = len(events)
    out: list[dict[str, Any]] = await conn.fetchval(
        "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7)",
        ["meter"] * n,
        [None] * n,
        [None] * n,
        ["usage"] * n,
        [201] * n,
        events,
        [ctx] * n,
    )
    return out


async def _charged(conn: asyncpg.Connection) -> Any:
    return await conn.fetchval(
        "SELECT coalesce(sum(-amount), 0) FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.address = 'employee:e1' AND e.amount < 0"
    )


async def test_a_batch_claims_its_usage_events_before_it_waits_for_an_account(
    database_url: str,
) -> None:
    """While a batch waits for a wallet another transaction holds, the event it records is
    claimed already: a request for the same event waits for the batch (here it times out)
    rather than taking the event and then waiting for the wallet the batch would hold,
    the cycle a claim after the lock would make with a single call or a usage batch."""
    a = await service_db.connect(database_url)
    b = await service_db.connect(database_url)
    c = await service_db.connect(database_url)
    try:
        await _setup(a)
        b_pid = await b.fetchval("SELECT pg_backend_pid()")
        async with a.transaction():
            await a.execute("SELECT 1 FROM accounts WHERE address = 'employee:e1' FOR UPDATE")
            batch = asyncio.create_task(_usage_batch(b, [_event("x"), _event("y")]))
            # (until the batch waits for the wallet)
            assert await _waits_for_lock(a, b_pid), "the batch never waited for the wallet"
            # Another request's claim of y (as tl_record_usage makes it), rolled back.
            async with c.transaction():
                await c.execute("SET LOCAL lock_timeout = '200ms'")
                try:
                    await c.execute(CLAIM_Y)
                except asyncpg.LockNotAvailableError:
                    pass
                else:
                    raise AssertionError("event y was not claimed while the batch waited")
        x, y = await asyncio.wait_for(batch, 30)
        assert (x["status"], y["status"]) == (201, 201), (x, y)
        assert await _charged(a) == 2 * COST
    finally:
        for conn in (a, b, c):
            await conn.close()


async def test_an_event_twice_in_one_batch_is_recorded_once(database_url: str) -> None:
    """The second of two identical events in one batch answers 200 with the first's stored
    body and `status: "duplicate"`, and charges nothing; another body under the same
    (source, event_id) answers idempotency_key_reused."""
    conn = await service_db.connect(database_url)
    try:
        await _setup(conn)
        other = {**_event("x"), "input_tokens": 5}
        first, again, reused = await _usage_batch(conn, [_event("x"), _event("x"), other])
        assert first["status"] == 201 and first["body"]["cost"] == COST
        assert again == {
            "status": 200,
            "body": {**first["body"], "status": "duplicate"},
            "replayed": False,
        }
        assert reused["error"]["code"] == "idempotency_key_reused", reused
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 1
        assert await conn.fetchval("SELECT count(*) FROM transactions WHERE kind = 'usage'") == 1
        assert await _charged(conn) == COST
    finally:
        await conn.close()


async def test_an_event_refused_after_its_claim_gives_the_claim_back(database_url: str) -> None:
    """An event refused once its wallet is locked (here over its key's spend rate cap) is
    answered alone and stored nowhere, the other events of the batch record, and the same
    event sent again the next minute is recorded."""
    conn = await service_db.connect(database_url)
    try:
        await _setup(conn)
        now = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
        capped = {**CTX, "actor": "key:capped", "rate_limit": COST, "now": now.isoformat()}
        ok, over = await _usage_batch(conn, [_event("x"), _event("y")], capped)
        assert ok["status"] == 201, ok
        assert over["error"]["code"] == "key_rate_limited", over
        assert json.loads(over["error"]["hint"])["retry_after"] == 30
        stored = await conn.fetch("SELECT event_id FROM usage_events ORDER BY event_id")
        assert [r["event_id"] for r in stored] == ["x"]
        later = {**capped, "now": (now + timedelta(minutes=1)).isoformat()}
        [retried] = await _usage_batch(conn, [_event("y")], later)
        assert retried["status"] == 201, retried
        assert await _charged(conn) == 2 * COST
    finally:
        await conn.close()
