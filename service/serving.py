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

import asyncio
import contextlib
import signal
import threading
from collections.abc import Generator, Iterable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
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


class _CorkedTransport:
    """A transport whose writes made in one turn of the event loop leave in
    one `send`, at the end of that turn (or at once past CORK_BYTES).

    uvicorn writes a response's status line and headers when the app sends
    `http.response.start`, and its body on `http.response.body`: two `send`
    system calls, and on loopback each one runs the whole TCP path of both
    ends. py-spy on a worker under wrk's debits put the two writes at 6.6 %
    and 4.6 % of its samples. Litestar sends both messages in the same turn,
    so they now leave together. Everything else is the real transport's.
    """

    __slots__ = ("_transport", "_parts", "_size", "_scheduled", "_loop")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parts: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._parts.append(bytes(data))
        self._size += len(data)
        if self._size >= CORK_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._parts:
            return
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._parts = []
        self._size = 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# Writes held back in one turn at most this many bytes: a stream that
# writes many chunks without yielding to the loop sends them as it goes.
CORK_BYTES = 64 * 1024


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a _CorkedTransport (uvicorn's
    `http` option names it: "service.serving:CorkedHttpToolsProtocol")."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CorkedTransport(transport))  # type: ignore[arg-type]
