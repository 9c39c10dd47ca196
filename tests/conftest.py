"""Database fixtures: one PostgreSQL per session, a template built once from
schema.sql, and a fresh clone of the template for every test that asks.

Cloning a template is a file copy inside the server, far cheaper than applying
the schema per test, and it means tests never see each other's rows and can
run in parallel. Under pytest-xdist each worker starts its own server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from service import migrate
from service.devdb import Server, run_sync, start_server
from tests.pg import cloned_database, execute


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The session's PostgreSQL server (service/devdb.py says where it comes from)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # Let the one line naming the server's kind reach the terminal.
    with capture.global_and_fixture_disabled():
        server = start_server()
    try:
        yield server
    finally:
        server.stop()


async def _build_template(server: Server, name: str) -> None:
    await execute(
        server.dsn,
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'CREATE DATABASE "{name}"',
    )
    conn = await asyncpg.connect(server.dsn_for(name), timeout=30)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close(timeout=30)
    # A clone fails while anyone is connected to its template; refusing
    # connections makes a stray one fail where it happens instead.
    await execute(server.dsn, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')


@pytest.fixture(scope="session")
def template_database(pg_server: Server) -> Iterator[str]:
    """Name of the database that holds schema.sql and nothing else."""
    # xdist workers may share one server (TEST_DATABASE_URL), so each builds
    # a template of its own.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"tokenledger_template_{worker}" if worker else "tokenledger_template"
    run_sync(_build_template(pg_server, name))
    try:
        yield name
    finally:
        run_sync(execute(pg_server.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(pg_server: Server, template_database: str) -> Iterator[str]:
    """DSN of a database of this test's own, cloned from the template."""
    with cloned_database(pg_server, template_database) as dsn:
        yield dsn


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection (no codecs) to this test's own database."""
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        yield conn
    finally:
        await conn.close(timeout=30)
