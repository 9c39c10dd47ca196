"""How a finance report reads its query: one page under the report statement
timeout, or every row streamed from a server-side cursor for a CSV export.
Both run the same named query with the same arguments, so a report writes its
arguments once and picks one of the two."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from service.journal import Database

# CSV exports read one query through a cursor, this many rows at a time; the
# page size that stands for "no limit" in the queries that take one.
STREAM_BATCH = 2000
ALL_ROWS = 2**31 - 1


async def fetch_report(ledger: Database, query: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of a report query, allowed the report statement timeout, with
    JIT off (Database.fetch_slow says why)."""
    return await ledger.fetch_slow(
        query, ledger.config.report_statement_timeout_ms, *args, jit=False
    )


def stream_report(ledger: Database, query: str, *args: Any) -> AsyncIterator[list[asyncpg.Record]]:
    """The rows of a report query in lists of STREAM_BATCH, read through a
    cursor (Database.stream_slow), under the same timeout as fetch_report."""
    return ledger.stream_slow(
        query,
        ledger.config.report_statement_timeout_ms,
        *args,
        batch=STREAM_BATCH,
        jit=False,
    )
