"""The replica's memory of service keys it verified lately, and the listener
that makes every replica forget them at once when api_keys changes.

A replica remembers a key for at most `TOKENLEDGER_KEY_CACHE_TTL_SECONDS`, so
the hot path costs no round trip to authenticate; a revocation reaches every
replica at once by NOTIFY, and within that TTL even when the notification
channel is silently broken (the cache is off while the listener is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from service.auth.principal import Principal
from service.tasks import cancel

# The channel the api_keys trigger notifies on (schema.sql).
KEYS_CHANNEL = "tl_api_keys"

log = structlog.get_logger("tokenledger.auth")


class KeyCache:
    """Service keys this replica verified recently: digest -> Principal.

    An entry is trusted for at most `ttl_seconds` after the database said
    yes. `KeyListener` clears the whole cache whenever api_keys changes
    (revocations are rare; a cleared cache costs one look-up per key), and
    turns the cache off while its channel is down, so that a replica that
    may have missed a notification never answers from memory. A key the
    database did not know is remembered as unknown (UNKNOWN_SECONDS) until
    api_keys changes; a revoked one asks the database every time."""

    # Unknown keys remembered, at most this many and this long: a flood of
    # one made-up key costs one look-up, and any change to api_keys (a key
    # created, above all) forgets them all at once, by NOTIFY.
    UNKNOWN_MAX = 10_000
    UNKNOWN_SECONDS = 60.0

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        # Off until the listener is connected (and always when ttl is 0).
        self.enabled = False
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._unknown: dict[bytes, float] = {}
        self._in_flight: dict[bytes, asyncio.Future[Principal | None]] = {}

    def knows_unknown(self, digest: bytes) -> bool:
        """Whether this key was looked up lately and the database did not know it."""
        until = self._unknown.get(digest)
        if until is None:
            return False
        if not self.enabled or self.clock() >= until:
            del self._unknown[digest]
            return False
        return True

    def put_unknown(self, digest: bytes, since: float) -> None:
        if self.enabled and self.ttl_seconds > 0:
            if len(self._unknown) >= self.UNKNOWN_MAX:
                self._unknown.clear()
            self._unknown[digest] = since + self.UNKNOWN_SECONDS

    def get(self, digest: bytes) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, until = entry
        if not self.enabled or self.clock() >= until:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: bytes, principal: Principal, since: float) -> None:
        """Remember a verified key; `since` is when the look-up was sent, so
        a revocation that raced it is still bounded by the TTL."""
        if self.enabled and self.ttl_seconds > 0:
            self._entries[digest] = (principal, since + self.ttl_seconds)

    def clear(self) -> None:
        self._entries.clear()
        self._unknown.clear()

    def in_flight(self, digest: bytes) -> asyncio.Future[Principal | None] | None:
        """The look-up of this key already on its way to the database, if any."""
        return self._in_flight.get(digest)

    def start_lookup(self, digest: bytes) -> asyncio.Future[Principal | None]:
        """Marks a look-up of this key as sent: requests that miss the cache
        meanwhile wait for its answer instead of sending their own (when an
        entry expires under load, every request of that key missed at once,
        one database round trip each)."""
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._in_flight[digest] = future
        return future

    def end_lookup(self, digest: bytes, future: asyncio.Future[Principal | None]) -> None:
        if self._in_flight.get(digest) is future:
            del self._in_flight[digest]

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled and self.ttl_seconds > 0
        self.clear()


class KeyListener:
    """LISTENs on KEYS_CHANNEL on a connection of its own, outside the pool,
    and clears `cache` on every notification. When the connection is lost it
    turns the cache off and reconnects every `retry_seconds`."""

    def __init__(
        self,
        dsn: str,
        cache: KeyCache,
        *,
        connect_timeout_seconds: float,
        retry_seconds: float = 1.0,
        role: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.cache = cache
        self.connect_timeout_seconds = connect_timeout_seconds
        self.retry_seconds = retry_seconds
        self.role = role
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def start(self) -> None:
        if self.cache.ttl_seconds > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokenledger-key-listener")

    async def wait_connected(self, within_seconds: float) -> bool:
        """True once listening (start-up waits briefly, so that the cache
        works from the first request when the database is there)."""
        if self._task is None:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_seconds):
                await self._connected.wait()
        return self._connected.is_set()

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        self.cache.set_enabled(False)

    def _notified(self, *_: Any) -> None:
        self.cache.clear()

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                settings = {"application_name": "tokenledger-keys"}
                if self.role:
                    settings["role"] = self.role
                conn = await asyncpg.connect(
                    self.dsn, timeout=self.connect_timeout_seconds, server_settings=settings
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(KEYS_CHANNEL, self._notified)
                # Listening from here on: anything committed before this
                # point is already visible to the look-ups that fill the cache.
                self.cache.set_enabled(True)
                self._connected.set()
                await lost.wait()
                log.warning("key_listener_lost")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("key_listener_unavailable", error=repr(exc))
            finally:
                self.cache.set_enabled(False)
                self._connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(self.retry_seconds)
