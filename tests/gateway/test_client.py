"""Client behaviour against a real tokenledger process: retries, keys,
Retry-After, what is never retried, and the usage flusher."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.gateway.conftest import (
    PRICE_MODEL,
    Ledger,
    _setup_directory_and_prices,
    cost_of,
    create_meter_key,
    restart_ledger,
    start_ledger,
)
from tests.pg import Server, cloned_database
from tokenledger_client import (
    AsyncClient,
    Client,
    Estimate,
    RetryPolicy,
    UsageCounts,
    UsageEvent,
    UsageFlusher,
    errors,
)

FAST = RetryPolicy(total_seconds=5.0, backoff_initial_seconds=0.01, backoff_max_seconds=0.2)


class Faulty(httpx.AsyncBaseTransport):
    """A real transport to the service, with faults: `fault(n, request)` is
    called for the n-th request (1-based) and may return "drop" (forward it,
    then lose the answer: the service committed, the client sees a dropped
    connection), a Response (answered here, not forwarded), or None."""

    def __init__(self, fault: Callable[[int, httpx.Request], Any] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fault = fault or (lambda n, request: None)
        self.requests: list[httpx.Request] = []
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("injected: the service is down", request=request)
        action = self.fault(len(self.requests), request)
        if isinstance(action, httpx.Response):
            return action
        response = await self.inner.handle_async_request(request)
        if action == "drop":
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("injected: connection lost after the request", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def client(ledger: Ledger, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> Any:
    return AsyncClient(ledger.url, ledger.meter_key, retry=FAST, transport=transport, **kw)


async def test_retry_after_a_lost_answer_reuses_the_key(ledger: Ledger) -> None:
    """A reservation whose answer is lost after the service committed it is
    retried with the same Idempotency-Key and held once."""
    emp = ledger.employee(10_000)
    transport = Faulty(lambda n, request: "drop" if n == 1 else None)
    async with client(ledger, transport) as ledger_client:
        rsv = await ledger_client.reserve(f"employee:{emp}", amount=700)
        keys = {r.headers["idempotency-key"] for r in transport.requests}
        assert len(transport.requests) == 2 and len(keys) == 1
        # The capture, answered and then lost too, is also applied once.
        transport.fault = lambda n, request: "drop" if n == 3 else None
        captured = await ledger_client.capture(rsv, amount=500)
    assert captured.reservation.status == "captured"
    assert [r["id"] for r in ledger.reservations(f"employee:{emp}")] == [rsv.id]
    wallet = ledger.account(f"employee:{emp}")
    assert (wallet["posted"], wallet["reserved"]) == (9_500, 0)


async def test_each_call_gets_its_own_key(ledger: Ledger) -> None:
    """Two calls with the same body are two reservations: keys are per call, not per body."""
    emp = ledger.employee(10_000)
    transport = Faulty()
    async with client(ledger, transport) as ledger_client:
        a = await ledger_client.reserve(f"employee:{emp}", amount=100)
        b = await ledger_client.reserve(f"employee:{emp}", amount=100)
    assert a.id != b.id
    assert len({r.headers["idempotency-key"] for r in transport.requests}) == 2


@pytest.mark.parametrize("status,code", [(503, "unavailable"), (429, "rate_limited")])
async def test_retry_after_is_honoured(ledger: Ledger, status: int, code: str) -> None:
    """A 503 or 429 with Retry-After: 1 is retried after at least a second, same key."""
    emp = ledger.employee(10_000)
    answer = httpx.Response(
        status,
        headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
        json={"type": "about:blank", "title": code, "status": status, "code": code},
    )
    transport = Faulty(lambda n, request: answer if n == 1 else None)
    async with client(ledger, transport) as ledger_client:
        started = time.monotonic()
        rsv = await ledger_client.reserve(f"employee:{emp}", amount=100)
        elapsed = time.monotonic() - started
    assert rsv.status == "active"
    assert 1.0 <= elapsed < 4.0
    assert len({r.headers["idempotency-key"] for r in transport.requests}) == 1


async def test_retry_after_beyond_the_budget_fails_at_once(ledger: Ledger) -> None:
    """A Retry-After longer than the call's time budget is not waited for."""
    answer = httpx.Response(
        503, headers={"Retry-After": "60"}, json={"code": "unavailable", "status": 503}
    )
    transport = Faulty(lambda n, request: answer)
    async with client(ledger, transport) as ledger_client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as caught:
            await ledger_client.reserve("employee:nobody", amount=1)
    assert time.monotonic() - started < 1.0
    assert caught.value.retry_after_seconds == 60
    assert len(transport.requests) == 1


async def test_conflict_and_reused_key_are_not_retried(ledger: Ledger) -> None:
    """A 409 is raised as its own class with its extras after one request; a
    422 (same key, other body) likewise."""
    emp = ledger.employee(300)
    transport = Faulty()
    async with client(ledger, transport) as ledger_client:
        with pytest.raises(errors.InsufficientCredits) as caught:
            await ledger_client.reserve(f"employee:{emp}", amount=500)
        assert (caught.value.available, caught.value.requested) == (300, 500)
        assert caught.value.status == 409 and caught.value.code == "insufficient_credits"
        assert len(transport.requests) == 1
        await ledger_client.reserve(f"employee:{emp}", amount=10, idempotency_key="k-1")
        with pytest.raises(errors.IdempotencyKeyReused):
            await ledger_client.reserve(f"employee:{emp}", amount=11, idempotency_key="k-1")
        assert len(transport.requests) == 3


async def test_unreachable_ledger_fails_within_the_budget() -> None:
    """With nothing listening, a call gives up within its time budget with LedgerUnreachable."""
    policy = RetryPolicy(total_seconds=1.0, backoff_initial_seconds=0.05)
    async with AsyncClient("http://127.0.0.1:9", "tlk_x_y", retry=policy) as ledger_client:
        started = time.monotonic()
        with pytest.raises(errors.LedgerUnreachable):
            await ledger_client.reserve("employee:e-1", amount=1)
    assert time.monotonic() - started < 2.0


def test_sync_client_reserve_capture_release(ledger: Ledger) -> None:
    """The blocking client reserves by estimate, captures by provider usage, releases."""
    emp = ledger.employee(100_000)
    with Client(ledger.url, ledger.meter_key) as ledger_client:
        rsv = ledger_client.reserve_for(PRICE_MODEL, 1_000, 500, 100, account=f"employee:{emp}")
        assert rsv.max_output_tokens_allowed == 500 and rsv.amount == cost_of(1_000, 500)
        anthropic = {"input_tokens": 100, "cache_read_input_tokens": 800,
                     "cache_creation_input_tokens": 100, "output_tokens": 40}  # fmt: skip
        result = ledger_client.capture_usage(rsv, anthropic, model=PRICE_MODEL)
        assert result.cost == cost_of(1_000, 40, cached=800)
        other = ledger_client.reserve(f"employee:{emp}", estimate=Estimate(PRICE_MODEL, 10, 10))
        assert ledger_client.release(other).status == "released"
        with pytest.raises(errors.ReservationNotActive) as caught:
            ledger_client.release(other)
        assert caught.value.reservation_status == "released"
        wallet = ledger_client.account(f"employee:{emp}")
    assert (wallet.posted, wallet.reserved) == (100_000 - result.cost, 0)


# --- the usage flusher ------------------------------------------------------------


def events(emp: str, first: int, count: int) -> list[UsageEvent]:
    """Usage events of `emp`, under a source of their own (ids repeat across tests)."""
    return [
        UsageEvent(
            source=f"src-{emp}",
            event_id=f"evt-{i}",
            account=f"employee:{emp}",
            model=PRICE_MODEL,
            input_tokens=100 + i,
            cached_input_tokens=i % 50,
            output_tokens=10 + i % 7,
        )  # fmt: skip
        for i in range(first, first + count)
    ]


async def delivered(dsn: str, source: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_id, count(*) AS n FROM usage_events WHERE source = $1 GROUP BY 1", source
        )
    finally:
        await conn.close()
    return sorted((r["event_id"], r["n"]) for r in rows)


@pytest.fixture
def own_ledger(pg_server: Server, template_database: str, tmp_path: Path) -> Iterator[Ledger]:
    """A tokenledger of this test's own, which the test may stop and restart
    (`ledger.service` is then the restarted one)."""
    with cloned_database(pg_server, template_database) as dsn:
        service = start_ledger(dsn, tmp_path / "service.log")
        ledger = Ledger(service, dsn, "")
        try:
            _setup_directory_and_prices(service.base_url, service.admin_key)
            ledger.meter_key = create_meter_key(dsn)
            yield ledger
        finally:
            ledger.service.stop()


@pytest.mark.slow
async def test_flusher_delivers_each_event_once_across_a_restart(own_ledger: Ledger) -> None:
    """Events accepted before, during and after a restart of the service, and
    a batch whose answer was lost, are each recorded exactly once."""
    ledger = own_ledger
    emp = ledger.employee(10_000_000)
    # The first batch is committed and its answer lost.
    transport = Faulty(lambda n, request: "drop" if n == 1 else None)
    policy = RetryPolicy(total_seconds=1.0, backoff_initial_seconds=0.05)
    async with AsyncClient(
        ledger.url, ledger.meter_key, transport=transport, retry=policy
    ) as ledger_client:
        flusher = UsageFlusher(ledger_client, flush_interval_seconds=0.1, max_batch=40)
        flusher.start()
        for event in events(emp, 0, 100):
            flusher.record(event)
        for _ in range(100):
            if flusher.pending_count == 0:
                break
            await asyncio.sleep(0.1)
        assert flusher.pending_count == 0
        await asyncio.to_thread(ledger.service.stop)
        for event in events(emp, 100, 100):  # accepted while the service is down
            flusher.record(event)
        await asyncio.sleep(1.5)  # the flusher tries, fails and keeps them
        assert flusher.pending_count == 100
        ledger.service = await asyncio.to_thread(restart_ledger, ledger.service)
        for event in events(emp, 200, 50):
            flusher.record(event)
        assert await flusher.close(timeout_seconds=60) == 0
    assert flusher.rejected == []
    assert await delivered(ledger.dsn, f"src-{emp}") == sorted((f"evt-{i}", 1) for i in range(250))
    charged = sum(
        cost_of(e.input_tokens, e.output_tokens, e.cached_input_tokens) for e in events(emp, 0, 250)
    )
    assert ledger.account(f"employee:{emp}")["posted"] == 10_000_000 - charged


async def test_flusher_spool_survives_a_gateway_restart(ledger: Ledger, tmp_path: Path) -> None:
    """Events a flusher could not deliver before it closed stay in its spool,
    and a new flusher on the same spool delivers them once."""
    emp = ledger.employee(1_000_000)
    spool = tmp_path / "usage.spool"
    transport = Faulty()
    transport.down = True
    async with client(ledger, transport) as ledger_client:
        first = UsageFlusher(ledger_client, flush_interval_seconds=0.05, spool_path=spool)
        first.start()
        for event in events(emp, 0, 30):
            first.record(event)
        assert await first.close(timeout_seconds=0.5) == 30
    assert len(spool.read_bytes().splitlines()) == 30
    async with client(ledger) as ledger_client:
        second = UsageFlusher(ledger_client, flush_interval_seconds=0.05, spool_path=spool)
        assert second.pending_count == 30
        second.start()
        assert await second.close(timeout_seconds=30) == 0
    assert spool.read_bytes() == b""
    got = await delivered(ledger.dsn, f"src-{emp}")
    assert got == sorted((f"evt-{i}", 1) for i in range(30))


async def test_flusher_hands_permanent_rejections_over(ledger: Ledger) -> None:
    """An event the service rejects for good (unknown model) goes to on_rejected, not away."""
    emp = ledger.employee(1_000)
    seen: list[str] = []
    async with client(ledger) as ledger_client:
        flusher = UsageFlusher(
            ledger_client, flush_interval_seconds=0.05,
            on_rejected=lambda event, result: seen.append(f"{event.event_id}:{result.code}"),
        )  # fmt: skip
        flusher.start()
        bad = UsageEvent(source="gw-rej", event_id="bad", account=f"employee:{emp}",
                         model="no-such-model", input_tokens=1, output_tokens=1)  # fmt: skip
        flusher.record(bad)
        assert await flusher.close(timeout_seconds=10) == 0
    assert seen == ["bad:unknown_model"]


def test_usage_counts_refuse_impossible_counts() -> None:
    """UsageCounts refuses more cached than input tokens before anything is sent."""
    with pytest.raises(ValueError):
        UsageCounts(PRICE_MODEL, input_tokens=1, output_tokens=0, cached_input_tokens=2)
