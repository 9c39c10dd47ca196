"""The same-run reference: pgbench's built-in tpcb-like script on the bench's server.

Absolute figures from a shared 2-core machine say little; what PostgreSQL
itself manages on the same server, in the same run, is the yardstick the
issue-10 targets are ratios of. tpcb-like is five statements per
transaction (three UPDATEs of account, teller and branch, a SELECT, an
INSERT into history): about what a double-entry debit has to do.

In a database of its own (`tokenledger_pgbench_<pid>`, created and dropped
here): `pgbench -i -s SCALE -q`, then `pgbench -b tpcb-like -c 8 -j 2 -T
SECONDS`. Measured: the TPS pgbench reports, and the CPU-seconds of every
process of the server (the postmaster's whole tree, exited backends
included; see bench/cpu.py) per transaction.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import cpu

CLIENTS = 8
THREADS = 2
INIT_TIMEOUT_SECONDS = 300.0
# pgbench -T runs this much past its duration at most before we give up on it.
RUN_GRACE_SECONDS = 60.0


def find_pgbench() -> tuple[str | None, list[str]]:
    """The pgbench binary, and where it was looked for."""
    looked = ["PATH"]
    found = shutil.which("pgbench")
    if found:
        return found, looked
    pg_config = shutil.which("pg_config")
    if pg_config:
        looked.append("pg_config --bindir")
        try:
            out = subprocess.run(  # noqa: S603  # why: a fixed tool found on PATH
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out and os.access(Path(out) / "pgbench", os.X_OK):
            return str(Path(out) / "pgbench"), looked
    looked.append("/usr/lib/postgresql/*/bin")
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if os.access(bindir / "pgbench", os.X_OK):
            return str(bindir / "pgbench"), looked
    return None, looked


def parse_output(text: str) -> dict[str, Any]:
    """The figures of pgbench's closing report."""

    def number(pattern: str) -> float | None:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    processed = number(r"number of transactions actually processed:\s*(\d+)")
    failed = number(r"number of failed transactions:\s*(\d+)")
    return {
        "tps": number(r"tps = ([\d.]+) \(without initial connection time\)")
        or number(r"tps = ([\d.]+)"),
        "transactions": None if processed is None else int(processed),
        "failed": None if failed is None else int(failed),
        "latency_avg_ms": number(r"latency average = ([\d.]+) ms"),
    }


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run pgbench; a timeout or a failure to start is an exit code too (-1),
    so that the bench reports it rather than dying of it."""
    try:
        return subprocess.run(  # noqa: S603  # why: pgbench found by find_pgbench, our arguments
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # PGAPPNAME tells its backends apart in pg_stat_activity.
            env={**os.environ, "PGAPPNAME": "pgbench"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, -1, "", f"{type(exc).__name__}: {exc}")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def reference(
    admin_dsn: str,
    database_dsn: str,
    name: str,
    *,
    seconds: float,
    scale: int,
    postmaster_pid: int | None,
) -> dict[str, Any]:
    """Run the reference; never raises for pgbench's own failures (they are
    reported in the result, `available` or `error`), only for the server's."""
    result: dict[str, Any] = {
        "script": "tpcb-like",
        "clients": CLIENTS,
        "threads": THREADS,
        "seconds": seconds,
        "scale": scale,
        "database": name,
    }
    binary, looked = find_pgbench()
    result["pgbench"] = binary
    if binary is None:
        result["available"] = False
        result["error"] = "pgbench not found (looked in " + ", ".join(looked) + ")"
        return result
    result["available"] = True
    conn = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
        await conn.execute(f'CREATE DATABASE "{name}"', timeout=60)
    finally:
        await conn.close(timeout=10)
    try:
        started = time.monotonic()
        init = await asyncio.to_thread(
            _run, [binary, "-i", "-q", "-s", str(scale), database_dsn], INIT_TIMEOUT_SECONDS
        )
        result["init_s"] = round(time.monotonic() - started, 2)
        if init.returncode != 0:
            result["error"] = f"pgbench -i failed ({init.returncode}): {init.stderr[-1000:]}"
            return result
        args = [binary, "-b", "tpcb-like", "-c", str(CLIENTS), "-j", str(THREADS)]
        args += ["-T", str(max(1, round(seconds))), database_dsn]
        server_before = cpu.tree_cpu_seconds(postmaster_pid)
        client_before = _children_cpu_seconds()
        started = time.monotonic()
        run = await asyncio.to_thread(_run, args, seconds + RUN_GRACE_SECONDS)
        wall = time.monotonic() - started
        server_after = cpu.tree_cpu_seconds(postmaster_pid)
        client_cpu = _children_cpu_seconds() - client_before
        result["wall_s"] = round(wall, 2)
        result.update(parse_output(run.stdout))
        if run.returncode != 0 or result["tps"] is None:
            result["error"] = (
                f"pgbench failed ({run.returncode}): {(run.stderr or run.stdout)[-1000:]}"
            )
            return result
        txns = result["transactions"] or 0
        result["pgbench_client_cores"] = round(client_cpu / wall, 3)
        if server_before is not None and server_after is not None and txns:
            server = server_after - server_before
            result["postgres_server_cores"] = round(server / wall, 3)
            result["postgres_server_cpu_ms_per_txn"] = round(server / txns * 1000, 4)
        else:
            result["postgres_server_cpu_ms_per_txn"] = None
            result["cpu_note"] = "the server's processes are not visible in /proc here"
        return result
    finally:
        conn = await asyncpg.connect(admin_dsn, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
        finally:
            await conn.close(timeout=10)
