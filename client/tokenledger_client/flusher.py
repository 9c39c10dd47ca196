"""A background flusher of usage events that never loses an event it accepted.

`record()` accepts an event (and, with `spool_path`, appends it to a file and
fsyncs it before returning); a task sends what is pending with
`POST /v1/usage:batch` every `flush_interval_seconds`, or as soon as
`max_batch` events wait. An event leaves the queue only when the service
answered for it:

* `recorded` or `duplicate`: delivered. `(source, event_id)` is the
  idempotency key, so an event sent again after a lost answer is charged
  once and answered `duplicate`.
* `rejected` with a code that can change by itself (`rate_limited`, `key_rate_limited`,
  `unavailable`, `idempotency_key_in_progress`): kept and sent again.
* `rejected` with any other code (an unknown model, a closed account ...):
  handed to `on_rejected` and kept in `rejected` (and `<spool>.rejected`),
  never dropped silently: those need a person.

A batch that gets no answer (the service is down, restarting, overloaded)
stays at the head of the queue and is sent again, with the same event ids,
after a capped exponential backoff, for as long as it takes. `close()` stops
accepting, sends everything still pending within its timeout, and returns
the number of events it could not deliver; with a spool those are still in
the file and a new flusher on the same path sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgspec

from tokenledger_client import errors
from tokenledger_client.client import MAX_BATCH_EVENTS, AsyncClient
from tokenledger_client.models import UsageBatchResult, UsageEvent

__all__ = ["UsageFlusher", "FlusherClosed", "FlusherFull"]

log = logging.getLogger("tokenledger_client.flusher")

# Rejections that may succeed when sent again unchanged.
RETRYABLE_REJECTIONS = frozenset(
    {"rate_limited", "key_rate_limited", "unavailable", "idempotency_key_in_progress"}
)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageEvent)


class FlusherClosed(RuntimeError):
    """`record()` after `close()`: the event was not accepted."""


class FlusherFull(RuntimeError):
    """More than `max_pending` events wait: the event was not accepted."""


class UsageFlusher:
    def __init__(
        self,
        client: AsyncClient,
        *,
        flush_interval_seconds: float = 1.0,
        max_batch: int = 500,
        max_pending: int = 100_000,
        backoff_max_seconds: float = 30.0,
        spool_path: str | os.PathLike[str] | None = None,
        fsync: bool = True,
        on_rejected: Callable[[UsageEvent, UsageBatchResult], None] | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH_EVENTS}")
        self.client = client
        self.flush_interval_seconds = flush_interval_seconds
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.backoff_max_seconds = backoff_max_seconds
        self.spool_path = Path(spool_path) if spool_path is not None else None
        self.fsync = fsync
        self.on_rejected = on_rejected
        self.rejected: list[tuple[UsageEvent, UsageBatchResult]] = []
        self.delivered = 0
        self._pending: deque[UsageEvent] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()  # one batch in flight at a time
        self._spool: BinaryIO | None = None
        if self.spool_path is not None:
            self._load_spool()

    # --- accepting ------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def record(self, event: UsageEvent) -> None:
        """Accept one event. Once this returns, the event will be delivered
        (or handed to `on_rejected`); raises FlusherClosed or FlusherFull
        instead of accepting it."""
        if self._closed:
            raise FlusherClosed("the flusher is closed")
        if len(self._pending) >= self.max_pending:
            raise FlusherFull(f"{len(self._pending)} events pending")
        if self._spool is not None:
            self._spool.write(_encoder.encode(event) + b"\n")
            self._spool.flush()
            if self.fsync:
                os.fsync(self._spool.fileno())
        self._pending.append(event)
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    # --- running --------------------------------------------------------------

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_seconds)
            self._wake.clear()
            try:
                while self._pending and not self._closed:
                    await self.flush_once()
                failures = 0
            except Exception as exc:  # noqa: BLE001  # why: the loop must outlive any failure
                failures += 1
                wait = min(self.backoff_max_seconds, 0.5 * 2 ** min(failures, 10))
                log.warning(
                    "usage flush failed; %d events kept, retrying in %.1fs: %r",
                    len(self._pending), wait, exc,
                )  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)

    async def flush_once(self) -> int:
        """Send the head of the queue once; the number of events answered.
        Raises (and keeps the events) when the batch got no answer."""
        async with self._lock:
            batch = [self._pending[i] for i in range(min(self.max_batch, len(self._pending)))]
            if not batch:
                return 0
            answer = await self.client.record_usage_batch(batch)
            if len(answer.results) != len(batch):
                raise RuntimeError(
                    f"{len(answer.results)} results for {len(batch)} events"
                )  # never drop on an answer we cannot match
            retry: list[UsageEvent] = []
            for event, result in zip(batch, answer.results, strict=True):
                if result.status in ("recorded", "duplicate"):
                    self.delivered += 1
                elif result.code in RETRYABLE_REJECTIONS:
                    retry.append(event)
                else:
                    self._reject(event, result)
            for _ in batch:
                self._pending.popleft()
            self._pending.extendleft(reversed(retry))
            self._rewrite_spool()
            if retry and len(retry) == len(batch):
                raise errors.LedgerUnreachable(
                    "every event of the batch was deferred by the service"
                )
            return len(batch) - len(retry)

    async def close(self, timeout_seconds: float = 30.0) -> int:
        """Stop accepting, deliver what is pending within the timeout; the
        number of events left undelivered (still in the spool, if any)."""
        self._closed = True
        self._wake.set()
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        failures = 0
        while self._pending and loop.time() < deadline:
            try:
                await asyncio.wait_for(self.flush_once(), max(0.01, deadline - loop.time()))
                failures = 0
            except Exception as exc:  # noqa: BLE001  # why: keep trying until the deadline
                failures += 1
                wait = min(2.0 * failures, max(0.0, deadline - loop.time()))
                log.warning("final usage flush failed: %r; %d pending", exc, len(self._pending))
                await asyncio.sleep(wait)
        left = len(self._pending)
        if left:
            log.error("%d usage events undelivered at close%s", left,
                      f"; kept in {self.spool_path}" if self.spool_path else "")  # fmt: skip
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        return left

    # --- rejected events and the spool ------------------------------------------

    def _reject(self, event: UsageEvent, result: UsageBatchResult) -> None:
        log.error(
            "usage event %s/%s rejected: %s %s", event.source, event.event_id,
            result.code, result.detail,
        )  # fmt: skip
        self.rejected.append((event, result))
        if self.spool_path is not None:
            with open(self.spool_path.with_suffix(self.spool_path.suffix + ".rejected"), "ab") as f:
                f.write(_encoder.encode({"event": event, "result": result}) + b"\n")
        if self.on_rejected is not None:
            self.on_rejected(event, result)

    def _load_spool(self) -> None:
        assert self.spool_path is not None
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        if self.spool_path.exists():
            for line in self.spool_path.read_bytes().splitlines():
                if line.strip():
                    try:
                        self._pending.append(_decoder.decode(line))
                    except msgspec.DecodeError:
                        # A line torn by a crash mid-write was never accepted
                        # (record() had not returned); skip it.
                        log.warning("skipping a torn line in %s", self.spool_path)
        self._rewrite_spool()

    def _rewrite_spool(self) -> None:
        """The spool holds exactly the pending events (atomic replace)."""
        if self.spool_path is None:
            return
        if self._spool is not None:
            self._spool.close()
        tmp = self.spool_path.with_suffix(self.spool_path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            for event in self._pending:
                f.write(_encoder.encode(event) + b"\n")
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.spool_path)
        self._spool = open(self.spool_path, "ab")  # noqa: SIM115  # why: held open for appends
