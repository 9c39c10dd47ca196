"""A real HTTP receiver on loopback for webhook tests (no mocks).

A ThreadingHTTPServer in a thread of the test process: every POST is
recorded (path, headers, raw body, when), and answered as the path's
behaviour says: a status code, or a function of the request's index on
that path that returns one (and may sleep first, to play a slow receiver).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

Behaviour = int | Callable[[int], int]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    port: int = 0
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def events(self, path: str, type_: str | None = None) -> list[Any]:
        return [r.json() for r in self.on(path) if type_ is None or r.json()["type"] == type_]

    async def wait_for(
        self, path: str, count: int, *, within: float = 20.0, type_: str | None = None
    ) -> list[Received]:
        """The requests on `path` (of one event type) once there are at least `count`."""
        deadline = time.monotonic() + within
        while True:
            got = [r for r in self.on(path) if type_ is None or r.json()["type"] == type_]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} requests on {path}, expected {count}")
            await asyncio.sleep(0.02)

    def _answer(self, path: str, index: int) -> int:
        behaviour = self.behaviours.get(path, 200)
        return behaviour(index) if callable(behaviour) else behaviour


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # why: http.server's naming
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            with receiver.lock:
                index = sum(1 for r in receiver.received if r.path == self.path)
                receiver.received.append(
                    Received(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        time.monotonic(),
                    )
                )
            status = receiver._answer(self.path, index)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", receiver.url("/redirected"))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # why: the base class's signature
            pass

    class Server(ThreadingHTTPServer):
        # Dozens of dispatchers' connections at once: the default backlog of 5
        # would refuse some, which a sender sees as a failed attempt.
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
