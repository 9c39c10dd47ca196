"""The ledger's gateway to PostgreSQL: one round trip per operation.

Every state-changing request becomes one call of a SQL function
(`tl_execute` and friends in schema.sql) that checks the idempotency key,
locks rows in the global order, writes the journal and returns the
response body, all in one database transaction. Python never holds a row
lock: it sends one statement and reads the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import structlog

from service import db, errors
from service.config import Config
from service.observability import Metrics

log = structlog.get_logger("tokenledger.journal")

# A clock that returns None means "the database's clock"; tests inject a
# fixed or stepped clock to pin expiry at exact instants.
Clock = Callable[[], datetime | None]


def database_clock() -> datetime | None:
    return None


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks, on which request: recorded on every transaction."""

    caller: str
    actor: str | None
    request_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: Any
    replayed: bool


_canonical = msgspec.json.Encoder(order="sorted")


def request_hash(method: str, path: str, payload: Any) -> bytes:
    """The fingerprint an idempotency key is bound to: method, path and the
    decoded body in canonical form (so whitespace or key order do not
    matter, but any changed value does)."""
    digest = hashlib.sha256()
    digest.update(method.upper().encode())
    digest.update(b" ")
    digest.update(path.encode())
    digest.update(b"\n")
    digest.update(_canonical.encode(payload))
    return digest.digest()


class Ledger:
    """The pool, the named queries and the policy for using them."""

    def __init__(self, pool: asyncpg.Pool, config: Config, metrics: Metrics, clock: Clock) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.queries = db.load_queries()

    def now(self) -> datetime | None:
        return self.clock()

    def _ctx(self, ctx: Context) -> dict[str, Any]:
        now = self.clock()
        return {
            "actor": ctx.actor,
            "request_id": ctx.request_id,
            "now": now.isoformat() if now is not None else None,
        }

    async def _run(self, fn: Callable[[Any], Any]) -> Any:
        """Acquire a connection within the configured bound and run one
        statement on it, retrying the whole thing on 40001/40P01."""

        async def attempt() -> Any:
            conn = await self.pool.acquire(timeout=self.config.pool_acquire_timeout_seconds)
            try:
                return await fn(conn)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate in db.RETRYABLE_SQLSTATES:
                    self.metrics.db_retries.inc()
                raise
            finally:
                # The statement's outcome is already decided here (committed or
                # not); a connection that breaks while being reset for the pool
                # must not turn a success into an error.
                try:
                    await self.pool.release(conn)
                except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as exc:
                    # asyncpg has already terminated it; the pool opens a new one.
                    log.warning("connection_release_failed", error=repr(exc))

        try:
            return await db.retry(attempt, attempts=self.config.retry_attempts)
        except Exception as exc:
            translated = errors.translate(exc)
            if translated is None:
                raise
            if isinstance(translated, errors.Unavailable):
                translated.headers["Retry-After"] = str(self.config.retry_after_seconds)
            raise translated from exc

    async def fetchval(self, query: str, *args: Any) -> Any:
        sql = self.queries[query]
        return await self._run(lambda conn: conn.fetchval(sql, *args))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        sql = self.queries[query]
        return await self._run(lambda conn: conn.fetch(sql, *args))

    async def fetch_slow(self, query: str, timeout_ms: int, *args: Any) -> list[asyncpg.Record]:
        """A read-only query allowed a longer statement timeout than the
        pool's (reports): SET LOCAL inside its own transaction, so the
        connection goes back to the pool with the usual limit."""
        sql = self.queries[query]

        async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            async with conn.transaction(readonly=True):
                await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                return await conn.fetch(sql, *args)

        result: list[asyncpg.Record] = await self._run(run)
        return result

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        sql = self.queries[query]
        return await self._run(lambda conn: conn.fetchrow(sql, *args))

    async def execute(
        self,
        op: str,
        args: dict[str, Any],
        *,
        ctx: Context,
        key: str | None,
        fingerprint: bytes | None,
        success_status: int,
    ) -> Outcome:
        """Run one operation; a stored 409 (first time or replayed) is raised
        as its LedgerError, marked replayed where it was."""
        try:
            result = await self.fetchval(
                "execute",
                ctx.caller,
                key,
                fingerprint,
                op,
                success_status,
                args,
                self._ctx(ctx),
            )
        except errors.LedgerError as exc:
            self.metrics.operations.labels(op, exc.code).inc()
            raise
        outcome = Outcome(int(result["status"]), result["body"], bool(result["replayed"]))
        if outcome.status == 409:
            stored = outcome.body
            err = errors.from_stored(
                stored["code"], stored.get("detail"), stored.get("extra") or {}
            )
            if outcome.replayed:
                err.headers["Idempotent-Replayed"] = "true"
            self.metrics.operations.labels(op, err.code).inc()
            raise err
        self.metrics.operations.labels(op, "replayed" if outcome.replayed else "ok").inc()
        return outcome

    async def call(self, query: str, args: dict[str, Any], ctx: Context) -> Any:
        """Run a named query that takes (arguments, context) and returns JSON."""
        return await self.fetchval(query, args, self._ctx(ctx))

    def context_json(self, ctx: Context) -> dict[str, Any]:
        return self._ctx(ctx)
