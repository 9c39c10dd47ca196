"""What the debits' roll-up trigger (schema.sql, entries_spend_rollup) costs the hot path.

    python -m bench.spend_rollup [--rounds 6] [--ops 2000] [--report-tags NAMES]
                                 [--database-url DSN] [--json PATH]

Database-only, one connection, so the figure is PostgreSQL's alone and does not
drown in the HTTP service's noise: on a database of its own (bench.postgres.provision)
with 1,000 funded wallets, interleaved rounds with the trigger enabled and disabled
(ALTER TABLE entries ENABLE/DISABLE TRIGGER) of

* `debit`: --ops single debits (tl_execute), each its own transaction;
* `debit_batch_32`: --ops debits in coalesced batches of 32 over 32 wallets
  (tl_execute_batch, as the service's coalescer sends them);
* `reserve_capture`: --ops / 4 reservations, each then captured by amount
  (tl_execute), one op being the pair.

For each round, the backend's own CPU time (/proc/<pid>/stat, user + system) per
op; the result is each mode's median per op with and without the trigger and
their difference, and the time spent inside the trigger function itself per op
(pg_stat_user_functions with track_functions = 'pl': wall time, so an upper
bound of its CPU). The machine is shared: the CPU figures of single rounds
vary by more than the trigger costs; the time inside the trigger is the
steadier measure.

--report-tags declares report tag keys first (tl_report_tags_sync), so that the
trigger also keeps the tag roll-ups (schema.sql, "Tag roll-ups").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.postgres import provision
from bench.report import run_side_bench
from service import db, migrate

WALLETS = 1000
CTX: dict[str, Any] = {"actor": "bench", "request_id": "spend-rollup", "now": None}
TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one PostgreSQL backend so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def setup(conn: asyncpg.Connection) -> None:
    await migrate.migrate(conn)
    await conn.execute('SELECT tl_op_put_department(\'{"id":"eng","name":"Eng"}\', $1)', CTX)
    await conn.execute(
        """SELECT tl_op_put_employee(jsonb_build_object('id', 'e-' || i, 'name', 'e' || i,
               'email', 'e' || i || '@example.com', 'department', 'eng'), $1)
           FROM generate_series(1, $2) i""",
        CTX,
        WALLETS,
    )
    await conn.execute(
        """SELECT tl_op_grant(jsonb_build_object('employee', 'e-' || i, 'amount', 1000000000,
               'reason', 'spot_bonus'), $1)
           FROM generate_series(1, $2) i""",
        CTX,
        WALLETS,
    )
    await conn.execute("VACUUM ANALYZE")


async def debits(conn: asyncpg.Connection, ops: int, start: int) -> None:
    for n in range(ops):
        await conn.fetchval(
            "SELECT tl_execute('bench', NULL, NULL, 'debit', 201, $1, $2)",
            {
                "account": f"employee:e-{(start + n) % WALLETS + 1}",
                "amount": 3,
                "metadata": {"model": "m", "project": "p"},
            },
            CTX,
        )


async def batches(conn: asyncpg.Connection, ops: int, start: int) -> None:
    for b in range(ops // 32):
        n0 = start + b * 32
        args = [
            {
                "account": f"employee:e-{(n0 + i) % WALLETS + 1}",
                "amount": 3,
                "metadata": {"model": "m"},
            }
            for i in range(32)
        ]
        await conn.fetchval(
            "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7)",
            ["bench"] * 32,
            [f"batch-{n0 + i}" for i in range(32)],
            [hashlib.sha256(f"batch-{n0 + i}".encode()).digest() for i in range(32)],
            ["debit"] * 32,
            [201] * 32,
            args,
            [CTX] * 32,
        )


async def pairs(conn: asyncpg.Connection, ops: int, start: int) -> None:
    for n in range(ops // 4):
        account = f"employee:e-{(start + n) % WALLETS + 1}"
        held = await conn.fetchval(
            "SELECT tl_execute('bench', NULL, NULL, 'reserve', 201, $1, $2)",
            {"account": account, "amount": 10, "ttl_seconds": 600},
            CTX,
        )
        public = held["body"]["id"]
        rid = await conn.fetchval("SELECT tl_parse_public_id($1)", public)
        await conn.fetchval(
            "SELECT tl_execute('bench', NULL, NULL, 'capture', 200, $1, $2)",
            {"reservation": public, "reservation_id": str(rid), "amount": 7},
            CTX,
        )


async def trigger_time(conn: asyncpg.Connection) -> float:
    """Milliseconds spent inside tl_spend_rollup so far (wall time, its own
    statements included)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return float(
        await conn.fetchval(
            "SELECT coalesce(sum(total_time), 0) FROM pg_stat_user_functions"
            " WHERE funcname = 'tl_spend_rollup'"
        )
    )


MODES = {"debit": (debits, 1), "debit_batch_32": (batches, 1), "reserve_capture": (pairs, 4)}


async def run(dsn: str, rounds: int, ops: int, report_tags: str = "") -> dict[str, Any]:
    conn = await db.connect(dsn)
    samples: dict[str, dict[bool, list[float]]] = {m: {True: [], False: []} for m in MODES}
    in_trigger: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        await setup(conn)
        if report_tags:
            await conn.execute("SELECT tl_report_tags_sync($1::text[])", report_tags.split(","))
        # The time spent inside the trigger function itself (pg_stat_user_functions).
        await conn.execute("SET track_functions = 'pl'")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        start = 0
        for r in range(rounds):
            for on in (r % 2 == 0, r % 2 != 0):  # ABBA-like: alternate which goes first
                state = "ENABLE" if on else "DISABLE"
                await conn.execute(f"ALTER TABLE entries {state} TRIGGER entries_spend_rollup")
                for mode, (fn, per) in MODES.items():
                    inside = await trigger_time(conn)
                    cpu = backend_cpu(pid)
                    await fn(conn, ops, start)
                    start += ops
                    spent = backend_cpu(pid) - cpu
                    samples[mode][on].append(spent / (ops // per) * 1e6)
                    if on:
                        ms = await trigger_time(conn) - inside
                        in_trigger[mode].append(ms / (ops // per) * 1e3)
                print(f"bench.spend_rollup: round {r + 1} trigger {state}", file=sys.stderr)
        await conn.execute("ALTER TABLE entries ENABLE TRIGGER entries_spend_rollup")
        # The roll-ups hold what the trigger saw: a sanity check that it ran.
        rolled = await conn.fetchval("SELECT coalesce(sum(debits), 0) FROM spend_daily")
    finally:
        await conn.close()
    out: dict[str, Any] = {"rolled_up_spends": int(rolled)}
    for mode, by in samples.items():
        with_, without = statistics.median(by[True]), statistics.median(by[False])
        out[mode] = {
            "us_per_op_with": round(with_, 1),
            "us_per_op_without": round(without, 1),
            "difference_us": round(with_ - without, 1),
            "us_per_op_inside_trigger": round(statistics.median(in_trigger[mode]), 2),
            "rounds_with": [round(x, 1) for x in by[True]],
            "rounds_without": [round(x, 1) for x in by[False]],
        }
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    database = await provision(
        args.database_url, f"tokenledger_spend_rollup_{uuid.uuid4().hex[:8]}"
    )
    try:
        started = time.perf_counter()
        result = await run(database.dsn, args.rounds, args.ops, getattr(args, "report_tags", ""))
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["server_version"] = database.server_version
    finally:
        await database.drop()
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--report-tags", default="", help="report tag keys to declare first")
    run_side_bench(parser, main)


if __name__ == "__main__":
    cli()
