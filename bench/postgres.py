"""PostgreSQL for a bench: a database of its own on a given server, or on a
throwaway one (service/devdb.py) made as durable as production when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench import cpu
from service import devdb, migrate
from service.devdb import Server


def dsn_for(dsn: str, database: str) -> str:
    """The same server and credentials, connected to another database."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn[:40]!r}")
    return urlunsplit(parts._replace(path="/" + database))


def redact(dsn: str) -> str:
    """The DSN without its password, for reports."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Database:
    """A fresh database of our own on some PostgreSQL server."""

    dsn: str
    admin_dsn: str
    name: str
    source: str
    server_version: str
    settings: dict[str, str]
    server: Server | None = None  # when we started the server ourselves

    async def apply_schema(self) -> None:
        """The service's schema, as `python -m service migrate` applies it."""
        conn = await asyncpg.connect(self.dsn, timeout=30)
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close(timeout=10)

    async def drop(self) -> None:
        """Drop the database, then stop the server if it was ours."""
        try:
            await drop_databases(self.admin_dsn, [self.name])
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)


# What a result records of the server's configuration.
RECORDED_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_preload_libraries",
    "max_connections",
    "shared_buffers",
)


# Settings a server the bench starts gets for --stat-statements: preloaded
# at start-up (the library cannot be loaded later), and counting the
# statements inside the ledger's PL/pgSQL functions too, where the cost is.
STAT_STATEMENTS_SETTINGS = {
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
}


def start_own_server(*, on_disk: bool, stat_statements: bool) -> Server:
    """A throwaway server as the tests run it (service/devdb.py), except:
    `on_disk`, the cluster's files on disk rather than in /dev/shm (where an
    fsync costs nothing, and a bench with fsync on would then measure a
    server that never waits for its disk); and `stat_statements`,
    pg_stat_statements preloaded."""
    return devdb.start_server(
        on_disk=on_disk, settings=STAT_STATEMENTS_SETTINGS if stat_statements else None
    )


async def make_durable(dsn: str) -> None:
    """Turn back on what a throwaway server turns off for speed (fsync,
    synchronous_commit, full_page_writes): all three take a reload."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        for setting in devdb.RELOADABLE_SETTINGS:
            await conn.execute(f"ALTER SYSTEM SET {setting} = on", timeout=30)
        await conn.execute("SELECT pg_reload_conf()", timeout=30)
    finally:
        await conn.close(timeout=10)


@contextlib.asynccontextmanager
async def admin_server(database_url: str | None, drop: Sequence[str] = ()) -> AsyncIterator[str]:
    """The admin DSN of the server named by `database_url`, or else of a
    throwaway durable one of our own (files on disk). On exit, whatever
    happens: the databases named in `drop` are dropped, then a server of our
    own is stopped and its files removed."""
    server = None
    if database_url is None:
        server = await asyncio.to_thread(start_own_server, on_disk=True, stat_statements=False)
        admin_dsn = server.dsn
    else:
        admin_dsn = database_url
    try:
        yield admin_dsn
    finally:
        try:
            await drop_databases(admin_dsn, drop)
        finally:
            if server is not None:
                await asyncio.to_thread(server.stop)


async def drop_databases(admin_dsn: str, names: Sequence[str]) -> None:
    """DROP DATABASE each of `names`, FORCE: connections left open end."""
    if not names:
        return
    conn = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
    finally:
        await conn.close(timeout=10)


async def server_identity(admin_dsn: str) -> tuple[int | None, str]:
    """The server's postmaster pid when it runs on this machine (for its CPU,
    bench/cpu.py), and its version()."""
    conn = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        postmaster = cpu.local_postmaster(int(await conn.fetchval("SELECT pg_backend_pid()")))
        return postmaster, str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close(timeout=10)


async def server_facts(conn: asyncpg.Connection) -> dict[str, str]:
    """RECORDED_SETTINGS, and where the data lives (its filesystem: fsync on
    tmpfs is free) when the role may see it."""
    settings = {}
    for setting in RECORDED_SETTINGS:
        settings[setting] = str(await conn.fetchval(f"SHOW {setting}"))
    try:
        data_directory = str(await conn.fetchval("SHOW data_directory"))
    except asyncpg.PostgresError:  # not a superuser, nor in pg_read_all_settings
        return settings
    settings["data_directory"] = data_directory
    settings["data_directory_fs"] = str(cpu.filesystem_of(data_directory))
    return settings


async def provision(
    admin_dsn: str | None, name: str, *, durable: bool = False, stat_statements: bool = False
) -> Database:
    """Create database `name` on admin_dsn's server, or on a throwaway server
    (service/devdb.py) when admin_dsn is None. `durable`: that throwaway server
    keeps its files on disk and runs with fsync, synchronous_commit and
    full_page_writes on, as production does; a server named by admin_dsn
    is never reconfigured (it may be shared), only its settings recorded.
    `stat_statements`: that throwaway server preloads pg_stat_statements."""
    server = None
    source = "database-url"
    if admin_dsn is None:
        server = await asyncio.to_thread(
            start_own_server, on_disk=durable, stat_statements=stat_statements
        )
        admin_dsn = server.dsn
        source = f"devdb:{server.kind}"
    try:
        if server is not None and durable:
            await make_durable(admin_dsn)
        # A new connection: the reload is certain to have reached it.
        conn = await asyncpg.connect(admin_dsn, timeout=30)
        try:
            version = str(await conn.fetchval("SELECT version()"))
            settings = await server_facts(conn)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
            await conn.execute(f'CREATE DATABASE "{name}"', timeout=60)
        finally:
            await conn.close(timeout=10)
    except BaseException:
        if server is not None:
            await asyncio.to_thread(server.stop)
        raise
    return Database(
        dsn=dsn_for(admin_dsn, name),
        admin_dsn=admin_dsn,
        name=name,
        source=source,
        server_version=version,
        settings=settings,
        server=server,
    )
