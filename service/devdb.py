"""A PostgreSQL for development: throwaway for the tests and the bench, kept for `make run`.

Development only; production always names its database in DATABASE_URL. The
tests (tests/conftest.py) and the bench (bench/postgres.py) both need a
server they can create databases on and throw away, so finding one lives
here, once, rather than in tests/ where the bench would have to reach for it.

`start_server()` tries, in order, and returns the first that works:

1. ``env``: the server named by ``TEST_DATABASE_URL``, used as-is. The role must
   be a superuser or able to CREATE DATABASE; nothing is started or stopped.
2. ``docker``: a testcontainers ``postgres:16-alpine``, only when a Docker engine
   answers a ping within a second (the ``docker`` client alone is not enough).
3. ``local``: a throwaway cluster made with this machine's ``initdb``/``pg_ctl``
   (found through ``pg_config --bindir``, PATH, or the newest
   ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to run as root, so under
   root the cluster belongs to, and runs as, the ``postgres`` system user.
4. ``pgserver``: the PostgreSQL binaries shipped in the ``pgserver`` wheel, which
   needs nothing from the machine but pip (it makes its own system user under
   root).

``TOKENLEDGER_TEST_PG=env|docker|local|pgserver`` forces one source: it is then
an error if that one cannot start, rather than a quiet fall through to the next.

`start_embedded()` is `make run`'s server when DATABASE_URL is unset: the
pgserver wheel's binaries again, so `make run` works on a machine with nothing
but python3, with its files kept between runs.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service import devdb_local
from service.devdb_local import scratch_dir

T = TypeVar("T")

KINDS = ("env", "docker", "local", "pgserver")
FORCE_ENV = "TOKENLEDGER_TEST_PG"
DEFAULT_DATA_DIR = Path(".data/pg")

# Durability is worthless for a database that is deleted within minutes, and
# turning it off makes CREATE DATABASE and every commit several times cheaper.
# max_connections leaves room for pools of parallel API tests.
THROWAWAY_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "256MB",
    # Segments in the data directory rather than /dev/shm, so that removing
    # the directory after `pg_ctl stop -m immediate` leaves nothing behind.
    "dynamic_shared_memory_type": "mmap",
}
# The subset that a running server takes on a reload, without a restart.
RELOADABLE_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")


class NoDatabaseError(RuntimeError):
    """No PostgreSQL server could be found or started."""


@dataclass
class Server:
    """A running PostgreSQL server; `dsn` names its `postgres` database."""

    dsn: str
    kind: str
    _stop: Callable[[], None] = field(repr=False, default=lambda: None)
    _stopped: bool = field(repr=False, default=False)

    def dsn_for(self, database: str) -> str:
        """The same server and credentials, connected to another database."""
        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(path="/" + database))

    def stop(self) -> None:
        """Stop the server and remove its files; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self._stop()


@dataclass(frozen=True)
class _Wanted:
    """What a started server is asked for: THROWAWAY_SETTINGS with the
    caller's on top, and its files on disk rather than in memory."""

    settings: Mapping[str, str]
    on_disk: bool


def start_server(*, on_disk: bool = False, settings: Mapping[str, str] | None = None) -> Server:
    """Start (or find) a throwaway server; see the module docstring for the order.

    `on_disk`: a started cluster's files on disk rather than in /dev/shm (the
    bench with fsync on, which would otherwise measure a disk that never
    waits). `settings`: server settings over THROWAWAY_SETTINGS (a server
    named by TEST_DATABASE_URL is used as it is).
    """
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced and forced not in KINDS:
        raise NoDatabaseError(f"{FORCE_ENV}={forced!r}: expected one of {', '.join(KINDS)}")
    wanted = _Wanted({**THROWAWAY_SETTINGS, **(settings or {})}, on_disk)
    reasons: list[str] = []
    for kind in (forced,) if forced else KINDS:
        started = time.monotonic()
        try:
            server = _STARTERS[kind](wanted)
        except Exception as exc:
            if forced:
                raise NoDatabaseError(f"{FORCE_ENV}={forced}: {exc}") from exc
            reasons.append(f"{kind}: {exc}")
            continue
        if server is None:
            reasons.append(f"{kind}: not available")
            continue
        atexit.register(server.stop)
        elapsed = time.monotonic() - started
        print(f"devdb: PostgreSQL from {kind} in {elapsed:.1f}s", file=sys.stderr)
        return server
    raise NoDatabaseError(
        "no PostgreSQL found. Set TEST_DATABASE_URL, start Docker, install "
        "the postgresql server package, or `pip install pgserver`. Tried:\n  "
        + "\n  ".join(reasons)
    )


# --- 1. TEST_DATABASE_URL ---------------------------------------------------


def _from_env(wanted: _Wanted) -> Server | None:
    dsn = os.environ.get("TEST_DATABASE_URL")
    if not dsn:
        return None
    return Server(dsn=dsn, kind="env")


# --- 2. Docker via testcontainers -------------------------------------------


def _docker_answers() -> bool:
    """Whether a Docker engine answers now; the client binary alone says nothing."""
    try:
        import docker

        client = docker.from_env(timeout=1)
    except Exception:
        # No socket, or nothing listening on it: from_env asks the engine for
        # its API version and fails at once.
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _from_docker(wanted: _Wanted) -> Server | None:
    if not _docker_answers():
        return None
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        "postgres:16-alpine",
        username="postgres",
        password="postgres",  # noqa: S106  # why: a throwaway container on loopback
        dbname="postgres",
        driver=None,
    )
    container.with_command(
        "postgres " + " ".join(f"-c {name}={value}" for name, value in wanted.settings.items())
    )
    container.start()
    return Server(dsn=container.get_connection_url(), kind="docker", _stop=container.stop)


# --- 3. A throwaway cluster from local binaries ------------------------------


def _from_local(wanted: _Wanted) -> Server | None:
    started = devdb_local.start_cluster(wanted.settings, on_disk=wanted.on_disk)
    if started is None:
        return None
    dsn, stop = started
    return Server(dsn=dsn, kind="local", _stop=stop)


# --- 4. pgserver (also make run's embedded server) ------------------------------


def _import_pgserver() -> ModuleType:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI,
        # containers); pgserver then keeps its files under /tmp, which is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver
    return pgserver


def _from_pgserver(wanted: _Wanted) -> Server | None:
    pgserver = _import_pgserver()
    workdir = scratch_dir("tokenledger-pgserver-", on_disk=wanted.on_disk)
    try:
        handle = pgserver.get_server(workdir, cleanup_mode="stop")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def stop() -> None:
        try:
            handle.cleanup()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    server = Server(dsn=handle.get_uri(), kind="pgserver", _stop=stop)
    try:
        run_sync(_reload_settings(server.dsn, wanted.settings))
    except BaseException:
        server.stop()
        raise
    return server


async def _reload_settings(dsn: str, settings: Mapping[str, str]) -> None:
    # pgserver starts the server itself, so only settings that a reload picks
    # up can be changed (max_connections stays at its default of 100).
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        for name in RELOADABLE_SETTINGS:
            await conn.execute(f"ALTER SYSTEM SET {name} = '{settings[name]}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


_STARTERS: dict[str, Callable[[_Wanted], Server | None]] = {
    "env": _from_env,
    "docker": _from_docker,
    "local": _from_local,
    "pgserver": _from_pgserver,
}


def run_sync(coro: Coroutine[object, object, T]) -> T:
    """Run a coroutine to completion on a private event loop.

    The loop is never made the thread's current one, so this cannot disturb
    the loops pytest-asyncio manages for async tests and fixtures.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# --- make run ------------------------------------------------------------------


def start_embedded(data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, Callable[[], None]]:
    """Start (or join) a PostgreSQL server whose files live in `data_dir`.

    Returns its DSN and a function that stops it. The data directory is kept
    between runs, so accounts and balances created while trying the service
    survive a restart; delete the directory to start over. A server left
    running by a process that died is reused, not started twice.
    """
    pgserver = _import_pgserver()
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    # "stop" keeps the files and stops the server when the last process using
    # it lets go (pgserver counts them), here or at interpreter exit.
    server = pgserver.get_server(data_dir, cleanup_mode="stop")

    def stop() -> None:
        """Stop the server cleanly (a fast shutdown with a checkpoint)."""
        server.cleanup()

    return str(server.get_uri()), stop


def _forget_dead_handles(data_dir: Path) -> None:
    """pgserver stops the server when the last process using it exits and
    counts those processes in a file; one killed outright (kill -9, a closed
    terminal) stays counted and would keep the server running after the next
    clean Ctrl-C. Drop the processes that no longer exist."""
    path = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
