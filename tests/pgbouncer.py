"""pgbouncer in transaction pooling mode in front of the test server.

Debian's `pgbouncer` package (1.18 on Debian 12): `.ci/run` installs it when
missing. A missing pgbouncer fails the tests that need it; it is never a skip.
It refuses to run as root, so under root it runs as the `postgres` user, like
the local test cluster (tests/pg.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Far fewer server connections than the app's pool has clients: every
# statement of a pool connection may run on another server connection, so
# anything that leans on session state fails in the tests that use it.
SERVER_POOL_SIZE = 4


@dataclass
class Bouncer:
    host: str
    port: int
    log: Path

    def url_for(self, dsn: str) -> str:
        """`dsn` (a database of the test server) through pgbouncer."""
        parts = urlsplit(dsn)
        netloc = f"{parts.username or 'postgres'}@{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_pgbouncer(server_dsn: str) -> Iterator[Bouncer]:
    """pgbouncer (pool_mode = transaction) for every database of the server at `server_dsn`."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError(
            "pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run does)"
        )
    target = urlsplit(server_dsn)
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="tokenledger-pgbouncer-"))
    port = _free_port()
    log = workdir / "pgbouncer.log"
    (workdir / "users.txt").write_text(f'"{target.username or "postgres"}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={target.hostname} port={target.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
pool_mode = transaction
default_pool_size = {SERVER_POOL_SIZE}
max_client_conn = 1000
logfile = {log}
"""
    )
    if user is not None:
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(  # noqa: S603  # why: a fixed tool with a config the test wrote
        [binary, str(workdir / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pgbouncer did not listen within 10 s") from None
                time.sleep(0.05)
        yield Bouncer("127.0.0.1", port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
