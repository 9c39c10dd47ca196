"""Stopping: a real service process on SIGTERM, and `make run`'s embedded
PostgreSQL on Ctrl-C, SIGTERM and a closed terminal (SIGHUP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench.api import Api
from bench.process import Service, free_port

REPO = Path(__file__).resolve().parent.parent


async def _wait_for_lock_waiter(db: asyncpg.Connection, within: float = 10.0) -> None:
    """Until a backend of the service waits for a row lock (the request is in flight)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = 'tokenledger' AND datname = current_database()"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the request never reached its row lock")


async def _service_connections(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'tokenledger%' AND pid <> pg_backend_pid()"
        )
    )


@contextlib.asynccontextmanager
async def _debit_behind_a_lock(
    service: Service, database_url: str, db: asyncpg.Connection, key: str
) -> AsyncIterator[tuple[httpx.AsyncClient, asyncio.Task[httpx.Response], Any]]:
    """A debit of employee:e-1 sent to `service` and waiting (seen in pg_stat_activity) for
    the wallet's row lock, which another connection holds: yields the client, the request's
    task and that lock's transaction (roll it back to let the debit go on)."""
    lock = await asyncpg.connect(database_url)
    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("SELECT 1 FROM accounts WHERE address = 'employee:e-1' FOR UPDATE")
        async with httpx.AsyncClient(
            base_url=service.base_url,
            headers={"Authorization": f"Bearer {service.admin_key}"},
            trust_env=False,
            timeout=30,
        ) as client:
            debit = asyncio.create_task(
                client.post(
                    "/v1/debits",
                    json={"account": "employee:e-1", "amount": 100},
                    headers={"Idempotency-Key": key},
                )
            )
            await _wait_for_lock_waiter(db)
            yield client, debit, tx
    finally:
        await lock.close()


async def _started(database_url: str, tmp_path: Path, grace_seconds: float) -> Service:
    service = Service(
        database_url,
        tmp_path / "service.log",
        pool_max_size=5,
        extra_env={
            "TOKENLEDGER_WORKERS": "2",
            "TOKENLEDGER_SHUTDOWN_GRACE_SECONDS": str(grace_seconds),
            # The test holds a row lock for seconds; the request must wait, not time out.
            "TOKENLEDGER_LOCK_TIMEOUT_MS": "9000",
            "TOKENLEDGER_STATEMENT_TIMEOUT_MS": "9500",
            "TOKENLEDGER_SWEEPER_INTERVAL_SECONDS": "0.2",
        },
    )
    service.start()
    await service.wait_ready()
    async with httpx.AsyncClient(
        base_url=service.base_url,
        headers={"Authorization": f"Bearer {service.admin_key}"},
        trust_env=False,
    ) as client:
        api = Api(client, "shutdown")
        await api.department("eng")
        await api.employees(["e-1"], "eng")
        await api.grants({"e-1": 1000})
    return service


@pytest.mark.slow
async def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGTERM while a debit waits for a row lock: the listening socket closes at once (a new
    connection is refused), the debit still completes and is answered 201 and committed, the
    process releases every database connection and exits 0."""
    service = await _started(database_url, tmp_path, grace_seconds=10)
    try:
        async with _debit_behind_a_lock(service, database_url, db, "in-flight-1") as (
            client,
            debit,
            tx,
        ):
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            await asyncio.sleep(1.0)
            with pytest.raises(httpx.ConnectError):
                await client.get("/healthz")
            await tx.rollback()
            answer = await debit
        assert answer.status_code == 201, answer.text
        rc = await asyncio.to_thread(service.proc.wait, 30)
        assert rc == 0, service.log_tail()
        assert time.monotonic() - stopped_at < 10
        assert await db.fetchval("SELECT count(*) FROM transactions WHERE kind = 'debit'") == 1
        assert await _service_connections(db) == 0
    finally:
        service.stop()


@pytest.mark.slow
async def test_a_request_outlasting_the_grace_is_cut_and_the_process_still_exits_0(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """With TOKENLEDGER_SHUTDOWN_GRACE_SECONDS=1, a debit blocked past it is cut (the client gets
    no answer, so a retry with its key decides), the process exits 0 within the bound, and the
    statement does not commit later: its backend goes away while the lock is still held."""
    service = await _started(database_url, tmp_path, grace_seconds=1)
    try:
        async with _debit_behind_a_lock(service, database_url, db, "too-slow-1") as (
            _client,
            debit,
            tx,
        ):
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            rc = await asyncio.to_thread(service.proc.wait, 30)
            elapsed = time.monotonic() - stopped_at
            with pytest.raises(httpx.HTTPError):
                answer = await debit
                answer.raise_for_status()
            # The cut statement does not wait on for the lock to commit later: its backend
            # notices the client is gone (client_connection_check_interval) and rolls back.
            left = await _service_connections(db)
            for _ in range(50):
                if not left:
                    break
                await asyncio.sleep(0.1)
                left = await _service_connections(db)
            await tx.rollback()
        assert rc == 0, service.log_tail()
        assert elapsed < 6, elapsed
        assert left == 0
        await asyncio.sleep(0.5)
        assert await db.fetchval("SELECT count(*) FROM transactions WHERE kind = 'debit'") == 0
    finally:
        service.stop()


# --- make run's embedded PostgreSQL ------------------------------------------


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """One embedded cluster for the three signals (initdb once). Under root pgserver runs
    PostgreSQL as a user of its own, which must reach the directory: not pytest's tmp_path
    (mode 700), a directory of /tmp open to it."""
    path = Path(tempfile.mkdtemp(prefix="tokenledger-devdb-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        postmaster = _postmaster_pid(path)
        if postmaster is not None:  # a failed test left it running: stop it
            os.kill(postmaster, signal.SIGINT)
            _assert_stopped(path, postmaster)
        shutil.rmtree(path, ignore_errors=True)


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _dev_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "TOKENLEDGER_ENVIRONMENT": "development",
            "TOKENLEDGER_DATA_DIR": str(data_dir),
            "TOKENLEDGER_PORT": str(port),
            "TOKENLEDGER_WORKERS": "2",
            "TOKENLEDGER_LOG_LEVEL": "warning",
        }
    )
    return env


def _wait_ready(port: int, alive: object, within: float = 90) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert callable(alive) and alive(), "make run exited before it was ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("make run was not ready in time")


def _assert_stopped(data_dir: Path, postmaster: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(postmaster, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the embedded PostgreSQL (pid {postmaster}) is still running")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_embedded_postgres_stops_on_ctrl_c_and_sigterm(data_dir: Path, how: str) -> None:
    """`make run` without DATABASE_URL (the service with its embedded PostgreSQL): Ctrl-C (SIGINT
    to the terminal's process group) and SIGTERM (to the process, as a supervisor sends it) stop
    the service with exit 0 and then the embedded PostgreSQL."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603  # why: our own interpreter and module
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=_dev_env(data_dir, port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's job
    )
    try:
        _wait_ready(port, lambda: proc.poll() is None)
        postmaster = _postmaster_pid(data_dir)
        assert postmaster is not None
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")
        _assert_stopped(data_dir, postmaster)
        assert b"stopped the embedded PostgreSQL" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_embedded_postgres_stops_when_the_terminal_closes(data_dir: Path) -> None:
    """`make run` in a terminal that is closed: the kernel sends SIGHUP to the terminal's
    foreground process group (the service and its workers); the service stops gracefully with
    exit 0 and stops the embedded PostgreSQL (it kept running)."""
    port = free_port()
    env = _dev_env(data_dir, port)
    pid, master = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as its controlling terminal
        try:
            os.chdir(REPO)
            # why S606: our own interpreter and module, no shell involved.
            os.execve(sys.executable, [sys.executable, "-m", "service"], env)  # noqa: S606
        finally:
            os._exit(127)
    output = bytearray()

    def alive() -> bool:
        # Read what the service printed (it must never block on a full terminal); no reader
        # thread, whose read() would keep the terminal open after os.close() below.
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output.extend(chunk)
        return os.waitpid(pid, os.WNOHANG) == (0, 0)

    try:
        _wait_ready(port, alive)
        postmaster = _postmaster_pid(data_dir)
        assert postmaster is not None
        os.close(master)  # the terminal closes
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline:
            waited, code = os.waitpid(pid, os.WNOHANG)
            if waited:
                status = code
            time.sleep(0.1)
        assert status is not None, "still running a minute after its terminal closed"
        assert os.WIFEXITED(status), (status, bytes(output))
        assert os.WEXITSTATUS(status) == 0, bytes(output)
        _assert_stopped(data_dir, postmaster)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
