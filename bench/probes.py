"""Measured beside the requests: where the CPU went (the service, PostgreSQL,
this client, the machine) and, with --stat-statements, which statements
took the database's time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import cpu


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuProbe:
    """Where the CPU went during a scenario: the service (its process and
    every descendant: it may run several workers), PostgreSQL (the backends
    of the service's pool, by application_name; and the whole server, the
    postmaster's tree, which also holds the WAL writer, checkpointer and
    autovacuum that the pool's commits cause), this client, and the whole
    machine (whose busy share minus ours is the noise of other tenants).
    Linux /proc only (bench/cpu.py); figures in cores (1.0 = one core busy
    for the whole scenario) and in CPU-seconds, which Stats.summary divides
    by the scenario's operations."""

    def __init__(self, service_pid: int, dsn: str) -> None:
        self.service_pid = service_pid
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.postmaster: int | None = None

    async def open(self) -> None:
        self.conn = await asyncpg.connect(
            self.dsn, timeout=10, server_settings={"application_name": "tokenledger-bench"}
        )
        self.postmaster = cpu.local_postmaster(
            int(await self.conn.fetchval("SELECT pg_backend_pid()", timeout=10))
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close(timeout=10)

    async def snapshot(self) -> dict[str, Any]:
        pids: list[int] = []
        chain_seq = None
        if self.conn is not None:
            rows = await self.conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'tokenledger'",
                timeout=10,
            )
            pids = [int(r["pid"]) for r in rows]
            # The chainer's progress: how much of its work fell in this scenario.
            chain_seq = await self.conn.fetchval(
                "SELECT coalesce(max(seq), 0) FROM chain", timeout=10
            )
        table = cpu.process_table()
        backends = {pid: table[pid][1] for pid in pids if pid in table}
        return {
            "t": time.monotonic(),
            "service": cpu.tree_cpu_seconds(self.service_pid, table),
            "client": time.process_time(),
            "postgres": backends,
            "postgres_server": cpu.tree_cpu_seconds(self.postmaster, table),
            "machine": machine_ticks(),
            "chain_seq": chain_seq,
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(b["t"] - a["t"], 1e-9)

        def cores(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds / wall, 3)

        def diff(key: str) -> float | None:
            if a[key] is None or b[key] is None:
                return None
            return float(b[key] - a[key])

        service = diff("service")
        server = diff("postgres_server")
        # Backends that appeared during the scenario count from zero.
        pg = sum(v - a["postgres"].get(pid, 0.0) for pid, v in b["postgres"].items())
        busy = None
        if a["machine"] and b["machine"]:
            d_busy, d_total = (b["machine"][0] - a["machine"][0], b["machine"][1] - a["machine"][1])
            if d_total > 0:
                busy = round(d_busy / d_total * (os.cpu_count() or 1), 3)
        client = b["client"] - a["client"]
        ours = (service or 0.0) + (pg if server is None else server) + client
        return {
            "wall_s": round(wall, 4),
            "service_cores": cores(service),
            "postgres_cores": cores(pg),
            "postgres_server_cores": cores(server),
            "client_cores": cores(client),
            "machine_busy_cores": busy,
            "others_cores": None if busy is None else round(max(0.0, busy - ours / wall), 3),
            "service_cpu_s": None if service is None else round(service, 4),
            "postgres_cpu_s": round(pg, 4),
            "postgres_server_cpu_s": None if server is None else round(server, 4),
            "chained": None
            if a.get("chain_seq") is None or b.get("chain_seq") is None
            else b["chain_seq"] - a["chain_seq"],
        }


def add_cpu(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Two CpuProbe.delta answers as one over both spans (the rounds of an
    interleaved scenario): CPU-seconds and wall time add up, cores are
    CPU-seconds over the summed wall time, the machine's busy cores a
    wall-weighted mean."""
    if total is None:
        return part
    wall = total["wall_s"] + part["wall_s"]
    out: dict[str, Any] = {"wall_s": round(wall, 4)}
    for key in ("service", "postgres", "postgres_server"):
        a, b = total[f"{key}_cpu_s"], part[f"{key}_cpu_s"]
        seconds = None if a is None or b is None else a + b
        out[f"{key}_cpu_s"] = None if seconds is None else round(seconds, 4)
        out[f"{key}_cores"] = None if seconds is None else round(seconds / wall, 3)
    for key in ("client_cores", "machine_busy_cores", "others_cores"):
        a, b = total[key], part[key]
        out[key] = (
            None
            if a is None or b is None
            else round((a * total["wall_s"] + b * part["wall_s"]) / wall, 3)
        )
    a, b = total.get("chained"), part.get("chained")
    out["chained"] = None if a is None or b is None else a + b
    return out


class Statements:
    """pg_stat_statements for --stat-statements: reset before a scenario's
    timed part, its top statements by total time after it, so each scenario
    shows where its database time went (the issue's "find the cost before
    removing it"). With track = all, a function's call and the statements
    inside it both appear (`toplevel` tells them apart)."""

    TOP = 10
    QUERY_CHARS = 160

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> str | None:
        """None when ready, else why pg_stat_statements cannot be used."""
        try:
            self.conn = await asyncpg.connect(
                self.dsn, timeout=10, server_settings={"application_name": "tokenledger-bench"}
            )
            preloaded = str(await self.conn.fetchval("SHOW shared_preload_libraries"))
            if "pg_stat_statements" not in preloaded:
                await self.close()
                return (
                    "pg_stat_statements is not in shared_preload_libraries (the bench "
                    "preloads it only on a server it starts itself)"
                )
            await self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await self.reset()
        except (OSError, asyncpg.PostgresError) as exc:
            await self.close()
            return f"{type(exc).__name__}: {exc}"
        return None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close(timeout=10)
            self.conn = None

    async def reset(self) -> None:
        if self.conn is not None:
            await self.conn.execute("SELECT pg_stat_statements_reset()", timeout=30)

    async def top(self) -> list[dict[str, Any]]:
        if self.conn is None:
            return []
        rows = await self.conn.fetch(
            """
            SELECT toplevel, calls, total_exec_time, mean_exec_time, rows, query
            FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND query NOT LIKE '%pg_stat_statements%'
            ORDER BY total_exec_time DESC
            LIMIT $1
            """,
            self.TOP,
            timeout=30,
        )
        return [
            {
                "toplevel": bool(r["toplevel"]),
                "calls": int(r["calls"]),
                "total_ms": round(float(r["total_exec_time"]), 1),
                "mean_ms": round(float(r["mean_exec_time"]), 3),
                "rows": int(r["rows"]),
                "query": " ".join(str(r["query"]).split())[: self.QUERY_CHARS],
            }
            for r in rows
        ]
