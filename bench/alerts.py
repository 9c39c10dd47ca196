"""What a low-balance alert costs a debit: PostgreSQL CPU per debit, with and
without the balance.low trigger and with and without a threshold set.

`python -m bench.alerts [--debits N]` starts a throwaway PostgreSQL
(service/devdb.py), applies schema.sql and gives one wallet enough credits, then
runs the same debits (each with its own Idempotency-Key, as the service
sends them) in four set-ups, one after another on one connection:

* no_trigger: the accounts_balance_low trigger dropped (the cost before
  issue 14);
* no_alert: the trigger, on a wallet without thresholds (its WHEN is false);
* armed: a threshold far below the balance (the WHEN is false until it is
  crossed, the usual case of a wallet with alerts);
* below: the balance below every threshold (WHEN false again: nothing left
  to cross until it rises);

each through tl_execute (one debit per transaction) and tl_execute_batch
(coalesced batches of 32). Measured: the CPU-seconds of the backend serving
the connection (/proc/<pid>/stat), per debit. The machine may be shared:
compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
import uuid
from typing import Any

import asyncpg

from bench import cpu
from bench.postgres import provision
from service import db as service_db
from service import migrate

CTX: dict[str, Any] = {"actor": "bench", "request_id": "alerts", "now": None}
BATCH = 32


async def _setup(dsn: str) -> None:
    conn = await service_db.connect(dsn)
    try:
        await conn.fetchval("SELECT tl_op_put_department($1, $2)", {"id": "eng", "name": "E"}, CTX)
        await conn.fetchval(
            "SELECT tl_op_put_employee($1, $2)",
            {"id": "e1", "name": "E", "email": "e@example.com", "department": "eng"},
            CTX,
        )
        await conn.fetchval(
            "SELECT tl_execute('bench', NULL, NULL, 'grant', 201, $1, $2)",
            {"employee": "e1", "amount": 10**15, "reason": "spot_bonus"},
            CTX,
        )
    finally:
        await conn.close()


def _key(n: int) -> tuple[str, bytes]:
    k = f"{uuid.uuid4().hex}-{n}"
    return k, hashlib.sha256(k.encode()).digest()


async def _run(conn: asyncpg.Connection, pid: int, debits: int, batched: bool) -> float:
    """CPU-seconds of the backend per debit."""
    args = {"account": "employee:e1", "amount": 1}
    before = cpu.read_stat(pid)
    assert before is not None, "the backend's /proc entry is not readable"
    if batched:
        for start in range(0, debits, BATCH):
            n = min(BATCH, debits - start)
            keys = [_key(start + i) for i in range(n)]
            await conn.fetchval(
                "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7)",
                ["bench"] * n,
                [k for k, _ in keys],
                [h for _, h in keys],
                ["debit"] * n,
                [201] * n,
                [args] * n,
                [CTX] * n,
            )
    else:
        for i in range(debits):
            k, h = _key(i)
            await conn.fetchval(
                "SELECT tl_execute('bench', $1, $2, 'debit', 201, $3, $4)", k, h, args, CTX
            )
    after = cpu.read_stat(pid)
    assert after is not None
    return (after[1] - before[1]) / debits


async def measure(dsn: str, debits: int, rounds: int) -> dict[tuple[str, bool], float]:
    """On a database with schema.sql and nothing else: CPU-seconds per debit by
    (set-up, batched), the median of `rounds`."""
    await _setup(dsn)
    conn = await service_db.connect(dsn)
    try:
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        ddl = migrate.schema_sql()
        start = ddl.index("DROP TRIGGER IF EXISTS accounts_balance_low")
        end = ddl.index("EXECUTE FUNCTION tl_balance_low();", start)
        create_trigger = ddl[start : end + len("EXECUTE FUNCTION tl_balance_low();")]
        setups = {
            "no_trigger": ["DROP TRIGGER IF EXISTS accounts_balance_low ON accounts"],
            "no_alert": [create_trigger, "DELETE FROM account_alerts"],
            "armed": [_alerts(1000)],
            "below": [_alerts(2 * 10**15)],
        }
        results: dict[tuple[str, bool], list[float]] = {}
        await _run(conn, pid, max(1, debits // 4), False)  # warm the plan caches
        for _ in range(rounds):
            for name, statements in setups.items():
                for statement in statements:
                    await conn.execute(statement)
                for batched in (False, True):
                    per = await _run(conn, pid, debits, batched)
                    results.setdefault((name, batched), []).append(per)
        events = await conn.fetchval("SELECT count(*) FROM outbox WHERE type = 'balance.low'")
        assert events == 0, f"{events} balance.low events: no threshold was crossed"
    finally:
        await conn.close()
    return {k: sorted(v)[len(v) // 2] for k, v in results.items()}


def _alerts(threshold: int) -> str:
    return (
        'SELECT tl_put_alerts(\'{"address": "employee:e1", '
        f"\"low_balance\": [{threshold}]}}', '{{}}')"
    )


async def main_async(debits: int, rounds: int) -> None:
    db = await provision(None, f"tokenledger_alerts_{uuid.uuid4().hex[:8]}")
    try:
        await db.apply_schema()
        results = await measure(db.dsn, debits, rounds)
    finally:
        await db.drop()
    print(f"PostgreSQL backend CPU per debit, {debits} debits, median of {rounds} rounds:")
    print(f"{'set-up':<12} {'tl_execute':>14} {'batch of 32':>14}")
    for setup in ("no_trigger", "no_alert", "armed", "below"):
        single, batch = results[(setup, False)], results[(setup, True)]
        print(f"{setup:<12} {single * 1e6:>11.1f} us {batch * 1e6:>11.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debits", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    asyncio.run(main_async(args.debits, args.rounds))
    print(f"took {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
