"""A lean HTTP/1.1 client for the measured requests of the benchmark.

The bench and the service share a 2-core machine, so every CPU-second the
load generator spends is one the service and PostgreSQL do not get. httpx
spent about 4 ms of CPU per request here (0.85 of the 2 cores at 220
requests/s), which made the client, not the service, the bottleneck of every
concurrent scenario. This client does only what the scenarios need: keep-
alive connections to one host, JSON bodies, Content-Length responses (and
chunked ones, should the server send them), explicit timeouts. It costs
about a tenth of httpx per request. Set-up and checks still use httpx.

Its responses offer what the harness reads of an httpx.Response
(`status_code`, `headers.get`, `content`, `text`, `json()`,
`request.url.path`), and its transport failures are httpx.TransportErrors,
so the scenarios handle both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import msgspec

_encode = msgspec.json.Encoder().encode
CONNECT_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 30.0
# Idle connections older than this are not reused: uvicorn closes them at 5 s.
IDLE_SECONDS = 4.0


class _Stale(Exception):
    """A reused connection turned out closed before any answer: try a new one."""


class Headers(dict[str, str]):
    """Response headers, looked up case-insensitively (stored lowercased)."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass(frozen=True, slots=True)
class _Url:
    path: str


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: _Url


@dataclass(slots=True)
class Response:
    status_code: int
    headers: Headers
    content: bytes
    request: _Request

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return msgspec.json.decode(self.content)
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LeanClient:
    """Keep-alive connections to `base_url`, at most `size` of them."""

    def __init__(self, base_url: str, size: int, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        assert parts.scheme == "http" and parts.hostname, base_url
        self.host = parts.hostname
        self.port = parts.port or 80
        self._fixed = (
            f"Host: {parts.netloc}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        ).encode("latin-1")
        self._idle: list[tuple[Connection, float]] = []
        self._slots = asyncio.Semaphore(size)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Response:
        target = f"{path}?{urlencode(params)}" if params else path
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._fixed]
        if headers:
            head.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1"))
        body = b"" if json is None else _encode(json)
        if json is not None or method in ("POST", "PUT", "PATCH"):
            head.append(
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            )
        head.append(b"\r\n")
        payload = b"".join(head) + body
        async with self._slots:
            conn = self._reusable()
            if conn is not None:
                try:
                    return await self._send(conn, payload, method, path)
                except _Stale:
                    pass  # the server closed it while idle: it never saw this request
            conn = None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    conn = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError) as exc:
                raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
            try:
                return await self._send(conn, payload, method, path)
            except _Stale as exc:
                raise httpx.ReadError(str(exc.__cause__)) from exc

    def _reusable(self) -> Connection | None:
        """An idle connection the server has not timed out yet (uvicorn
        closes keep-alive connections idle for 5 s)."""
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < IDLE_SECONDS:
                return conn
            conn[1].close()
        return None

    async def _send(self, conn: Connection, payload: bytes, method: str, path: str) -> Response:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                response, keep = await self._exchange(conn, payload, method, path)
        except asyncio.IncompleteReadError as exc:
            conn[1].close()
            if not exc.partial:
                raise _Stale() from exc  # closed before a byte of an answer
            raise httpx.ReadError(f"IncompleteReadError: {exc}") from exc
        except (OSError, TimeoutError, ValueError) as exc:
            conn[1].close()
            if isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _Stale() from exc
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
        if keep:
            self._idle.append((conn, time.monotonic()))
        else:
            conn[1].close()
        return response

    async def _exchange(
        self, conn: Connection, payload: bytes, method: str, path: str
    ) -> tuple[Response, bool]:
        reader, writer = conn
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = Headers()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            content = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            content = await _read_chunked(reader)
        else:
            raise ValueError("a response with neither Content-Length nor chunked encoding")
        keep = headers.get("connection", "").lower() != "close"
        return Response(status, headers, content, _Request(method, _Url(path))), keep

    async def aclose(self) -> None:
        while self._idle:
            (_, writer), _ = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
