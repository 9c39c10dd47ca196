"""On a year of history, no hot path reads a whole history table: a debit,
a reservation and its capture, a usage batch, the balance, the entries page,
the balance as of an instant and a series never start a sequential scan of
`lots`, `entries` or `usage_events` (issue 21; the lot filters that missed
their partial indexes made every debit scan all lots, seen only by counting).

Counted with the server's table statistics like tests/db/test_plans.py,
the service's connections' counters flushed first (tests/api/stats.py;
before that they were read before the service's backends had published
them, so the check saw only zeros), around each request repeated past the
five custom plans a prepared statement gets before PostgreSQL may switch it
to a generic one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench.year import build_year
from service import migrate
from tests.api.stats import table_counters

WATCHED = ("lots", "entries", "usage_events")
REPEAT = 7


async def seq_scans(db: asyncpg.Connection, client: Any) -> dict[str, int]:
    """Sequential scans so far, the service's own connections' included (they
    publish their counters only when flushed: tests/api/stats.py)."""
    counters = await table_counters(db, client, WATCHED)
    return {table: scans for table, (scans, _) in counters.items()}


async def test_no_hot_path_scans_a_history_table(db: asyncpg.Connection, client: Any) -> None:
    """Every hot-path request leaves the sequential-scan counts of lots,
    entries and usage_events where they were."""
    await migrate.migrate(db)
    await build_year(db, employees=150, entries=30_000, log=lambda _: None)
    await db.execute("VACUUM ANALYZE")
    heavy = "employee:emp-1"
    now = datetime.now(UTC)

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await client.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert r.status_code < 300, r.text
        return dict(r.json())

    async def get(path: str, **params: str) -> None:
        r = await client.get(path, params=params)
        assert r.status_code == 200, r.text

    async def debit() -> None:
        await post("/v1/debits", {"account": "employee:emp-5", "amount": 3})

    async def reserve_capture() -> None:
        rsv = await post("/v1/reservations", {"account": "employee:emp-6", "amount": 20})
        await post(f"/v1/reservations/{rsv['id']}/capture", {"amount": 15})

    async def usage() -> None:
        events = [
            {
                "source": "test",
                "event_id": uuid.uuid4().hex,
                "account": f"employee:emp-{n}",
                "model": "gpt-4o-mini",
                "input_tokens": 100,
                "output_tokens": 10,
            }
            for n in range(1, 21)
        ]
        r = await client.post("/v1/usage:batch", json={"events": events})
        assert r.status_code == 200, r.text

    steps = {
        "debit": debit,
        "reservation+capture": reserve_capture,
        "usage batch": usage,
        "balance": lambda: get(f"/v1/accounts/{heavy}"),
        "entries page": lambda: get(f"/v1/accounts/{heavy}/entries", limit="50"),
        "balance as of": lambda: get(
            f"/v1/accounts/{heavy}/balance", at=(now - timedelta(days=100)).isoformat()
        ),
        "30-day series": lambda: get(
            f"/v1/accounts/{heavy}/series",
            **{
                "from": (now - timedelta(days=30)).isoformat(),
                "to": now.isoformat(),
                "interval": "day",
            },
        ),
    }
    scanned: dict[str, dict[str, int]] = {}
    for name, step in steps.items():
        before = await seq_scans(db, client)
        for _ in range(REPEAT):
            await step()
        after = await seq_scans(db, client)
        if delta := {t: after[t] - before[t] for t in WATCHED if after[t] != before[t]}:
            scanned[name] = delta
    assert scanned == {}
    assert isinstance(client, httpx.AsyncClient)
