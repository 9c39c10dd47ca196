"""The ledger's gateway to PostgreSQL: one round trip per operation.

Every state-changing request becomes one call of a SQL function
(`tl_execute` and friends in schema.sql) that checks the idempotency key,
locks rows in the global order, writes the journal and returns the
response body, all in one database transaction. Python never holds a row
lock: it sends one statement and reads the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias

import asyncpg
import msgspec
import structlog

from service import db, errors
from service.coalesce import Coalescer, Item
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
    # An admin may act on what other callers made (their reservations).
    admin: bool = False
    # A service key's departments and spend rate cap (Principal), checked in SQL.
    departments: tuple[str, ...] | None = None
    rate_limit: int | None = None


# A step of a report read in parts (Database.stream_parts_slow): a named query and its
# arguments, to read through a cursor, or rows the plan read itself.
PlanStep: TypeAlias = tuple[str, tuple[Any, ...]] | list[asyncpg.Record]


class DatabaseRefused(OSError):
    """PostgreSQL refused to open a connection for the pool. An OSError, as
    a refused TCP connection is, so errors.translate answers 503."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: Any
    replayed: bool


_canonical = msgspec.json.Encoder(order="sorted")

# Operations that go through the coalescer (tl_execute_batch): the hot path
# of the metering sources. tl_execute_batch locks what each of them touches
# up front, so an operation added here must name its accounts in `account`,
# `from`, `to` or `reservation_id`. Single usage events go through it too
# (Database.record_usage, op "usage"), without an Idempotency-Key.
COALESCED_OPS = frozenset({"debit", "transfer", "reserve", "capture", "release", "extend"})

# Connection-level failures: whether a batch committed is unknown, so its
# items are not run again one by one (the callers retry with their keys).
_UNKNOWN_OUTCOME = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


def _answer(answer: dict[str, Any]) -> Any:
    """One element of tl_execute_batch's answer: the tl_execute result, or
    the LedgerError that the item raised (as translate() would make it)."""
    failure = answer.get("error")
    if failure is None:
        return answer
    cls = errors.BY_SQLSTATE.get(failure["state"])
    assert cls is not None, f"tl_execute_batch isolated an unknown SQLSTATE {failure['state']}"
    try:
        extra = json.loads(failure.get("hint") or "{}")
    except ValueError:
        extra = {}
    return cls(failure.get("detail"), **extra)


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


class Database:
    """The service's gateway to PostgreSQL: the pool, the named queries and the
    policy for using them (timeouts, retries, idempotent execution, coalescing).
    Every module reaches the database through it (once `journal.Ledger`)."""

    def __init__(self, pool: asyncpg.Pool, config: Config, metrics: Metrics, clock: Clock) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.queries = db.load_queries()
        self.coalescer = Coalescer(
            self._execute_batch,
            max_batch=config.coalesce_max_batch,
            max_in_flight=config.coalesce_max_in_flight,
        )

    def now(self) -> datetime | None:
        return self.clock()

    def context_json(self, ctx: Context) -> dict[str, Any]:
        """The context argument of the SQL functions (p_ctx): who asks, on
        which request, at which instant (None: the database's clock). A key's
        departments and rate limit only when it has them: the SQL tests for
        the member (`ctx ? 'rate_limit'`), so an unlimited key costs nothing."""
        now = self.clock()
        context: dict[str, Any] = {
            "actor": ctx.actor,
            "request_id": ctx.request_id,
            "now": now.isoformat() if now is not None else None,
            "admin": ctx.admin,
        }
        if ctx.departments is not None:
            context["departments"] = list(ctx.departments)
        if ctx.rate_limit is not None:
            context["rate_limit"] = ctx.rate_limit
        return context

    async def _acquire(self) -> db.Pooled:
        """A pool connection within the configured bound. A refusal (too many, starting
        up, gone) means the database is unreachable: a 503, whatever the SQLSTATE."""
        try:
            return await self.pool.acquire(timeout=self.config.pool_acquire_timeout_seconds)
        except asyncpg.PostgresError as exc:
            raise DatabaseRefused(f"{exc.sqlstate}: {exc}") from exc

    async def _release(self, conn: db.Pooled) -> None:
        """Back to the pool. The outcome is decided by now: a connection that breaks
        while being reset (asyncpg terminates it) must not turn a success into an error."""
        try:
            await self.pool.release(conn)
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as exc:
            log.warning("connection_release_failed", error=repr(exc))

    async def _run(self, fn: Callable[[Any], Any], *, translate: bool = True) -> Any:
        """Acquire a connection within the configured bound and run one
        statement on it, retrying the whole thing on 40001/40P01. Errors are
        translated to LedgerErrors unless `translate` is false."""

        async def attempt() -> Any:
            conn = await self._acquire()
            try:
                return await fn(conn)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate in db.RETRYABLE_SQLSTATES:
                    self.metrics.db_retries.inc()
                raise
            finally:
                await self._release(conn)

        try:
            return await db.retry(attempt, attempts=self.config.retry_attempts)
        except Exception as exc:
            if not translate:
                raise
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def fetchval(self, query: str, *args: Any) -> Any:
        sql = self.queries[query]
        return await self._run(lambda conn: conn.fetchval(sql, *args))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        sql = self.queries[query]
        return await self._run(lambda conn: conn.fetch(sql, *args))

    async def fetch_slow(
        self, query: str, timeout_ms: int, *args: Any, jit: bool = True, work_mem_mb: int = 0
    ) -> list[asyncpg.Record]:
        """A read-only query allowed a longer statement timeout than the
        pool's (reports): SET LOCAL inside its own transaction, so the
        connection goes back to the pool with the usual limit. `jit=False`
        turns PostgreSQL's JIT off for it: a query that calls a function per
        row is estimated expensive, and compiling it cost seconds on a busy
        2-core machine for a query that runs in milliseconds."""
        sql = self.queries[query]

        async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            async with conn.transaction(readonly=True):
                await db.set_local(conn, timeout_ms, jit=jit, work_mem_mb=work_mem_mb)
                return await conn.fetch(sql, *args, timeout=db.client_timeout(timeout_ms))

        result: list[asyncpg.Record] = await self._run(run)
        return result

    @contextlib.asynccontextmanager
    async def _reading(
        self, timeout_ms: int, *, jit: bool, work_mem_mb: int, snapshot: bool = False
    ) -> AsyncIterator[db.Pooled]:
        """A pooled connection in a read-only transaction under `timeout_ms` (as
        fetch_slow) for a report read piece by piece (stream_slow, copy_slow): errors
        are translated (a refused connection as a 503), and at the end, however it
        ends, the transaction is rolled back and the connection goes back. With
        `snapshot`, the transaction is REPEATABLE READ: every statement in it reads
        the same snapshot (a report read in several queries, stream_parts_slow)."""
        try:
            conn = await self._acquire()
        except DatabaseRefused as exc:
            raise self._translated(exc) from exc.__cause__
        tr = conn.transaction(isolation="repeatable_read" if snapshot else None, readonly=True)
        try:
            await tr.start()
            await db.set_local(conn, timeout_ms, jit=jit, work_mem_mb=work_mem_mb)
            yield conn
        except Exception as exc:
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                if not conn.is_closed():
                    await tr.rollback()
            await self._release(conn)

    def stream_slow(
        self,
        query: str,
        timeout_ms: int,
        *args: Any,
        batch: int,
        jit: bool = True,
        work_mem_mb: int = 0,
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """A report's rows in lists of at most `batch`, read through a server-side
        cursor in a read-only transaction (under `timeout_ms`, as fetch_slow), so a
        large answer is never whole in memory. The connection is held until the
        iteration ends or the iterator is closed. The first list is read before
        anything is yielded, so a caller that awaits it first gets the errors of the
        query (translated, as a 503 for a refused connection) before answering."""

        async def one(conn: db.Pooled) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
            yield query, args

        # The reading generator itself, not one wrapping it: closing what the
        # caller holds ends the transaction and gives the connection back.
        return self._stream(
            timeout_ms, one, batch=batch, jit=jit, work_mem_mb=work_mem_mb, snapshot=False
        )

    def stream_parts_slow(
        self,
        timeout_ms: int,
        plan: Callable[[db.Pooled], AsyncIterator[PlanStep]],
        *,
        batch: int,
        jit: bool = True,
        work_mem_mb: int = 0,
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """stream_slow over several named queries, one after the other, in one
        read-only REPEATABLE READ transaction, so that together they read one
        snapshot: `plan` (given the connection, in that transaction) yields the
        queries and their arguments one at a time, each after the rows of the one
        before were read (so it may read what it needs for the next one on the same
        connection), and each one's rows are read through a cursor in lists of at
        most `batch`. A caller that stops early never runs the rest (a report's
        page, service/reports.py)."""
        return self._stream(
            timeout_ms, plan, batch=batch, jit=jit, work_mem_mb=work_mem_mb, snapshot=True
        )

    async def _stream(
        self,
        timeout_ms: int,
        plan: Callable[[db.Pooled], AsyncIterator[PlanStep]],
        *,
        batch: int,
        jit: bool,
        work_mem_mb: int,
        snapshot: bool,
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """stream_slow's and stream_parts_slow's reading: each planned query's rows
        through a cursor, in one read-only transaction (_reading). A plan may also
        yield rows it read itself on the connection (a plain query, which PostgreSQL
        may run with parallel workers, unlike a cursor): they are passed on in lists of
        at most `batch`."""
        async with self._reading(
            timeout_ms, jit=jit, work_mem_mb=work_mem_mb, snapshot=snapshot
        ) as conn:
            # A cursor's query is planned for its first tenth of rows by default
            # (cursor_tuple_fraction): a report is always read to its end, and
            # that plan was several times slower than fetch_slow's.
            await conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            client_timeout = db.client_timeout(timeout_ms)
            async for step in plan(conn):
                if isinstance(step, list):
                    for at in range(0, len(step), batch):
                        yield step[at : at + batch]
                    continue
                query, args = step
                cursor = await conn.cursor(self.queries[query], *args, timeout=client_timeout)
                while True:
                    rows = await cursor.fetch(batch, timeout=client_timeout)
                    if not rows:
                        break
                    yield rows
                    if len(rows) < batch:
                        break

    async def copy_slow(
        self,
        query: str,
        timeout_ms: int,
        *args: Any,
        form: Literal["csv", "text"],
        jit: bool = True,
        work_mem_mb: int = 0,
        queued: int = 4,
    ) -> AsyncIterator[bytes]:
        """A report's rows as PostgreSQL's COPY writes them (`form` 'csv' or 'text'),
        chunk by chunk as they arrive (each chunk whole rows, each row ending in a line
        feed), in a read-only transaction under `timeout_ms` like stream_slow.
        PostgreSQL writes every value, so the service decodes no row: at a third of a
        million rows, reading records through a cursor cost more than the query. At
        most `queued` chunks wait here; asyncpg stops reading the socket meanwhile, so
        the server waits for a slow reader and the answer is never whole in memory.
        The first chunk is read before anything is yielded, so a caller that awaits it
        first gets the errors of the query before answering (as stream_slow)."""
        # COPY (query) takes a statement, not a statement list.
        sql = self.queries[query].rstrip().removesuffix(";")
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queued)
        async with self._reading(timeout_ms, jit=jit, work_mem_mb=work_mem_mb) as conn:

            async def copy() -> None:
                try:
                    await conn.copy_from_query(
                        sql,
                        *args,
                        output=chunks.put,
                        format=form,
                        timeout=db.client_timeout(timeout_ms),
                    )
                finally:
                    await chunks.put(None)

            task = asyncio.create_task(copy())
            try:
                while (chunk := await chunks.get()) is not None:
                    # asyncpg hands over a bytearray; an answer's body is bytes.
                    yield bytes(chunk)
                # The copy's own error, if it failed.
                await task
            finally:
                if not task.done():
                    # The answer was cut short (the client went away): stop the COPY.
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def fetchval_long(
        self, query: str, timeout_ms: int, *args: Any, rollback: bool = False
    ) -> Any:
        """One call of a named query in its own transaction, allowed a longer statement
        timeout than the pool's (bulk imports). With `rollback` the transaction is rolled
        back: the answer says exactly what the call would do, and nothing changes (dry
        runs)."""
        sql = self.queries[query]

        async def run(conn: asyncpg.Connection) -> Any:
            tr = conn.transaction()
            await tr.start()
            try:
                await db.set_local(conn, timeout_ms)
                value = await conn.fetchval(sql, *args, timeout=db.client_timeout(timeout_ms))
            except BaseException:
                await tr.rollback()
                raise
            if rollback:
                await tr.rollback()
            else:
                await tr.commit()
            return value

        return await self._run(run)

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
        item = Item(ctx.caller, key, fingerprint, op, success_status, args, self.context_json(ctx))
        try:
            if op in COALESCED_OPS:
                result = await self.coalescer.submit(item)
            else:
                result = await self._execute_one(item)
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

    async def record_usage(self, args: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """One usage event (POST /v1/usage), coalesced with those that arrive
        meanwhile: {status: 201 | 200, body}, or raises its LedgerError. Its
        (source, event_id) is its idempotency key, so it has no
        Idempotency-Key; the caller counts it in the metrics (as before)."""
        item = Item(ctx.caller, None, None, "usage", 201, args, self.context_json(ctx))
        result: dict[str, Any] = await self.coalescer.submit(item)
        return result

    async def _execute_one(self, item: Item) -> Any:
        """One operation in a transaction of its own: tl_execute, or for a
        usage event tl_record_usage, as the service ran it before coalescing."""
        if item.op == "usage":
            return await self.fetchval("record_usage", item.args, item.ctx)
        return await self.fetchval(
            "execute",
            item.caller,
            item.key,
            item.fingerprint,
            item.op,
            item.success_status,
            item.args,
            item.ctx,
        )

    async def _execute_batch(self, items: list[Item]) -> list[Any]:
        """tl_execute_batch for the coalescer: each item's result, or the
        LedgerError it answers. If the batch as a whole fails with a
        database error (other than a retryable one, which db.retry has
        already retried), its items are run again one by one, so that only
        the item at fault gets the error."""
        self.metrics.coalesced_batch_size.observe(len(items))
        if len(items) == 1 and items[0].op == "usage":
            # A lone usage event runs as before coalescing (tl_record_usage):
            # the same answer, and alone it costs PostgreSQL less so than as
            # a batch of one (measured: 2.5 against 3.3 ms of backend CPU;
            # a batch of two costs about what two lone events do, one of 16
            # a quarter less per event).
            try:
                return [await self._execute_one(items[0])]
            except Exception as exc:  # noqa: BLE001  # why: the item's own error is its answer
                return [exc]
        sql = self.queries["execute_batch"]
        columns = (
            [i.caller for i in items],
            [i.key for i in items],
            [i.fingerprint for i in items],
            [i.op for i in items],
            [i.success_status for i in items],
            [i.args for i in items],
            [i.ctx for i in items],
        )
        try:
            answers = await self._run(lambda conn: conn.fetchval(sql, *columns), translate=False)
        except _UNKNOWN_OUTCOME as exc:
            failure = errors.translate(exc)
            if failure is None:
                raise
            failure.headers["Retry-After"] = str(self.config.retry_after_seconds)
            return [failure] * len(items)
        except asyncpg.PostgresError as exc:
            if len(items) == 1:
                return [self._translated(exc)]
            log.warning("coalesced_batch_failed", size=len(items), sqlstate=exc.sqlstate)
            self.metrics.coalesced_fallbacks.inc()
            singles = await asyncio.gather(
                *(self._execute_one(item) for item in items), return_exceptions=True
            )
            return list(singles)
        return [_answer(a) for a in answers]

    def _translated(self, exc: Exception) -> Exception:
        translated = errors.translate(exc)
        if translated is None:
            return exc
        if isinstance(translated, errors.Unavailable):
            translated.headers["Retry-After"] = str(self.config.retry_after_seconds)
        return translated

    async def call(self, query: str, args: dict[str, Any], ctx: Context) -> Any:
        """Run a named query that takes (arguments, context) and returns JSON."""
        return await self.fetchval(query, args, self.context_json(ctx))
