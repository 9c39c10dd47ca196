"""Running the HTTP server, and stopping it the way an operator expects.

uvicorn stops gracefully on SIGINT and SIGTERM: it closes the listening
socket (no new work), lets the requests in flight finish for at most
`timeout_graceful_shutdown` seconds (then cancels them), and runs the
app's shutdown (background jobs stopped, the key listener and the pool
closed). Two things are changed here:

* After that graceful stop uvicorn raises the signal again, so the process
  dies by it (exit 143 for SIGTERM) and a supervisor reads a clean stop as
  a crash. A stop that was asked for and done exits 0 here.
* With several workers, the supervisor kept its copy of the listening
  socket open until it exited, so connections made during the stop were
  accepted into the backlog and then reset; it closes it first here.
* SIGHUP, which a closed terminal sends, killed a single worker outright
  (no graceful stop, and `make run`'s embedded PostgreSQL kept running),
  and made uvicorn's supervisor of several workers restart them instead of
  stopping. It is a stop here, like SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator

import uvicorn
from uvicorn.supervisors import Multiprocess

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Server(uvicorn.Server):
    """uvicorn's server that stops gracefully on SIGINT, SIGTERM and SIGHUP
    and then returns, instead of raising the signal again."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, for which SIGHUP is a stop
    (the workers get SIGTERM), not a restart of the workers."""

    def handle_hup(self) -> None:
        self.handle_term()

    def terminate_all(self) -> None:
        # The supervisor holds the listening socket too (its workers inherit
        # it): closed here, new connections are refused at once instead of
        # waiting in the backlog and being reset when the process exits.
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def stop_on_hangup_in_worker() -> None:
    """In a worker process: SIGHUP (a closed terminal reaches the whole
    process group) becomes SIGTERM, which uvicorn's server stops on
    gracefully. Called while the worker builds its app, in its main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))


def run(config: uvicorn.Config) -> bool:
    """Serve until stopped; False when the server never started."""
    if config.workers > 1:
        sock = config.bind_socket()
        Supervisor(config, sockets=[sock]).run()
        return True
    server = Server(config)
    server.run()
    return server.started
