"""`make bench-scale`: the hot path and the reads on a year of history,
next to the same figures on a fresh database, in one run.

    python -m bench.scale [--employees 10000] [--entries 1M] [--ops 400]
                          [--reads 200] [--day-ops 3000] [--audit-runs 2]
                          [--database-url DSN] [--reuse] [--keep] [--no-chain]
                          [--json PATH]

1. A throwaway PostgreSQL of its own (tests.pg's, files on disk), two
   databases on it: `fresh` (the directory, the program, the current cycle's
   grant) and `scale` (bench/year.py: a year of history at --entries, the
   hash chain included), each built set-based. With --database-url and
   --keep the year's database stays on that server, and --reuse measures on
   it again instead of building it (year_database).
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
import random
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import cpu
from bench.harness import dsn_for, start_own_server
from bench.year import build_year, chain_all
from service import chain as hash_chain
from service import db, migrate
from service.app import create_app
from service.audit import audit
from service.auth import new_key
from service.config import Config

USAGE_BATCH = 100
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "o3")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def size(text: str) -> int:
    """10000, 1M, 10M, 2.5M."""
    text = text.strip().upper()
    factor = 1
    if text.endswith("M"):
        factor, text = 1_000_000, text[:-1]
    elif text.endswith("K"):
        factor, text = 1_000, text[:-1]
    return int(float(text) * factor)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Target:
    """One database of the run, its app and its figures."""

    def __init__(self, name: str, dsn: str, employees: int) -> None:
        self.name = name
        self.dsn = dsn
        self.employees = employees
        self.figures: dict[str, Any] = {}
        # A fixed seed: both databases see the same wallets drawn.
        self.rng = random.Random(21)  # noqa: S311  # why: a load pattern, not a secret

    def wallet(self) -> str:
        """A wallet drawn with the history's skew (about 1/n^0.9)."""
        while True:
            n = int(self.rng.paretovariate(0.15))
            if 1 <= n <= self.employees:
                return f"employee:emp-{n}"


async def cpu_seconds(postmaster: int | None) -> float:
    value = cpu.tree_cpu_seconds(postmaster)
    return float(value) if value is not None else float("nan")


@contextlib.asynccontextmanager
async def service(target: Target) -> AsyncIterator[httpx.AsyncClient]:
    """The service in-process on a target's database, and a client of it."""
    admin = new_key().secret
    config = Config(
        database_url=target.dsn,
        apply_schema=False,
        background_enabled=False,
        pool_min_size=1,
        pool_max_size=4,
        log_level="warning",
        environment="development",
        bootstrap_admin_key=admin,
        rate_limits="",
        usage_max_age_seconds=30 * 86_400,
    )
    app = create_app(config)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://bench.local",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=300,
        ) as client,
    ):
        yield client


async def measure(
    target: Target, client: httpx.AsyncClient, postmaster: int | None, args: argparse.Namespace
) -> None:
    """The hot path's CPU, and on the scale database the audits."""
    conn = await db.connect(target.dsn)
    try:
        await hot_path(target, client, postmaster, args)
        if target.name == "scale":
            await audits(target, conn, client, postmaster, args)
    finally:
        await conn.close()


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    if r.status_code >= 300:
        raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
    return dict(r.json())


def usage_events(target: Target, n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "source": "bench-scale",
            "event_id": uuid.uuid4().hex,
            "account": target.wallet(),
            "model": MODELS[i % 4],
            "input_tokens": 200 + i,
            "output_tokens": 50,
            "occurred_at": (now - timedelta(seconds=1)).isoformat(),
        }
        for i in range(n)
    ]


async def hot_path(
    target: Target, client: httpx.AsyncClient, postmaster: int | None, args: argparse.Namespace
) -> None:
    """PostgreSQL CPU per operation, each kind in a run of its own."""
    # Warm up the pool's prepared statements and the caches.
    for _ in range(20):
        await post(client, "/v1/debits", {"account": target.wallet(), "amount": 1})

    before = await cpu_seconds(postmaster)
    for _ in range(args.ops):
        await post(client, "/v1/debits", {"account": target.wallet(), "amount": 3})
    target.figures["cpu_ms_per_debit"] = (await cpu_seconds(postmaster) - before) / args.ops * 1000

    before = await cpu_seconds(postmaster)
    for _ in range(args.ops):
        rsv = await post(client, "/v1/reservations", {"account": target.wallet(), "amount": 20})
        await post(client, f"/v1/reservations/{rsv['id']}/capture", {"amount": 15})
    target.figures["cpu_ms_per_reservation_capture"] = (
        (await cpu_seconds(postmaster) - before) / args.ops * 1000
    )

    batches = max(1, args.ops // 10)
    before = await cpu_seconds(postmaster)
    for _ in range(batches):
        r = await client.post("/v1/usage:batch", json={"events": usage_events(target, USAGE_BATCH)})
        if r.status_code != 200:
            raise RuntimeError(f"usage batch: {r.status_code} {r.text[:300]}")
    target.figures["cpu_ms_per_usage_event"] = (
        (await cpu_seconds(postmaster) - before) / (batches * USAGE_BATCH) * 1000
    )
    log(f"bench.scale: {target.name} hot path {target.figures}")


async def reads(
    targets: dict[str, Target], clients: dict[str, httpx.AsyncClient], args: argparse.Namespace
) -> None:
    """Latency of the heaviest user's reads on both databases, request by
    request in turn (fresh, scale, scale, fresh, ...): a change in the
    machine's load then falls on both figures of a ratio, not on one (on a
    shared machine, reads timed a few minutes apart differed by more than
    the targets). Then a month's usage report on each."""
    heavy = "employee:emp-1"
    now = datetime.now(UTC)
    paths = {
        "account": f"/v1/accounts/{heavy}",
        "entries_page": f"/v1/accounts/{heavy}/entries?limit=50",
        "balance_as_of": f"/v1/accounts/{heavy}/balance",
        "series_30_days": f"/v1/accounts/{heavy}/series",
    }
    names = list(targets)
    for name, path in paths.items():
        samples: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.reads + 5):
            params: dict[str, str] = {}
            if name == "balance_as_of":
                params["at"] = (now - timedelta(days=1 + i % 300)).isoformat()
            if name == "series_30_days":
                params.update(
                    {
                        "from": (now - timedelta(days=30)).isoformat(),
                        "to": now.isoformat(),
                        "interval": "day",
                    }
                )
            for n in names if i % 2 == 0 else reversed(names):
                target = targets[n]
                started = time.perf_counter()
                r = await clients[n].get(path, params=params)
                elapsed = time.perf_counter() - started
                if r.status_code != 200:
                    # A 503 is the statement timeout: recorded, not fatal.
                    errors = target.figures.get(f"{name}_errors", 0) + 1
                    target.figures[f"{name}_errors"] = errors
                    log(f"bench.scale: {n} {path}: {r.status_code} after {elapsed:.1f}s")
                if i >= 5:
                    samples[n].append(elapsed)
        for n in names:
            if samples[n]:
                targets[n].figures[f"{name}_p50_ms"] = statistics.median(samples[n]) * 1000
                targets[n].figures[f"{name}_p99_ms"] = p99(samples[n]) * 1000
    month_end = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month_start = (month_end - timedelta(days=1)).replace(day=1)
    for n in names:
        report_samples = []
        rows = 0
        for _ in range(4):
            started = time.perf_counter()
            r = await clients[n].get(
                "/v1/reports/usage",
                params={
                    "from": month_start.isoformat(),
                    "to": month_end.isoformat(),
                    "group_by": "employee",
                },
            )
            report_samples.append(time.perf_counter() - started)
            if r.status_code != 200:
                raise RuntimeError(f"report: {r.status_code} {r.text[:300]}")
            rows = len(r.json()["items"])
        targets[n].figures["month_report_by_employee_s"] = statistics.median(report_samples[1:])
        targets[n].figures["month_report_rows"] = rows
    log("bench.scale: reads done")


async def timed_audit(dsn: str, postmaster: int | None) -> dict[str, Any]:
    """One `audit --full`: wall and CPU seconds, in all and per check."""
    conn = await db.connect(dsn)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        entries = int(await conn.fetchval("SELECT count(*) FROM entries"))
        checks: dict[str, dict[str, float]] = {}
        last = {"wall": time.perf_counter(), **readings(backend, postmaster)}
        first = dict(last)

        def on_check(name: str) -> None:
            now = {"wall": time.perf_counter(), **readings(backend, postmaster)}
            checks[name] = {k: now[k] - last[k] for k in now}
            last.update(now)

        run = await audit(conn, full=True, settle_seconds=0, on_check=on_check)
        assert not run.violations, run.violations
        total = {k: last[k] - first[k] for k in last}
    finally:
        await conn.close()
    return {"entries": entries, "total": total, "checks": checks}


def readings(backend: int, postmaster: int | None) -> dict[str, float]:
    """CPU seconds so far of the backend (the leader) and of the server's tree."""
    stat = cpu.read_stat(backend)
    return {
        "backend_cpu": stat[1] if stat is not None else float("nan"),
        "server_cpu": cpu.tree_cpu_seconds(postmaster) or float("nan"),
    }


async def audits(
    target: Target,
    conn: asyncpg.Connection,
    client: httpx.AsyncClient,
    postmaster: int | None,
    args: argparse.Namespace,
) -> None:
    """audit --full (--audit-runs times), a day of traffic, then the routine
    audit and chain verification."""
    entries = int(await conn.fetchval("SELECT count(*) FROM entries"))
    target.figures["entries"] = entries
    target.figures["transactions"] = int(await conn.fetchval("SELECT count(*) FROM transactions"))
    target.figures["usage_events"] = int(await conn.fetchval("SELECT count(*) FROM usage_events"))
    target.figures["lots"] = int(await conn.fetchval("SELECT count(*) FROM lots"))
    # Wall seconds move with the machine's load; the server's CPU seconds
    # much less. Each run is reported; the figures are the best run's.
    runs = [await timed_audit(target.dsn, postmaster) for _ in range(max(1, args.audit_runs))]
    target.figures["audit_full_runs"] = [r["total"] for r in runs]
    best = min(runs, key=lambda r: r["total"]["wall"])
    target.figures["audit_full_s"] = best["total"]["wall"]
    target.figures["audit_full_us_per_entry"] = best["total"]["wall"] / entries * 1e6
    target.figures["audit_full_server_cpu_s"] = min(r["total"]["server_cpu"] for r in runs)
    target.figures["audit_full_cpu_us_per_entry"] = (
        target.figures["audit_full_server_cpu_s"] / entries * 1e6
    )
    target.figures["audit_full_checks"] = best["checks"]
    walls = [round(r["total"]["wall"], 1) for r in runs]
    log(f"bench.scale: audit --full {walls}s on {entries} entries")
    run_cutoff = await conn.fetchval(
        "SELECT max(verified_to) FROM audit_checkpoints WHERE check_name LIKE 'audit%'"
    )

    if not args.chain:
        return await day_and_routine(target, conn, client, args, run_cutoff, chain=False)
    # The chain is verified (and its checkpoint written) once in full, as a
    # routine verification expects from its first run.
    started = time.perf_counter()
    problem, verified = await hash_chain.verify_chain_since(conn, None)
    target.figures["verify_chain_full_s"] = time.perf_counter() - started
    assert problem is None, problem
    assert verified is not None
    await conn.execute(db.load_queries()["audit_chain_checkpoint_save"], *verified)
    log(f"bench.scale: verify-chain in full {target.figures['verify_chain_full_s']:.1f}s")

    await day_and_routine(target, conn, client, args, run_cutoff, chain=True)


async def day_and_routine(
    target: Target,
    conn: asyncpg.Connection,
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    cutoff: datetime | None,
    *,
    chain: bool,
) -> None:
    """About a day of traffic, then the routine audit (and chain verification)."""
    # About a day of traffic: usage in batches and debits.
    debits = args.day_ops // 5
    for _ in range(debits):
        await post(client, "/v1/debits", {"account": target.wallet(), "amount": 2})
    for _ in range((args.day_ops - debits) // USAGE_BATCH):
        r = await client.post("/v1/usage:batch", json={"events": usage_events(target, USAGE_BATCH)})
        assert r.status_code == 200, r.text[:300]
    await asyncio.sleep(0.1)
    if chain:
        await hash_chain.append_pending(conn, batch_size=5000, settle_seconds=0.01)
    new = int(
        await conn.fetchval("SELECT count(*) FROM transactions WHERE created_at >= $1", cutoff)
    )
    target.figures["day_transactions"] = new

    started = time.perf_counter()
    routine = await audit(conn, full=False, settle_seconds=0)
    target.figures["audit_routine_s"] = time.perf_counter() - started
    assert not routine.violations, routine.violations
    assert not routine.full, routine.full
    if not chain:
        return
    row = await conn.fetchrow(db.load_queries()["chain_row_verified"])
    started = time.perf_counter()
    problem, verified = await hash_chain.verify_chain_since(
        conn, (int(row["chain_seq"]), bytes(row["chain_hash"]))
    )
    target.figures["verify_chain_routine_s"] = time.perf_counter() - started
    assert problem is None, problem
    log(
        f"bench.scale: routine audit {target.figures['audit_routine_s']:.2f}s, routine chain "
        f"{target.figures['verify_chain_routine_s']:.2f}s after {new} transactions"
    )


async def build(
    admin_dsn: str, name: str, employees: int, entries: int, months: int, chain: bool
) -> dict[str, Any]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = dsn_for(admin_dsn, name)
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
        started = time.perf_counter()
        seconds = await build_year(conn, employees=employees, entries=entries, months=months)
        chained_started = time.perf_counter()
        chained = await chain_all(conn) if chain else 0
        seconds["chain"] = time.perf_counter() - chained_started
        seconds["total"] = time.perf_counter() - started
        database_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        # The build leaves gigabytes of dirty pages: written out now, not by
        # the checkpointer during the hot path, whose server CPU it inflated
        # (a 1M run measured 3x the fresh CPU per debit without this).
        await conn.execute("CHECKPOINT", timeout=3600)
    finally:
        await conn.close()
    log(f"bench.scale: {name} built in {seconds['total']:.0f}s ({chained} transactions chained)")
    return {"dsn": dsn, "build_seconds": seconds, "database_bytes": database_bytes}


def year_name(entries: int, chain: bool) -> str:
    """The database of a year at that size (shared by bench.scale and bench.audit_scale)."""
    return f"bench_year_{entries}" + ("_chained" if chain else "")


def year_marker(entries: int, employees: int, chain: bool) -> str:
    return json.dumps({"bench": "year", "entries": entries, "employees": employees, "chain": chain})


async def year_database(
    admin_dsn: str, entries: int, employees: int, *, chain: bool, reuse: bool
) -> dict[str, Any]:
    """A year of `entries` on admin_dsn's server: built now, or with `reuse`
    the one an earlier run built with the same parameters (they are in the
    database's comment; a 10M year takes about 25 minutes to build)."""
    name = year_name(entries, chain)
    conn = await asyncpg.connect(admin_dsn)
    try:
        comment = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            name,
        )
    finally:
        await conn.close()
    if reuse and comment == year_marker(entries, employees, chain):
        log(f"bench: reusing the year in database {name}")
        conn = await asyncpg.connect(dsn_for(admin_dsn, name))
        try:
            size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        finally:
            await conn.close()
        return {
            "dsn": dsn_for(admin_dsn, name),
            "build_seconds": {"reused": 0.0},
            "database_bytes": size,
        }
    built = await build(admin_dsn, name, employees, entries, 12, chain)
    conn = await asyncpg.connect(admin_dsn)
    try:
        marker = year_marker(entries, employees, chain).replace("'", "''")
        await conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{marker}'")
    finally:
        await conn.close()
    return built


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
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | | {shown} | | |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Both databases, both measurements; the databases are dropped (and a
    server of our own stopped, its files removed) whatever happens."""
    server = None
    admin_dsn = args.database_url
    if admin_dsn is None:
        server = await asyncio.to_thread(start_own_server, on_disk=True, stat_statements=False)
        admin_dsn = server.dsn
    try:
        return await run(admin_dsn, args)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            names = ["bench_fresh"]
            if not args.keep:
                names.append(year_name(args.entries, args.chain))
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def run(admin_dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build both databases on admin_dsn's server and measure each."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        postmaster = cpu.local_postmaster(int(await conn.fetchval("SELECT pg_backend_pid()")))
        version = str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close()
    built = {
        "fresh": await build(admin_dsn, "bench_fresh", args.employees, 0, 0, args.chain),
        "scale": await year_database(
            admin_dsn, args.entries, args.employees, chain=args.chain, reuse=args.reuse
        ),
    }
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
