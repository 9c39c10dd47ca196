"""`make bench-audit`: is `audit --full` linear in the size of the ledger?

    python -m bench.audit_scale [--sizes 1M,10M] [--runs 2] [--employees 10000]
                                [--database-url DSN] [--reuse] [--keep]
                                [--json PATH]

Builds a year of history (bench/year.py, no hash chain) at each size, with
employees in proportion to the size (the same history per employee, so the
same mix of rows per entry: employees_for), on one
PostgreSQL server (a throwaway one of its own, files on disk, unless
--database-url names one), then runs `audit --full` on each --runs times,
the sizes taking turns (1M, 10M, 1M, 10M), so that a change in the
machine's load falls on both sizes rather than on one.

Wall time alone says little on a shared machine: a run of the same audit
moved 2x with other people's load. So each check is also timed in CPU
seconds, read from /proc: the backend's own (the leader) and the whole
server's process tree (parallel workers, and the writes of spilled sorts
and hashes, count there). Reported per journal entry, per size, with the
ratio of the largest size to the smallest (the issue's target: at most
1.3x), overall and per check: a check that grows faster than its input
shows up there.

--reuse keeps a year built earlier by this command or by bench.scale
--no-chain with the same size and employees (its parameters are in the
database's comment; bench.year.year_database) rather than
building it again (a 10M year takes about 25 minutes); --keep leaves the
databases behind for a later --reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.postgres import admin_server, server_identity
from bench.year import log, size, year_database, year_name
from service import db
from service.audit import CHECKS, audit


def employees_for(entries: int, args: argparse.Namespace) -> int:
    """Employees of the year at a size: --employees at the largest, in
    proportion below it, so that every size has the same history per
    employee and the same mix of rows per entry. With 10,000 employees at
    both 1M and 10M entries, the 1M year was mostly monthly grants, rollovers
    and expiries (six entries per employee and month) and the 10M year mostly
    spend: 0.37 usage events per entry against 0.97, 4x the reservations
    per entry, and the usage checks looked 3.7x slower per entry for that
    alone."""
    if args.same_employees:
        return int(args.employees)
    return max(10, round(args.employees * entries / max(args.sizes)))


def report(results: dict[int, list[dict[str, Any]]]) -> str:
    """Per size: each run's seconds, the best run per entry; then the ratio of
    the largest size to the smallest, in all and per check."""
    sizes = sorted(results)
    lines = [
        "| entries | run | wall s | server CPU s | backend CPU s | wall µs/entry | "
        "server CPU µs/entry |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        for i, r in enumerate(results[n]):
            t, e = r["total"], r["entries"]
            lines.append(
                f"| {e:,} | {i + 1} | {t['wall']:.1f} | {t['server_cpu']:.1f} | "
                f"{t['backend_cpu']:.1f} | {t['wall'] / e * 1e6:.2f} | "
                f"{t['server_cpu'] / e * 1e6:.2f} |"
            )
    if len(sizes) < 2:
        return "\n".join(lines)
    small, large = sizes[0], sizes[-1]

    def best(n: int, key: str, check: str | None = None) -> float:
        """The lowest per-entry figure of a size's runs (the least disturbed)."""
        values = []
        for r in results[n]:
            part = r["total"] if check is None else r["checks"][check]
            values.append(part[key] / r["entries"])
        return min(values)

    lines += [
        "",
        f"Ratio per entry, {large:,} vs {small:,} (best run of each size; target <= 1.3):",
        "",
        "| check | wall µs/entry small | large | ratio "
        "| server CPU µs/entry small | large | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for check in (None, *CHECKS):
        label = "**all**" if check is None else check
        w = [best(n, "wall", check) * 1e6 for n in (small, large)]
        c = [best(n, "server_cpu", check) * 1e6 for n in (small, large)]
        wr = f"{w[1] / w[0]:.2f}" if w[0] > 0 else "-"
        cr = f"{c[1] / c[0]:.2f}" if c[0] > 0 else "-"
        lines.append(
            f"| {label} | {w[0]:.3f} | {w[1]:.3f} | {wr} | {c[0]:.3f} | {c[1]:.3f} | {cr} |"
        )
    return "\n".join(lines)


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


async def main(args: argparse.Namespace) -> dict[str, Any]:
    drop = [] if args.keep else [year_name(n, False) for n in args.sizes]
    async with admin_server(args.database_url, drop) as admin_dsn:
        postmaster, version = await server_identity(admin_dsn)
        dsns = {}
        for n in args.sizes:
            year = await year_database(
                admin_dsn, n, employees_for(n, args), chain=False, reuse=args.reuse
            )
            dsns[n] = str(year["dsn"])
        results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sizes}
        for run in range(args.runs):
            for n in args.sizes:
                r = await timed_audit(dsns[n], postmaster)
                results[n].append(r)
                t = r["total"]
                log(
                    f"bench.audit_scale: run {run + 1}, {r['entries']:,} entries: "
                    f"{t['wall']:.1f}s wall, {t['server_cpu']:.1f}s server CPU"
                )
        return {
            "command": "python -m bench.audit_scale " + " ".join(sys.argv[1:]),
            "server_version": version,
            "results": {str(n): v for n, v in results.items()},
            "table": report(results),
        }


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: sorted(size(part) for part in text.split(",")),
        default=[1_000_000, 10_000_000],
        help="journal entries of each year, comma-separated (default 1M,10M)",
    )
    parser.add_argument("--runs", type=int, default=2, help="audits of each size (default 2)")
    parser.add_argument(
        "--employees",
        type=size,
        default=10_000,
        help="employees of the largest year; smaller ones in proportion (employees_for)",
    )
    parser.add_argument(
        "--same-employees",
        action="store_true",
        help="--employees at every size (the mix of rows then differs by size)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="a superuser DSN of a server to build on (default: a throwaway one of our own)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep a year built earlier with the same parameters"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the databases behind (for --reuse)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.keep and args.database_url is None:
        parser.error("--keep needs --database-url: a throwaway server is removed at the end")
    summary = asyncio.run(main(args))
    print(summary["table"])
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    cli()
