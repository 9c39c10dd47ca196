"""Background work that every replica runs: the expiry sweeper, the
settled-lot marks of the as-of balance, the idempotency-key purge, the
usage-event archiver, the hash chainer, the grant-program scheduler, the
credits.expiring alerts and the statistics of tables that grew (the webhook
dispatcher is service/webhooks.py).

All are safe on many replicas at once: the sweeper takes accounts with
FOR UPDATE SKIP LOCKED, the purge deletes rows it alone has locked, and the
chainer runs on one replica at a time (an advisory lock; the others skip),
and two schedulers running the same cycle issue it once (a unique key per
program, cycle and employee; the later run finds everyone already granted).
Expiry is exact without the sweeper (every read and write applies it at the
instant); the sweeper only writes the `expiry` transactions so the journal
catches up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from service.journal import Context, Database
from service.programs import run_cycle
from service.tasks import cancel

log = structlog.get_logger("tokenledger.background")

# One sweep pass writes at most this many batches before yielding to the
# next interval, so a backlog never monopolises a connection.
MAX_BATCHES_PER_PASS = 50
PURGE_BATCH = 1000
EXPIRING_BATCH = 1000
# Movement ids tl_settle_lots looks at in one call (one short transaction).
SETTLE_BATCH = 5000

SWEEPER = Context(caller="system", actor="system:sweeper", request_id="sweeper")
SCHEDULER = Context(caller="system", actor="system:scheduler", request_id="scheduler")
# Cycles the scheduler runs in one pass at most (a long outage catches up
# over several passes, oldest cycle first).
MAX_PROGRAM_RUNS_PER_PASS = 100


async def in_batches(
    call: Callable[[], Awaitable[int]], batch: int, *, to_the_end: bool = False
) -> int:
    """Call `call` (one short database transaction that does up to `batch`
    things and answers how many it did) until it is done; returns how many
    were done in all. A background pass stops at a short batch, and after
    MAX_BATCHES_PER_PASS, so a backlog never monopolises a connection;
    `to_the_end` (a command run by hand) goes on until a call does nothing,
    past rows that were locked the time before."""
    total = 0
    for _ in itertools.count() if to_the_end else range(MAX_BATCHES_PER_PASS):
        done = await call()
        total += done
        if done == 0 or (not to_the_end and done < batch):
            break
    return total


async def sweep_expired(
    sweep: Callable[[int], Awaitable[Any]], batch_size: int, *, to_the_end: bool
) -> int:
    """Call `sweep` (the sweep_expired query: expiry transactions for up to
    that many accounts with due lots) in_batches; returns the credits expired."""
    credits = 0

    async def one() -> int:
        nonlocal credits
        result = await sweep(batch_size)
        credits += int(result["credits"])
        return int(result["accounts"])

    await in_batches(one, batch_size, to_the_end=to_the_end)
    return credits


class Background:
    def __init__(self, ledger: Database) -> None:
        self.ledger = ledger
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tokenledger-background")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _loop(self) -> None:
        interval = self.ledger.config.sweeper_interval_seconds
        while True:
            try:
                await self.run_programs()
                await self.sweep_expired()
                await self.settle_lots()
                await self.purge_idempotency_keys()
                await self.archive_usage_events()
                await self.chain_pending()
                await self.emit_expiring()
                await self.analyze_grown()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # why: a failed pass is logged and retried next interval
                self.ledger.metrics.sweeper_runs.labels("background", "error").inc()
                log.warning("background_pass_failed", error=repr(exc))
            await asyncio.sleep(interval)

    async def sweep_expired(self) -> int:
        """Write expiry transactions for due lots; returns the credits expired."""
        ctx = self.ledger.context_json(SWEEPER)

        async def sweep(batch: int) -> Any:
            return await self.ledger.fetchval("sweep_expired", batch, ctx)

        total = await sweep_expired(sweep, self.ledger.config.sweeper_batch_size, to_the_end=False)
        self.ledger.metrics.sweeper_runs.labels("expiry", "ok").inc()
        if total:
            self.ledger.metrics.expired_credits.inc(total)
            log.info("expired_credits", credits=total)
        return total

    async def analyze_grown(self) -> list[str]:
        """ANALYZE the hot tables that at least doubled since they were last
        analyzed (tl_analyze_grown): the generic plans the hot path keeps per
        connection are made again with statistics that know the table's
        size, instead of waiting for autovacuum, whose first analysis of a
        fresh table can come a minute and many thousand rows late. Returns
        the tables analyzed."""
        done = list(await self.ledger.fetchval("analyze_grown") or [])
        self.ledger.metrics.sweeper_runs.labels("analyze", "ok").inc()
        if done:
            log.info("tables_analyzed", tables=done)
        return done

    async def settle_lots(self) -> int:
        """Mark the lots that hold nothing among those moved since the last
        pass (tl_settle_lots), SETTLE_BATCH movement ids a call, so that the
        as-of balance skips them without reading their movements; returns
        how many movement ids it covered. A movement is looked at one pass
        after it was first seen, when its transaction has committed."""

        async def one() -> int:
            return int(await self.ledger.fetchval("settle_lots", SETTLE_BATCH))

        covered = await in_batches(one, SETTLE_BATCH)
        self.ledger.metrics.sweeper_runs.labels("lot_settle", "ok").inc()
        return covered

    async def purge_idempotency_keys(self) -> int:
        older = timedelta(days=self.ledger.config.idempotency_retention_days)

        async def one() -> int:
            return int(await self.ledger.fetchval("purge_idempotency_keys", older, PURGE_BATCH))

        deleted = await in_batches(one, PURGE_BATCH)
        self.ledger.metrics.sweeper_runs.labels("idempotency_purge", "ok").inc()
        return deleted

    async def archive_usage_events(self) -> int:
        """Move usage events past TOKENLEDGER_USAGE_ARCHIVE_AFTER_DAYS to the
        archive (tl_archive_usage_events), PURGE_BATCH at a time, each batch a
        short transaction of its own; returns how many moved."""
        days = self.ledger.config.usage_archive_after_days
        if not days:
            return 0

        async def one() -> int:
            before = self.ledger.now() or datetime.now(UTC)
            cutoff = before - timedelta(days=days)
            return int(await self.ledger.fetchval("archive_usage_events", cutoff, PURGE_BATCH))

        moved = await in_batches(one, PURGE_BATCH)
        self.ledger.metrics.sweeper_runs.labels("usage_archive", "ok").inc()
        if moved:
            log.info("usage_events_archived", events=moved)
        return moved

    async def chain_pending(self) -> int:
        """Append settled transactions to the hash chain (tl_chain_pending);
        returns how many. Another replica chaining makes this a no-op."""
        config = self.ledger.config
        settle = timedelta(seconds=config.chain_settle_seconds)

        async def one() -> int:
            batch = config.chain_batch_size
            return int(await self.ledger.fetchval("chain_pending", batch, settle, False))

        total = await in_batches(one, config.chain_batch_size)
        self.ledger.metrics.sweeper_runs.labels("chain", "ok").inc()
        if total:
            self.ledger.metrics.chained_transactions.inc(total)
            head = await self.ledger.fetchrow("chain_head")
            assert head is not None
            # Shipped with the logs, this line anchors the chain outside the
            # database (README, Tamper evidence).
            log.info(
                "chain_head",
                appended=total,
                seq=int(head["seq"]),
                chain_hash=bytes(head["chain_hash"]).hex(),
                transaction_id="txn_" + head["transaction_id"].hex,
            )
        return total

    async def emit_expiring(self) -> int:
        """credits.expiring for every lot that has come within its account's
        `expiring_within_days` of expiring (once per lot: a unique key in the
        outbox), by the ledger's clock; returns how many were emitted."""

        async def one() -> int:
            now = self.ledger.now()
            return int(await self.ledger.fetchval("emit_expiring", now, EXPIRING_BATCH))

        total = await in_batches(one, EXPIRING_BATCH)
        self.ledger.metrics.sweeper_runs.labels("expiring", "ok").inc()
        if total:
            self.ledger.metrics.events_emitted.labels("credits.expiring").inc(total)
        return total

    async def run_programs(self) -> list[dict[str, object]]:
        """Run every grant-program cycle that has started and has not been run
        (by the API or a scheduler), oldest first per program: a catch-up after
        downtime issues each missed cycle once, in order, with that cycle's
        expiry. A cycle that fails is logged and retried next pass; the later
        cycles of that program wait for it."""
        due = await self.ledger.fetch("programs_due", self.ledger.now(), MAX_PROGRAM_RUNS_PER_PASS)
        runs: list[dict[str, object]] = []
        failed: set[str] = set()
        for row in due:
            program, cycle = row["program_id"], row["cycle"]
            if program in failed:
                continue
            try:
                run = await run_cycle(self.ledger, program, cycle, "scheduler", SCHEDULER)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # why: one program's failure must not stop the others
                failed.add(program)
                self.ledger.metrics.sweeper_runs.labels("programs", "error").inc()
                log.warning("program_run_failed", program=program, cycle=cycle, error=repr(exc))
                continue
            ran_at = datetime.fromisoformat(str(run["ran_at"]).replace("Z", "+00:00"))
            self.ledger.metrics.program_scheduler_last_run.labels(program).set(ran_at.timestamp())
            log.info(
                "program_cycle_issued",
                program=program,
                cycle=cycle,
                issued=run["issued"],
                credits=run["credits"],
                skipped=run["skipped"],
            )
            runs.append(run)
        self.ledger.metrics.sweeper_runs.labels("programs", "ok").inc()
        return runs
