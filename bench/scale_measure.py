"""What bench.scale measures on each of its databases (`fresh` and `scale`),
through the service in-process: the hot path, the reads, audit --full, a day
of traffic and the routine audit after it. Figures go to each Target."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench import cpu, inprocess
from bench.audit_scale import timed_audit
from bench.year import log
from service import chain as hash_chain
from service import db
from service.audit import audit

WARM_UP_DEBITS = 300
USAGE_BATCH = 100


MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "o3")


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
    config = inprocess.bench_config(
        target.dsn, pool_min_size=1, pool_max_size=4, usage_max_age_seconds=30 * 86_400
    )
    async with inprocess.client(config, timeout_seconds=300) as client:
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
    # Warm up the pool's prepared statements and the caches: a connection
    # plans its statements on first use, and pages just written (the year's
    # bulk load, the fresh database's set-up) are read and their hint bits
    # set on first touch. With 20 warm-up debits the ratio of the two
    # databases' CPU per debit swung from 0.67 to 1.8 between runs on one
    # year. Debits on one connection, in blocks of 300, right after 10,000
    # grants to each database: 2.2 to 3.3 ms of backend CPU per debit in the
    # first three blocks, then 0.33 to 0.53 ms in three more (on a new
    # connection), on the fresh database and the 10M year alike.
    for _ in range(WARM_UP_DEBITS):
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
    assert row is not None, "no verified chain row to time the routine verification from"
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
