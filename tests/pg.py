"""One PostgreSQL server for a test session, from the best source this machine has.

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

No database is a failure, never a skip: a suite that skips every database test
would pass while checking nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

T = TypeVar("T")

KINDS = ("env", "docker", "local", "pgserver")
FORCE_ENV = "TOKENLEDGER_TEST_PG"

# Durability is worthless for a database that is deleted within minutes, and
# turning it off makes CREATE DATABASE and every commit several times cheaper.
# max_connections leaves room for pools of parallel API tests.
TEST_SETTINGS = {
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
    """No PostgreSQL server could be found or started for the tests."""


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


def start_server() -> Server:
    """Start (or find) the session's server; see the module docstring for the order."""
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced and forced not in KINDS:
        raise NoDatabaseError(f"{FORCE_ENV}={forced!r}: expected one of {', '.join(KINDS)}")
    kinds = (forced,) if forced else KINDS
    reasons: list[str] = []
    for kind in kinds:
        started = time.monotonic()
        try:
            server = _STARTERS[kind]()
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
        print(f"tests.pg: PostgreSQL from {kind} in {elapsed:.1f}s", file=sys.stderr)
        return server
    raise NoDatabaseError(
        "no PostgreSQL for the tests. Set TEST_DATABASE_URL, start Docker, install "
        "the postgresql server package, or `pip install pgserver`. Tried:\n  "
        + "\n  ".join(reasons)
    )


# --- 1. TEST_DATABASE_URL ---------------------------------------------------


def _from_env() -> Server | None:
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


def _from_docker() -> Server | None:
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
        "postgres " + " ".join(f"-c {name}={value}" for name, value in TEST_SETTINGS.items())
    )
    container.start()
    return Server(dsn=container.get_connection_url(), kind="docker", _stop=container.stop)


# --- 3. A throwaway cluster from local binaries ------------------------------


def find_pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None if PostgreSQL isn't installed."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    on_path = shutil.which("initdb")
    if on_path:
        # Resolve symlinks such as /usr/local/bin/initdb: pg_ctl looks for the
        # postgres binary beside its real self.
        candidates.append(Path(on_path).resolve().parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def scratch_dir(prefix: str) -> Path:
    """A new private directory for a cluster, in memory when the machine allows.

    On a VM disk, CREATE DATABASE from the template costs ~200 ms even with
    fsync off; on tmpfs it costs ~30 ms, and every test pays it once.
    """
    shm = Path("/dev/shm")  # noqa: S108  # why: tmpfs on purpose, with a private mkdtemp inside
    base: str | None = None
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize >= 2 * 1024**3:
            base = str(shm)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Runner:
    """Runs PostgreSQL tools as the owner of the cluster: us, or `postgres` under root."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no `postgres` system user to run as"
                ) from None

    def chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def run(self, *args: str | Path, timeout: float = 60) -> None:
        # Output goes to a file, not a pipe: `pg_ctl start` leaves a server
        # behind that would otherwise keep the pipe open.
        user = self.user
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,  # the postgres user may not be able to enter ours
                timeout=timeout,
                check=False,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
            )
            if result.returncode != 0:
                out.seek(0)
                raise RuntimeError(
                    f"{Path(str(args[0])).name} failed ({result.returncode}): {out.read()[-2000:]}"
                )


def _from_local() -> Server | None:
    bindir = find_pg_bindir()
    if bindir is None:
        return None
    workdir = scratch_dir("tokenledger-pg-")
    try:
        runner = _Runner(workdir)
        runner.chown(workdir)
        datadir = workdir / "data"
        runner.run(
            bindir / "initdb",
            "-D",
            datadir,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # nothing of this cluster needs to survive a crash
        )
        return _start_local(bindir, runner, workdir, datadir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start_local(bindir: Path, runner: _Runner, workdir: Path, datadir: Path) -> Server:
    base_conf = (datadir / "postgresql.conf").read_text()
    last_error: Exception | None = None
    # A port picked free can be taken before the server binds it (xdist
    # workers start together), so try a few.
    for _ in range(3):
        port = _free_port()
        settings = {
            **TEST_SETTINGS,
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{workdir}'",
        }
        conf = base_conf + "\n# tests/pg.py\n"
        conf += "".join(f"{name} = {value}\n" for name, value in settings.items())
        (datadir / "postgresql.conf").write_text(conf)
        try:
            runner.run(
                bindir / "pg_ctl", "-D", datadir, "-l", workdir / "log", "-w", "-t", "60", "start"
            )
        except RuntimeError as exc:
            log = workdir / "log"
            last_error = RuntimeError(f"{exc}\n{log.read_text()[-2000:] if log.exists() else ''}")
            continue

        def stop() -> None:
            try:
                runner.run(bindir / "pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        return Server(
            dsn=f"postgresql://postgres@127.0.0.1:{port}/postgres", kind="local", _stop=stop
        )
    assert last_error is not None
    raise last_error


# --- 4. pgserver -------------------------------------------------------------


def _from_pgserver() -> Server | None:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI,
        # containers); pgserver then uses /tmp, which is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

    workdir = scratch_dir("tokenledger-pgserver-")
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
        run_sync(_reload_settings(server.dsn))
    except BaseException:
        server.stop()
        raise
    return server


async def _reload_settings(dsn: str) -> None:
    # pgserver starts the server itself, so only settings that a reload picks
    # up can be changed (max_connections stays at its default of 100).
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        for name in RELOADABLE_SETTINGS:
            await conn.execute(f"ALTER SYSTEM SET {name} = '{TEST_SETTINGS[name]}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


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


_STARTERS: dict[str, Callable[[], Server | None]] = {
    "env": _from_env,
    "docker": _from_docker,
    "local": _from_local,
    "pgserver": _from_pgserver,
}
