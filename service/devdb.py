"""An embedded PostgreSQL for `make run` when DATABASE_URL is unset.

`make run` should work on a machine with nothing but python3: the pgserver
wheel carries PostgreSQL's binaries, so no system package, container or
running server is needed. This is for development only; production always
names its database in DATABASE_URL.
"""

from __future__ import annotations

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
    # "stop" keeps the files and stops the server when the last process using
    # it lets go (pgserver counts them), here or at interpreter exit.
    server = pgserver.get_server(data_dir, cleanup_mode="stop")

    def stop() -> None:
        """Stop the server cleanly (a fast shutdown with a checkpoint)."""
        server.cleanup()

    return server.get_uri(), stop
