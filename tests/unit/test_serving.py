"""The HTTP server's transport (service.serving): a response's status line,
headers and body leave in one write to the socket, not one for the headers
and one for the body; a streamed response's chunks leave as they come, and
nothing is lost or reordered at a close."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service import serving


class FakeTransport(asyncio.Transport):
    """Records what reaches the socket, one element per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def small(scope: Any, receive: Any, send: Any) -> None:
    """What Litestar does for an ordinary answer: start, then the whole body."""
    await send(
        {"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


async def streamed(scope: Any, receive: Any, send: Any) -> None:
    """A streamed answer (a report's CSV): chunks with a pause between them."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for chunk in (b"a,b\r\n", b"1,2\r\n"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


async def serve(app: Any, protocol_class: type[HttpToolsProtocol], requests: bytes) -> list[bytes]:
    """`requests` through a protocol of that class on a FakeTransport: the writes."""
    config = uvicorn.Config(app, http=protocol_class, lifespan="off", log_level="warning")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(requests)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if protocol.cycle is not None and protocol.cycle.response_complete:
            break
    await asyncio.sleep(0.01)
    return transport.writes


GET = b"GET / HTTP/1.1\r\nHost: ledger\r\n\r\n"


async def test_an_answer_leaves_in_one_write() -> None:
    writes = await serve(small, serving.CorkedHttpToolsProtocol, GET)
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 201 Created\r\n") and writes[0].endswith(b"\r\n\r\n{}")
    # uvicorn's own protocol writes the headers and the body apart.
    assert len(await serve(small, HttpToolsProtocol, GET)) == 2


async def test_two_requests_on_one_connection_get_their_answers_in_order() -> None:
    writes = await serve(small, serving.CorkedHttpToolsProtocol, GET + GET)
    answer = b"".join(writes)
    assert answer.count(b"HTTP/1.1 201 Created\r\n") == 2 and answer.endswith(b"{}")


async def test_a_streamed_answer_leaves_chunk_by_chunk() -> None:
    writes = await serve(streamed, serving.CorkedHttpToolsProtocol, GET)
    # The headers with the first chunk, then the second chunk, then the end.
    assert len(writes) == 3, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"5\r\na,b\r\n\r\n")
    assert writes[1] == b"5\r\n1,2\r\n\r\n"
    assert writes[2] == b"0\r\n\r\n"


async def test_writes_past_the_cork_size_leave_at_once() -> None:
    fake = FakeTransport()
    corked = serving._CorkedTransport(fake)
    corked.write(b"x" * 10)
    corked.write(b"y" * serving.CORK_BYTES)
    assert fake.writes == [b"x" * 10 + b"y" * serving.CORK_BYTES]
    corked.write(b"z")
    assert corked.get_write_buffer_size() == 1
    await asyncio.sleep(0)
    assert fake.writes[-1] == b"z" and corked.get_write_buffer_size() == 0


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    fake = FakeTransport()
    corked = serving._CorkedTransport(fake)
    corked.write(b"last words")
    corked.close()
    assert fake.writes == [b"last words"] and fake.closed
    await asyncio.sleep(0)  # the turn's flush finds nothing left
    assert fake.writes == [b"last words"]
    # Nothing is written to a transport that is closing.
    corked.write(b"late")
    await asyncio.sleep(0)
    assert fake.writes == [b"last words"]

    fake = FakeTransport()
    corked = serving._CorkedTransport(fake)
    corked.write(b"never")
    corked.abort()
    await asyncio.sleep(0)
    assert fake.writes == [] and fake.aborted


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body, then answers it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_a_100_continue_leaves_while_the_app_waits_for_the_body() -> None:
    """A client that sent `Expect: 100-continue` gets its interim answer before it
    sends the body (held until the turn ends, never until the final answer)."""
    config = uvicorn.Config(echo, http=serving.CorkedHttpToolsProtocol, lifespan="off")
    config.load()
    protocol = serving.CorkedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(
        b"POST / HTTP/1.1\r\nHost: ledger\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    for _ in range(50):
        await asyncio.sleep(0.01)
        if transport.writes:
            break
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b"ok")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(transport.writes) > 1:
            break
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n") and transport.writes[1].endswith(
        b"ok"
    )
