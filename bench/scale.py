"""`make bench-scale`: the hot path and the reads on a year of history,
next to the same figures on a fresh database, in one run.

    python -m bench.scale [--employees 10000] [--entries 1M] [--ops 400]
                          [--reads 200] [--day-ops 3000] [--audit-runs 2]
                          [--database-url DSN] [--reuse] [--keep] [--no-chain]
                          [--json PATH]

1. A throwaway PostgreSQL of its own (service/devdb.py's, files on disk), two
   databases on it: `fresh` (the directory, the program, the current cycle's
   grant) and `scale` (bench/year.py: a year of history at --entries, the
   hash chain included), each built set-based. With --database-url and
   --keep the year's database stays on that server, and --reuse measures on
   it again instead of building it (year_database), brought to this checkout's
   schema first (current_schema).
2. On each, with the service in-process (httpx over ASGI, as bench.reports):
   - PostgreSQL CPU per operation (the server's whole process tree, from
     /proc, bench/cpu.py): a debit, a reservation and its capture, a usage
     event in a batch of 100; on wallets drawn with the same skew as the
     history;
   - latency (median, p99) of GET /v1/accounts/{a}, its entries page, the
     balance as of an instant and a 30-day series, for the heaviest user;
   - a month's usage report by employee (the last whole month).
   The reads alternate request by request between the two databases.
3. On the scale database only: `audit --full` (--audit-runs times: wall and
   server CPU seconds, in all, per journal entry and per check),
   then --day-ops more operations (about a day of traffic at 10M entries a
   year is 12k transactions), chained, then the routine audit and the
   routine chain verification since the checkpoints, then `--verify-chain`
   in full.

Each figure is printed next to the fresh one with the ratio; JSON too
(--json). The machine is often shared: the CPU figures move far less than
latencies do under someone else's load, and ratios come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.postgres import admin_server, server_identity
from bench.scale_measure import Target, measure, reads, service
from bench.year import build, log, size, year_database, year_name
from service import migrate

ROWS = (
    ("cpu_ms_per_debit", "PostgreSQL CPU per debit (ms)", 1.2),
    ("cpu_ms_per_reservation_capture", "PostgreSQL CPU per reservation + capture (ms)", 1.2),
    ("cpu_ms_per_usage_event", "PostgreSQL CPU per usage event in a batch (ms)", 1.2),
    ("account_p99_ms", "p99 GET /v1/accounts/{a}, heaviest user (ms)", 1.5),
    ("entries_page_p99_ms", "p99 entries page, heaviest user (ms)", 1.5),
    ("balance_as_of_p99_ms", "p99 as-of balance (ms)", 1.5),
    ("series_30_days_p99_ms", "p99 30-day series (ms)", 1.5),
    ("month_report_by_employee_s", "month's usage report by employee (s)", None),
)


def table(fresh: dict[str, Any], scale: dict[str, Any]) -> str:
    lines = ["| figure | fresh | scale | ratio | target |", "|---|---|---|---|---|"]
    for key, label, target in ROWS:
        a, b = fresh.get(key), scale.get(key)
        ratio = f"{b / a:.2f}" if a and b else "-"
        goal = f"<= {target}x" if target else "< 1 s"
        shown = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in (a, b)]
        lines.append(f"| {label} | {shown[0]} | {shown[1]} | {ratio} | {goal} |")
    for key in (
        "entries",
        "transactions",
        "usage_events",
        "lots",
        "audit_full_s",
        "audit_full_us_per_entry",
        "audit_full_server_cpu_s",
        "audit_full_cpu_us_per_entry",
        "verify_chain_full_s",
        "day_transactions",
        "audit_routine_s",
        "verify_chain_routine_s",
        "month_report_rows",
        "series_30_days_errors",
        "balance_as_of_errors",
    ):
        value = scale.get(key)
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | | {text} | | |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Both databases, both measurements; the databases are dropped (and a
    server of our own stopped, its files removed) whatever happens."""
    drop = ["bench_fresh"] if args.keep else ["bench_fresh", year_name(args.entries, args.chain)]
    async with admin_server(args.database_url, drop) as admin_dsn:
        return await run(admin_dsn, args)


async def run(admin_dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build both databases on admin_dsn's server and measure each."""
    postmaster, version = await server_identity(admin_dsn)
    built = {
        "fresh": await build(admin_dsn, "bench_fresh", args.employees, 0, 0, args.chain),
        "scale": await year_database(
            admin_dsn, args.entries, args.employees, chain=args.chain, reuse=args.reuse
        ),
    }
    if args.reuse:
        await current_schema(built["scale"]["dsn"])
    targets = {name: Target(name, b["dsn"], args.employees) for name, b in built.items()}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(service(target))
            for name, target in targets.items()
        }
        for name, target in targets.items():
            await measure(target, clients[name], postmaster, args)
        await reads(targets, clients, args)
    summary = {
        "command": "python -m bench.scale " + " ".join(sys.argv[1:]),
        "server_version": version,
        "employees": args.employees,
        "entries_asked": args.entries,
        "build": {
            k: {"seconds": v["build_seconds"], "bytes": v["database_bytes"]}
            for k, v in built.items()
        },
        "fresh": targets["fresh"].figures,
        "scale": targets["scale"].figures,
    }
    return summary


async def current_schema(dsn: str) -> None:
    """Bring a reused year to this checkout's schema, as `python -m service migrate` does
    (a no-op when it has it): a 10M year is kept for hours while the functions and the
    named queries that read it change, and a reused year measured with queries calling
    functions it does not have, or with the old ones, measures nothing of the change."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close(timeout=10)
    seconds = time.perf_counter() - started
    log(f"bench.scale: the reused year has the current schema ({seconds:.1f}s)")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--employees", type=size, default=10_000)
    parser.add_argument("--entries", type=size, default=1_000_000)
    parser.add_argument(
        "--ops", type=int, default=400, help="operations of each kind timed for CPU"
    )
    parser.add_argument("--reads", type=int, default=200, help="requests of each read timed")
    parser.add_argument(
        "--day-ops", type=int, default=3000, help="operations between the two audits"
    )
    parser.add_argument(
        "--audit-runs", type=int, default=2, help="audit --full runs on the scale database"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="a superuser DSN of a server to build on (default: a throwaway one of our own)",
    )
    parser.add_argument(
        "--no-chain",
        dest="chain",
        action="store_false",
        help="build no hash chain and time no chain verification (saves most of the build)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure on a year built earlier with the same parameters (see --keep)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the year's database behind for a later --reuse (needs --database-url)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.keep and args.database_url is None:
        parser.error("--keep needs --database-url: a throwaway server is removed at the end")
    summary = asyncio.run(main(args))
    print(table(summary["fresh"], summary["scale"]))
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    cli()
