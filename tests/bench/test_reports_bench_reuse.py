"""bench.reports --keep leaves its database behind and --reuse measures on it again
without building it (issue 16, the reports' speed: measuring one change after another on
the same month)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import asyncpg

from bench import reports
from bench.postgres import drop_databases
from service.devdb import Server


def test_keep_then_reuse(pg_server: Server) -> None:
    """A --keep run leaves the database; a --reuse run measures on it (every period of
    every grouping, no error) and leaves it too; each run's load average is recorded."""
    name = reports.kept_name(30, 300)

    def run(**flags: bool) -> dict[str, Any]:
        args = argparse.Namespace(
            employees=30, events=300, runs=1, database_url=pg_server.dsn, **flags
        )
        return asyncio.run(reports.main(args))

    async def exists() -> bool:
        conn = await asyncpg.connect(pg_server.dsn)
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        finally:
            await conn.close()

    try:
        kept = run(keep=True, reuse=False)
        assert asyncio.run(exists())
        reused = run(keep=False, reuse=True)
        assert asyncio.run(exists())
        assert set(reused["build_seconds"]) == {"schema"}
        results = reused["results"]
        paths = {r["path"] for r in results if r["path"] != "journal"}
        assert paths == {p for p, *_ in reports.PERIODS}
        assert not [r for r in results if str(r["http_json_seconds"]).startswith("error")]
        assert [r["rows"] for r in results] == [r["rows"] for r in kept["results"]]
        for summary in (kept, reused):
            assert len(summary["loadavg_start"]) == 3
    finally:
        asyncio.run(drop_databases(pg_server.dsn, [name]))
