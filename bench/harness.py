"""The benchmark: the real service as a subprocess, on a throwaway database.

    python -m bench [--scale X] [--requests N] [--workers N] [--only NAME]
                    [--batch-size N] [--wallets N] [--fsync on|off] [--wrk-seconds S]
                    [--pgbench-seconds S] [--pgbench-scale N]
                    [--json PATH] [--database-url DSN] [--seed N]

1. PostgreSQL: the server named by --database-url or DATABASE_URL, on which a
   fresh database `tokenledger_bench_<pid>` is created (and dropped at the end);
   otherwise a throwaway server from service/devdb.py, with its files on
   disk and fsync, synchronous_commit and full_page_writes turned back on
   (--fsync off leaves it as the tests run it). The settings, and the data
   directory's filesystem, are in the result.
2. The reference (bench/pgbench.py): pgbench's tpcb-like script, 8 clients,
   for --pgbench-seconds (15) in a database of its own on the same server:
   its TPS, and the server's CPU per transaction.
3. The service: `python -m service` with DATABASE_URL, TOKENLEDGER_PORT (a free
   port on 127.0.0.1), TOKENLEDGER_LOG_LEVEL=warning and
   TOKENLEDGER_POOL_MAX_SIZE=40, ready when GET /readyz answers 200.
4. Scenarios, each with a request count (times --scale) and a time cap; the
   data they need is set up through the API first and is not timed. The
   reserve_capture scenarios count reserve+capture pairs instead: one op is
   one pair (two requests), and their ops/s are pairs/s; reserve_capture_gateway_32
   sends them as the LiteLLM hook does (by estimate, captured by usage). The usage scenarios
   count usage events: usage_single (16 workers, 32 wallets) and
   usage_single_32 (32 workers) send one per request, usage_batch_500 (4
   workers) and usage_batch_500_c16 (16) --batch-size (500) per POST
   /v1/usage:batch; their ops/s are events/s (events answered `recorded`),
   their latencies per request. grants_batch_1000 is one POST
   /v1/grants:batch; its op is a grant. debit_spread_32, read_32 and
   usage_single_32 spread over --wallets (1,000) wallets, times --scale.
   For each: the CPU-seconds per op of the service's process tree, of the
   pool's PostgreSQL backends, and of every process of the server.
   The measured requests go through a lean HTTP client (bench/http.py).
5. With --wrk-seconds S (make bench: 10): the throughput phases with wrk
   (bench/wrk.py), debits then balance reads at 32 connections for S seconds
   each over --wallets wallets of their own, checked in aggregate; the debit
   and read targets then use their figures, as the issue measured them.
6. The audit (`python -m service audit`), and arithmetic checks of the
   balances against the successful answers: these alone decide PASS.
7. The issue-10 targets, as ratios against figures of this run (pgbench's
   TPS above all): reported, met or not, never part of PASS.

The machine is shared and noisy: compare figures measured in one run (the
ratio shared/spread, a scenario against pgbench), not absolute numbers across
runs; CPU per op moves much less than throughput. All traffic goes to
127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import REPO
from bench import pgbench as pgbench_reference
from bench.api import Api, SetupError, make_client
from bench.driver import (
    DEFAULT_JSON,
    PGBENCH_SCALE_DEFAULT,
    PGBENCH_SECONDS_DEFAULT,
    SPREAD_WALLETS_DEFAULT,
    USAGE_BATCH_SIZE_DEFAULT,
    Context,
    Options,
    run_async,
)
from bench.http import LeanClient
from bench.postgres import Database, dsn_for, provision, redact, server_identity
from bench.probes import CpuProbe, Statements
from bench.process import POOL_MAX_SIZE, Service, run_audit
from bench.report import git_commit, machine_facts, table, targets, write_json
from bench.scenarios import (
    POLICY_RATIOS,
    RATIOS,
    SCENARIOS,
    interleaved_later,
    interleaved_partner,
    run_interleaved,
    warm_up,
)
from bench.scenarios.throughput import wrk_phases
from bench.stats import Stats


def selected(only: Sequence[str]) -> list[str]:
    names = list(SCENARIOS)
    if not only:
        return names
    unknown = [n for n in only if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}"
        )
    return [n for n in names if n in only]


async def run_pgbench(db: Database, opts: Options) -> dict[str, Any]:
    """The tpcb-like reference (bench/pgbench.py) on the bench's server,
    before the service starts, so that nothing of ours competes with it."""
    if opts.pgbench_seconds <= 0:
        return {"available": False, "error": "skipped (--pgbench-seconds 0)"}
    print("bench: pgbench tpcb-like reference ...", file=sys.stderr, flush=True)
    postmaster, _ = await server_identity(db.admin_dsn)
    name = f"tokenledger_pgbench_{os.getpid()}"
    return await pgbench_reference.reference(
        db.admin_dsn,
        dsn_for(db.admin_dsn, name),
        name,
        seconds=opts.pgbench_seconds,
        scale=opts.pgbench_scale,
        postmaster_pid=postmaster,
    )


async def run_bench(opts: Options) -> dict[str, Any]:
    """Provision, start the service, run the scenarios, audit, tear down."""
    names = selected(opts.only)
    run_id = f"b{os.getpid()}-{int(time.time())}"
    started_at = datetime.now(UTC)
    result: dict[str, Any] = {
        "tool": "tokenledger bench",
        "started_at": started_at.isoformat(),
        "git_commit": git_commit(),
        "options": {
            "scale": opts.scale,
            "requests": opts.requests,
            "workers": opts.workers,
            "only": list(opts.only),
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "wallets": opts.wallets,
            "fsync": "on" if opts.fsync else "off",
            "pgbench_seconds": opts.pgbench_seconds,
            "pgbench_scale": opts.pgbench_scale,
            "stat_statements": opts.stat_statements,
            "wrk_seconds": opts.wrk_seconds,
            "pool_max_size": POOL_MAX_SIZE,
            "auth": "bootstrap admin service key; rate limits raised out of reach",
        },
        "scenarios": [],
        "ratios": {},
        "checks": {},
    }
    db = await provision(
        opts.database_url,
        f"tokenledger_bench_{os.getpid()}",
        durable=opts.fsync,
        stat_statements=opts.stat_statements,
    )
    result["database"] = {"source": db.source, "dsn": redact(db.dsn)}
    result["machine"] = machine_facts(db)
    if db.settings.get("fsync") == "off" and opts.fsync:
        result["machine"]["fsync_note"] = (
            "fsync is off on the server named by --database-url; the bench does not "
            "reconfigure a server it did not start"
        )
    log_path = opts.json_path.with_suffix(".service.log")
    service = Service(db.dsn, log_path)
    result["service_log"] = str(log_path)
    try:
        result["pgbench"] = await run_pgbench(db, opts)
        service.start()
        result["service_ready_s"] = round(await service.wait_ready(), 2)
        concurrency = max(opts.workers or 32, 1)
        async with make_client(service.base_url, concurrency, service.admin_key) as client:
            fast = LeanClient(
                service.base_url,
                concurrency + 2,
                {"Authorization": f"Bearer {service.admin_key}"},
            )
            ctx = Context(client, Api(client, run_id), opts, run_id, fast=fast)
            if sys.platform.startswith("linux") and service.proc is not None:
                ctx.probe = CpuProbe(service.proc.pid, db.dsn)
                await ctx.probe.open()
            if opts.stat_statements:
                statements = Statements(db.dsn)
                why_not = await statements.open()
                result["stat_statements"] = {"available": why_not is None, "error": why_not}
                ctx.statements = None if why_not else statements
            await ctx.api.department()
            result["warm_up"] = await warm_up(ctx, concurrency)
            usage_before = await ctx.api.posted("system:usage")
            for name in names:
                if interleaved_later(name, names):
                    continue
                partner = interleaved_partner(name, names)
                together = (name,) if partner is None else (name, partner)
                print(f"bench: {' + '.join(together)} ...", file=sys.stderr, flush=True)
                try:
                    if partner is None:
                        ran = [await SCENARIOS[name](ctx)]
                    else:
                        ran = list(await run_interleaved(ctx, name, partner))
                except (SetupError, httpx.TransportError) as exc:
                    ran = [Stats(n, 0, 0, 0, 0) for n in together]
                    for stats in ran:
                        stats.setup_error = f"{type(exc).__name__}: {exc}"[:1000]
                result["scenarios"].extend(stats.summary() for stats in ran)
                if not service.alive():
                    result["checks"]["service_died"] = service.log_tail()
                    break
            if opts.wrk_seconds > 0 and service.alive():
                print("bench: wrk throughput phases ...", file=sys.stderr, flush=True)
                result["wrk"] = await wrk_phases(ctx, service.base_url, service.admin_key)
                if result["wrk"].get("available"):
                    for kind, phase in result["wrk"]["phases"].items():
                        result["checks"][f"wrk_{kind}"] = phase["check"]
                else:
                    result["checks"]["wrk"] = {"passed": False, "error": result["wrk"]["error"]}
            await fast.aclose()
            if ctx.probe is not None:
                await ctx.probe.close()
            if ctx.statements is not None:
                await ctx.statements.close()
            # Everything debited or captured since the baseline went to system:usage.
            debits = [v for k, v in ctx.debited.items() if k != "warm_up"]
            usage_after = await ctx.api.posted("system:usage")
            if any(v is None for v in debits):
                result["checks"]["system_usage"] = {
                    "passed": True,
                    "skipped": "a transport error left some debit unknown",
                }
            else:
                expected = sum(v for v in debits if v is not None)
                result["checks"]["system_usage"] = {
                    "expected_gain": expected,
                    "gain": usage_after - usage_before,
                    "passed": usage_after - usage_before == expected,
                }
    finally:
        result["service_stop"] = await asyncio.to_thread(service.stop)
        events = service.log_events()
        result["service_log_events"] = dict(events)
        result["service_unhandled_exceptions"] = dict(service.unhandled_exceptions())
        try:
            result["checks"]["audit"] = await asyncio.to_thread(run_audit, db.dsn)
            result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            await db.drop()
    by_name = {s["name"]: s for s in result["scenarios"]}
    for ratio, (spread_name, shared_name) in RATIOS.items():
        spread, shared = by_name.get(spread_name), by_name.get(shared_name)
        if spread and shared and spread["ops_per_s"] and shared["ops_per_s"] is not None:
            result["ratios"][ratio] = round(shared["ops_per_s"] / spread["ops_per_s"], 3)
    for ratio, (plain_name, policy_name) in POLICY_RATIOS.items():
        # CPU per op, with a policy over without (above 1: the policy costs).
        plain, policy = by_name.get(plain_name), by_name.get(policy_name)
        for part in ("postgres_server", "service"):
            a = plain and plain.get(f"{part}_cpu_ms_per_op")
            b = policy and policy.get(f"{part}_cpu_ms_per_op")
            if a and b:
                result["ratios"][f"{ratio}_{part}_cpu_per_op"] = round(b / a, 3)
        median = median_of_rounds(plain, policy)
        if median is not None:
            result["ratios"][f"{ratio}_median_of_rounds"] = median
    # Reported, never part of `passed`: a target is a goal, a check is correctness.
    result["targets"] = targets(result)
    result["finished_at"] = datetime.now(UTC).isoformat()
    result["passed"] = (
        all(s["passed"] for s in result["scenarios"])
        and len(result["scenarios"]) == len(names)
        and all(c.get("passed", False) for c in result["checks"].values() if isinstance(c, dict))
        and "service_died" not in result["checks"]
        and result["service_log_events"].get("unhandled_error", 0) == 0
    )
    return result


def median_of_rounds(plain: dict[str, Any] | None, policy: dict[str, Any] | None) -> float | None:
    """The median over the interleaved rounds of each round's ops/s ratio, policy over
    plain: round k of each sends the same share of every worker's requests, so the
    ratio is plain's time over policy's. None unless both ran the same rounds and
    every request of both succeeded (so each round's ops are its share)."""
    if not plain or not policy:
        return None
    a, b = plain.get("round_seconds") or [], policy.get("round_seconds") or []
    complete = all(s["ops"] == s["planned"] and not s["capped"] for s in (plain, policy))
    if len(a) < 2 or len(a) != len(b) or not complete:
        return None
    # A round too short to time (none of its shares had a request: the smoke
    # test's 20 requests over 20 rounds and 32 workers) says nothing.
    ratios = [x / y for x, y in zip(a, b, strict=True) if x > 0 and y > 0]
    return round(statistics.median(ratios), 3) if ratios else None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every scenario's request count (default 1)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="request count of every scenario before --scale (default: each "
        "scenario's own: 300 sequential, 5000 spread debits and reads, 800 shared "
        "debits, 640 transfers); for the reserve_capture scenarios, the count of "
        "reserve+capture pairs (800); for the usage scenarios, the count of events "
        "(800 single, 5000 single at 32 workers, 20000 in batches at 4 workers, "
        "32000 at 16); for "
        "grants_batch_1000, the grants in its one batch (1000, at most 1000, "
        "not times --scale)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers of the concurrent scenarios (default 32, transfers and "
        "usage_single 16, usage_batch_500 4, usage_batch_500_c16 16, at most one "
        "per batch)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this scenario (repeatable, or comma-separated): " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        dest="json_path",
        help=f"write the JSON result here (default {DEFAULT_JSON.relative_to(REPO)})",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL server to create the bench database on "
        "(default DATABASE_URL; unset: a throwaway server)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=USAGE_BATCH_SIZE_DEFAULT,
        help=f"events per POST /v1/usage:batch in usage_batch_500, 1..1000 "
        f"(default {USAGE_BATCH_SIZE_DEFAULT})",
    )
    parser.add_argument(
        "--wallets",
        type=int,
        default=SPREAD_WALLETS_DEFAULT,
        help="wallets that debit_spread_32, read_32 and usage_single_32 spread over, "
        "times --scale "
        f"(default {SPREAD_WALLETS_DEFAULT})",
    )
    parser.add_argument(
        "--fsync",
        choices=("on", "off"),
        default="on",
        help="on a server the bench starts itself: fsync, synchronous_commit and "
        "full_page_writes, and its files on disk rather than tmpfs (default on, as "
        "the issue-10 figures; a server given by --database-url is left as it is)",
    )
    parser.add_argument(
        "--pgbench-seconds",
        type=float,
        default=PGBENCH_SECONDS_DEFAULT,
        help="seconds of the pgbench tpcb-like reference, 0 to skip it "
        f"(default {PGBENCH_SECONDS_DEFAULT:g})",
    )
    parser.add_argument(
        "--pgbench-scale",
        type=int,
        default=PGBENCH_SCALE_DEFAULT,
        help=f"pgbench -i -s for the reference (default {PGBENCH_SCALE_DEFAULT})",
    )
    parser.add_argument(
        "--stat-statements",
        action="store_true",
        help="preload pg_stat_statements (track = all) on the server the bench "
        "starts, and print each scenario's top 10 statements by total time",
    )
    parser.add_argument(
        "--wrk-seconds",
        type=float,
        default=0.0,
        help="after the scenarios, the throughput phases with wrk (bench/wrk.py): debits and "
        "balance reads over --wallets wallets at 32 connections, this long each; the "
        "debit and read targets then use their figures (default 0: off; make bench: 10)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.workers is not None and not 1 <= args.workers <= 256:
        parser.error("--workers must be 1..256")
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size must be 1..1000")
    if args.wallets < 1:
        parser.error("--wallets must be at least 1")
    if args.wrk_seconds < 0:
        parser.error("--wrk-seconds must be >= 0")
    if args.pgbench_seconds < 0 or args.pgbench_scale < 1:
        parser.error("--pgbench-seconds must be >= 0 and --pgbench-scale >= 1")
    only = tuple(n.strip() for item in args.only for n in item.split(",") if n.strip())
    return Options(
        scale=args.scale,
        requests=args.requests,
        workers=args.workers,
        only=only,
        json_path=args.json_path.resolve(),
        database_url=args.database_url,
        seed=args.seed,
        batch_size=args.batch_size,
        wallets=args.wallets,
        fsync=args.fsync == "on",
        pgbench_seconds=args.pgbench_seconds,
        pgbench_scale=args.pgbench_scale,
        stat_statements=args.stat_statements,
        wrk_seconds=args.wrk_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    selected(opts.only)  # fail fast on a typo
    result = run_async(run_bench(opts))
    write_json(result, opts.json_path)
    print(table(result))
    print(json.dumps(result, indent=2))
    print(f"bench: wrote {opts.json_path}", file=sys.stderr)
    return 0 if result["passed"] else 1
