"""A throwaway PostgreSQL cluster from this machine's own binaries (service/devdb.py's
``local`` source), run as the ``postgres`` system user under root, since
PostgreSQL refuses to run as root."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


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


def scratch_dir(prefix: str, *, on_disk: bool = False) -> Path:
    """A new private directory for a cluster, in memory unless `on_disk` and
    when the machine allows.

    On a VM disk, CREATE DATABASE from the template costs ~200 ms even with
    fsync off; on tmpfs it costs ~30 ms, and every test pays it once.
    """
    shm = Path("/dev/shm")  # noqa: S108  # why: tmpfs on purpose, with a private mkdtemp inside
    base: str | None = None
    if not on_disk and shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
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


def start_cluster(
    settings: Mapping[str, str], *, on_disk: bool
) -> tuple[str, Callable[[], None]] | None:
    """A new cluster with `settings`, started: its DSN and what stops it (and
    removes its files); None when PostgreSQL is not installed."""
    bindir = find_pg_bindir()
    if bindir is None:
        return None
    workdir = scratch_dir("tokenledger-pg-", on_disk=on_disk)
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
        return _start(bindir, runner, workdir, datadir, settings)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start(
    bindir: Path, runner: _Runner, workdir: Path, datadir: Path, settings: Mapping[str, str]
) -> tuple[str, Callable[[], None]]:
    base_conf = (datadir / "postgresql.conf").read_text()
    last_error: Exception | None = None
    # A port picked free can be taken before the server binds it (xdist
    # workers start together), so try a few.
    for _ in range(3):
        port = _free_port()
        local = {
            **settings,
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{workdir}'",
        }
        conf = base_conf + "\n# service/devdb.py\n"
        conf += "".join(f"{name} = {value}\n" for name, value in local.items())
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

        return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop
    assert last_error is not None
    raise last_error
