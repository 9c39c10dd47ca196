"""Faults injected into a running service, and waiting for it to recover."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from bench.chaos_ops import Tally
from bench.process import Service

KILL_SQL = """
SELECT count(*) FROM (
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE application_name = 'tokenledger' AND datname = current_database()
      AND pid <> pg_backend_pid()
) AS killed
"""


async def killer(dsn: str, every: float, stop: asyncio.Event, tally: Tally) -> None:
    """Every `every` seconds, terminate the service's database connections."""
    conn: asyncpg.Connection | None = None
    try:
        conn = await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": "tokenledger-chaos"}
        )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
                return
            except TimeoutError:
                pass
            try:
                killed = await conn.fetchval(KILL_SQL, timeout=10)
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                tally.kill_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            tally.kills += 1
            tally.connections_killed += int(killed or 0)
    finally:
        if conn is not None:
            await conn.close(timeout=10)


async def wait_ready_again(service: Service, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=service.base_url, timeout=2.0, trust_env=False) as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    return False
