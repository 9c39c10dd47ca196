"""Databases for the tests on the session's PostgreSQL server.

Finding or starting the server is service/devdb.py's (the bench uses it
too); what stays here is the tests' own: a database cloned from the template
per test, and running a coroutine from a synchronous fixture.

No database is a failure, never a skip: a suite that skips every database test
would pass while checking nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from service.devdb import Server, run_sync, start_server
from service.devdb_local import find_pg_bindir

__all__ = ["Server", "cloned_database", "execute", "find_pg_bindir", "run_sync", "start_server"]


async def execute(dsn: str, *statements: str) -> None:
    """Run statements one by one on a short-lived connection (CREATE DATABASE
    cannot run inside a transaction block, so they are not batched)."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close(timeout=30)


async def _create_clone(dsn: str, name: str, template: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        # Copying the template's files whole is faster for a small database
        # than the WAL_LOG default of PostgreSQL 15+ (~25 ms against ~40 ms
        # here); older servers copy files anyway and lack the option.
        major = conn.get_server_version().major
        strategy = " STRATEGY FILE_COPY" if major >= 15 else ""
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
    finally:
        await conn.close(timeout=30)


@contextmanager
def cloned_database(server: Server, template: str) -> Iterator[str]:
    """A new database copied from `template`, as a DSN; dropped on exit."""
    name = f"t_{uuid.uuid4().hex}"
    run_sync(_create_clone(server.dsn, name, template))
    try:
        yield server.dsn_for(name)
    finally:
        # FORCE ends connections a test left open (say, a pool it never closed).
        run_sync(execute(server.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
