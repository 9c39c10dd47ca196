"""An embedded PostgreSQL for `make run` when DATABASE_URL is unset.

`make run` should work on a machine with nothing but python3: the pgserver
wheel carries PostgreSQL's binaries, so no system package, container or
running server is needed. This is for development only; production always
names its database in DATABASE_URL.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

DEFAULT_DATA_DIR = Path(".data/pg")


def start_embedded(data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, Callable[[], None]]:
    """Start (or join) a PostgreSQL server whose files live in `data_dir`.

    Returns its DSN and a function that stops it. The data directory is kept
    between runs, so accounts and balances created while trying the service
    survive a restart; delete the directory to start over. A server left
    running by a process that died is reused, not started twice.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI,
        # containers); pgserver then keeps its lock file under /tmp, which is
        # fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    # "stop" keeps the files and stops the server when the last process using
    # it lets go (pgserver counts them), here or at interpreter exit.
    server = pgserver.get_server(data_dir, cleanup_mode="stop")

    def stop() -> None:
        """Stop the server cleanly (a fast shutdown with a checkpoint)."""
        server.cleanup()

    return server.get_uri(), stop


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
