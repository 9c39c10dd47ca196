"""Database-only timings of the batch write functions (issue 10, part 3).

Calls the SQL functions straight through asyncpg, without the service, so the
numbers are PostgreSQL's alone:

* ``tl_grant_batch`` with N grants to one wallet (wall time of the call);
* ``tl_record_usage_batch`` with C concurrent connections, each sending R
  batches of B events spread over A accounts that every connection shares:
  p50/p99 per batch, events/s, deadlock retries, and the CPU-seconds of all
  postgres processes (read from /proc) per event.

    python -m bench.sqlbatch --dsn postgresql://postgres@127.0.0.1:55432/postgres \
        [--schema schema.sql] [--grants 1000] [--clients 16] [--batch 500] [--rounds 6]

It creates (and drops) a database of its own on that server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

DB = "tl_bench_sqlbatch"
CTX = {"actor": "bench"}


def dsn_for(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


POSTMASTER: psutil.Process | None = None


def postgres_cpu() -> float:
    """CPU-seconds used so far by this server's postmaster and its children
    (backends, autovacuum, WAL writer, ...): other servers on the box don't count."""
    assert POSTMASTER is not None
    total = 0.0
    for p in [POSTMASTER, *POSTMASTER.children()]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def find_postmaster(dsn: str) -> None:
    global POSTMASTER
    conn = await asyncpg.connect(dsn)
    POSTMASTER = psutil.Process(
        psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
    )
    await conn.close()


async def setup(dsn: str, schema: str, accounts: int) -> None:
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB}"')
    await admin.close()
    conn = await asyncpg.connect(dsn_for(dsn, DB))
    await conn.execute(schema)
    ctx = json.dumps(CTX)
    await conn.execute('SELECT tl_op_put_department(\'{"id":"eng","name":"Eng"}\', $1)', ctx)
    await conn.execute(
        """SELECT tl_op_put_employee(jsonb_build_object('id', 'e-' || i, 'name', 'e' || i,
                  'email', 'e' || i || '@example.com', 'department', 'eng'), $1::jsonb)
           FROM generate_series(0, $2::int - 1) i""",
        ctx,
        accounts + 1,
    )
    await conn.execute(
        """SELECT tl_op_add_price('{"model": "m1", "effective_from": "2020-01-01T00:00:00Z",
                  "input_per_mtok": 2500000, "cached_input_per_mtok": 1250000,
                  "output_per_mtok": 10000000}', $1)""",
        ctx,
    )
    # Every wallet gets a few lots (one that expires far away, some never), like a real one.
    await conn.execute(
        """SELECT tl_op_grant(jsonb_build_object('employee', 'e-' || i, 'amount', 1000000000,
                  'reason', 'spot_bonus',
                  'expires_at', CASE WHEN g = 0 THEN '2100-01-01T00:00:00Z' END), $1::jsonb)
           FROM generate_series(0, $2::int - 1) i, generate_series(0, 2) g""",
        ctx,
        accounts,
    )
    await conn.execute("VACUUM ANALYZE")
    await conn.close()


async def bench_grants(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn_for(dsn, DB))
    await conn.execute("SET statement_timeout = '120s'")
    wallet = "e-grants"
    await conn.execute(
        """SELECT tl_op_put_employee('{"id": "e-grants", "name": "g", "email": "g@example.com",
                  "department": "eng"}', $1)""",
        json.dumps(CTX),
    )
    for label in ("first", "second (replays)"):
        items = [
            {
                "key": f"k-{i}",
                "hash": f"{i:064x}",
                "grant": {
                    "employee": wallet,
                    "amount": 10 + i,
                    "reason": "monthly_allotment",
                    "expires_at": "2100-01-01T00:00:00Z" if i % 2 else None,
                },
            }
            for i in range(n)
        ]
        cpu0, t0 = postgres_cpu(), time.perf_counter()
        out = json.loads(
            await conn.fetchval(
                "SELECT tl_grant_batch('bench', $1::jsonb, $2::jsonb)::text",
                json.dumps(items),
                json.dumps(CTX),
            )
        )
        wall, cpu = time.perf_counter() - t0, postgres_cpu() - cpu0
        statuses: dict[str, int] = {}
        for r in out["results"]:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        print(
            f"grants:batch {n} to one wallet, {label}: {wall * 1000:.0f} ms wall, "
            f"{cpu * 1000:.0f} ms postgres CPU, {statuses}"
        )
    posted = await conn.fetchval("SELECT posted FROM accounts WHERE address = 'employee:e-grants'")
    assert posted == sum(10 + i for i in range(n)), posted
    await conn.close()


async def bench_usage(
    dsn: str,
    clients: int,
    batch: int,
    rounds: int,
    accounts: int,
    seed: int,
    tagged: bool = False,
) -> None:
    conns = [await asyncpg.connect(dsn_for(dsn, DB)) for _ in range(clients)]
    for c in conns:
        await c.execute("SET statement_timeout = '60s'")
    counter = iter(range(10**9))
    rng = random.Random(seed)  # noqa: S311  # why: load shape, not secrets
    latencies: list[float] = []
    retries = 0
    events_done = 0

    def make_batch() -> str:
        events = []
        for _ in range(batch):
            events.append(
                {
                    "source": "bench",
                    "event_id": f"ev-{next(counter)}",
                    "account": f"employee:e-{rng.randrange(accounts)}",
                    "model": "m1",
                    "input_tokens": rng.randrange(100, 5000),
                    "cached_input_tokens": 0,
                    "output_tokens": rng.randrange(10, 1000),
                    "occurred_at": None,
                    "reservation": None,
                    "project": rng.choice([None, "search", "chat"]),
                    # --tagged-events: a `team` tag on each (report tag roll-ups).
                    "tags": {"team": f"team-{rng.randrange(8)}"} if tagged else None,
                }
            )
        return json.dumps(events)

    async def worker(conn: asyncpg.Connection) -> None:
        nonlocal retries, events_done
        for _ in range(rounds):
            payload = make_batch()
            t0 = time.perf_counter()
            while True:
                try:
                    await conn.fetchval(
                        "SELECT tl_record_usage_batch($1::jsonb, $2::jsonb)::text",
                        payload,
                        json.dumps(CTX),
                    )
                    break
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                    retries += 1
            latencies.append(time.perf_counter() - t0)
            events_done += batch

    # Warm-up: one batch per connection (plans, caches).
    await asyncio.gather(
        *(
            c.fetchval(
                "SELECT tl_record_usage_batch($1::jsonb, $2::jsonb)::text",
                make_batch(),
                json.dumps(CTX),
            )
            for c in conns
        )
    )
    # What the service's background loop does as the tables grow
    # (tl_analyze_grown): without it the plans cached above, made while
    # usage_events was empty, read its whole index per event until
    # autovacuum got to it, and the figures measured that instead.
    await conns[0].execute("SELECT pg_stat_force_next_flush()")
    await conns[0].fetchval("SELECT tl_analyze_grown()")
    cpu0, t0 = postgres_cpu(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall, cpu = time.perf_counter() - t0, postgres_cpu() - cpu0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"usage:batch {clients} clients x {rounds} batches x {batch} events "
        f"over {accounts} accounts: "
        f"{events_done / wall:.0f} events/s, p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms per batch, "
        f"{cpu / events_done * 1000:.3f} ms postgres CPU per event, deadlock retries {retries}"
    )
    for c in conns:
        await c.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--schema", default=str(Path(__file__).parent.parent / "schema.sql"))
    ap.add_argument("--grants", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--accounts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated: grants,usage")
    ap.add_argument(
        "--report-tags",
        default="",
        help="declare these report tag keys (comma-separated; tl_report_tags_sync)",
    )
    ap.add_argument("--tagged-events", action="store_true", help="events carry a team tag")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    schema = await asyncio.to_thread(Path(args.schema).read_text)
    await find_postmaster(args.dsn)
    await setup(args.dsn, schema, args.accounts)
    if args.report_tags:
        conn = await asyncpg.connect(dsn_for(args.dsn, DB))
        names = args.report_tags.split(",")
        await conn.execute("SELECT tl_report_tags_sync($1::text[])", names)
        await conn.close()
    if "grants" not in skip:
        await bench_grants(args.dsn, args.grants)
    if "usage" not in skip:
        for clients in sorted({1, 4, args.clients}):
            await bench_usage(
                args.dsn,
                clients,
                args.batch,
                args.rounds,
                args.accounts,
                args.seed,
                args.tagged_events,
            )


if __name__ == "__main__":
    asyncio.run(main())
