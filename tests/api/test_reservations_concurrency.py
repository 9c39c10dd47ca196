"""Reservations under concurrency: many holds at once never overbook an
account, a capture racing a release resolves the reservation once, and a
random mix of reserve/capture/release/debit/transfer leaves a ledger that
passes `tokenledger audit`.

`Burst` sends the requests of a test concurrently and counts how many were
in flight at once; every test checks that they really overlapped.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient
from litestar.testing import transport as litestar_transport

from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, posted

T = datetime(2030, 1, 1, tzinfo=UTC)


class Burst:
    """Sends requests concurrently and records how many were in flight at once,
    so each test can show that they overlapped in the app and in PostgreSQL.

    With an in-loop ASGI client (httpx.AsyncClient) gathered requests overlap
    by themselves. Litestar's AsyncTestClient instead hands each request to the
    app's loop with a synchronous portal call, which would run gathered requests
    one after another; for it, each request is sent from a worker thread."""

    def __init__(self, client: Any, workers: int = 64) -> None:
        self.client = client
        self.executor: ThreadPoolExecutor | None = None
        if isinstance(client, AsyncTestClient):
            self.http = httpx.Client(
                # why: Litestar's sync transport is an httpx transport without subclassing it
                transport=litestar_transport.TestClientTransport(client=client),  # type: ignore[arg-type]
                base_url=client.base_url,
                headers=client.headers,  # the client's credentials
                timeout=30,
            )
            self.executor = ThreadPoolExecutor(max_workers=workers)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _send(self, method: str, url: str, kwargs: dict[str, Any]) -> httpx.Response:
        self._enter()
        try:
            return self.http.request(method, url, **kwargs)
        finally:
            self._leave()

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.executor is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.executor, functools.partial(self._send, method, url, kwargs)
            )
        self._enter()
        try:
            response: httpx.Response = await self.client.request(method, url, **kwargs)
            return response
        finally:
            self._leave()

    async def post(
        self, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"headers": headers if headers is not None else key()}
        if body is not None:
            kwargs["json"] = body
        return await self.request("POST", url, **kwargs)

    async def reserve(self, account: str, amount: int) -> httpx.Response:
        return await self.post("/v1/reservations", {"account": account, "amount": amount})

    async def capture(self, rid: str, amount: int) -> httpx.Response:
        return await self.post(f"/v1/reservations/{rid}/capture", {"amount": amount})

    async def release(self, rid: str) -> httpx.Response:
        return await self.post(f"/v1/reservations/{rid}/release")

    async def debit(self, account: str, amount: int) -> httpx.Response:
        return await self.post("/v1/debits", {"account": account, "amount": amount})

    async def transfer(self, src: str, dst: str, amount: int) -> httpx.Response:
        return await self.post("/v1/transfers", {"from": src, "to": dst, "amount": amount})

    def close(self) -> None:
        # (the test transport has nothing to close, and httpx.Client.close() would call it)
        if self.executor is not None:
            self.executor.shutdown(wait=True)


@pytest.fixture
async def burst(client: Any) -> AsyncIterator[Burst]:
    b = Burst(client)
    try:
        yield b
    finally:
        b.close()


def outcome(r: Any) -> str:
    """The status, followed by the error code of a 4xx/5xx answer."""
    if r.status_code < 400:
        return str(r.status_code)
    try:
        return f"{r.status_code} {r.json().get('code')}"
    except ValueError:
        return f"{r.status_code} {r.text[:200]}"


async def balances(api: Api, address: str) -> tuple[int, int, int]:
    a = await api.account(address)
    return a["posted"], a["reserved"], a["available"]


class Watcher:
    """Polls accounts while a burst runs and records what it saw."""

    def __init__(self, burst: Burst, addresses: list[str]) -> None:
        self.burst = burst
        self.addresses = addresses
        self.done = asyncio.Event()
        self.seen: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def _poll(self, address: str) -> None:
        while not self.done.is_set():
            r = await self.burst.request("GET", f"/v1/accounts/{address}")
            if r.status_code != 200:
                self.failures.append(outcome(r))
                continue
            self.seen.append(r.json())

    def start(self, per_address: int = 1) -> None:
        for address in self.addresses:
            for _ in range(per_address):
                self.tasks.append(asyncio.create_task(self._poll(address)))

    async def stop(self) -> None:
        self.done.set()
        await asyncio.gather(*self.tasks)

    def assert_never_overdrawn(self) -> None:
        assert self.failures == []
        assert self.seen, "the pollers never completed a read"
        bad = [
            (a["address"], a["posted"], a["reserved"], a["available"])
            for a in self.seen
            if a["available"] < 0 or a["reserved"] > a["posted"] or a["reserved"] < 0
        ]
        assert bad == [], bad


async def test_concurrent_reservations_never_overbook(
    api: Api, burst: Burst, database_url: str
) -> None:
    """40 concurrent reservations of 7 against 100 available: exactly 14 are 201, the rest 409
    insufficient_credits, and no concurrent reader sees available below zero or reserved above
    posted."""
    balance, amount, n = 100, 7, 40
    wins = balance // amount
    await api.employee("e1")
    await api.grant("e1", balance)

    watcher = Watcher(burst, ["employee:e1"])
    watcher.start(per_address=3)
    try:
        results = await asyncio.gather(*(burst.reserve("employee:e1", amount) for _ in range(n)))
    finally:
        await watcher.stop()

    assert burst.max_in_flight > 10, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert outcomes.count("201") == wins, outcomes
    assert outcomes.count("409 insufficient_credits") == n - wins, outcomes
    for r in results:
        body = r.json()
        if r.status_code == 409:
            assert body["requested"] == amount and 0 <= body["available"] < amount, body
        else:
            assert body["status"] == "active" and body["amount"] == amount
            assert 0 <= body["available_after"] <= balance - amount
    assert sorted(r.json()["available_after"] for r in results if r.status_code == 201) == [
        balance - amount * i for i in range(wins, 0, -1)
    ]
    watcher.assert_never_overdrawn()
    # Every read sees a whole number of committed holds.
    assert all((balance - a["available"]) % amount == 0 for a in watcher.seen)
    assert all(a["posted"] == balance for a in watcher.seen)

    assert await balances(api, "employee:e1") == (balance, wins * amount, balance % amount)
    r = await api.c.get("/v1/accounts/employee:e1/lots")
    assert [lot["reserved"] for lot in r.json()["items"]] == [wins * amount]
    r = await api.c.get("/v1/accounts/employee:e1/reservations", params={"limit": 100})
    assert len(r.json()["items"]) == wins
    await assert_audit_clean(database_url)


async def test_concurrent_reservations_of_a_department_budget(
    api: Api, burst: Burst, database_url: str
) -> None:
    """30 concurrent reservations of 10 against a 95-credit department budget: exactly 9 are 201 and
    available never goes below zero."""
    await api.department("eng")
    assert (await api.transfer("system:issuance", "department:eng", 95)).status_code == 201

    watcher = Watcher(burst, ["department:eng"])
    watcher.start(per_address=2)
    try:
        results = await asyncio.gather(*(burst.reserve("department:eng", 10) for _ in range(30)))
    finally:
        await watcher.stop()

    assert burst.max_in_flight > 10, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert outcomes.count("201") == 9, outcomes
    assert outcomes.count("409 insufficient_credits") == 21, outcomes
    watcher.assert_never_overdrawn()
    assert await balances(api, "department:eng") == (95, 90, 5)
    await assert_audit_clean(database_url)


async def test_capture_racing_release_resolves_once(
    api: Api, burst: Burst, clock: FakeClock, database_url: str
) -> None:
    """A capture and a release of one reservation sent at once, ten times over: exactly one wins and
    the other answers 409 reservation_not_active with the winner's status."""
    clock.set(T)
    await api.employee("e1")
    await api.grant("e1", 1000)
    captured_total = 0
    winners: list[str] = []
    extras: list[Any] = []  # the losers' `reservation_status` extras, checked last
    for i in range(10):
        r = await api.c.post(
            "/v1/reservations", json={"account": "employee:e1", "amount": 50}, headers=key()
        )
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        # Alternate which request is sent first, so either can win.
        if i % 2:
            rel, cap = await asyncio.gather(burst.release(rid), burst.capture(rid, 30))
        else:
            cap, rel = await asyncio.gather(burst.capture(rid, 30), burst.release(rid))
        pair = sorted([outcome(cap), outcome(rel)])
        assert pair == ["200", "409 reservation_not_active"], (cap.text, rel.text)
        winner, loser = (cap, rel) if cap.status_code == 200 else (rel, cap)
        state = "captured" if winner is cap else "released"
        winners.append(state)
        body = loser.json()
        assert state in body["detail"], body
        extras.append(body["reservation_status"])
        got = (await api.c.get(f"/v1/reservations/{rid}")).json()
        assert got["status"] == state
        if state == "captured":
            captured_total += 30
            assert winner.json()["reservation"]["status"] == "captured"
        else:
            assert winner.json()["status"] == "released"
        assert await balances(api, "employee:e1") == (
            1000 - captured_total,
            0,
            1000 - captured_total,
        )

    assert burst.max_in_flight >= 2
    r = await api.c.get("/v1/transactions", params={"kind": "capture", "limit": 100})
    assert len(r.json()["items"]) == winners.count("captured")
    assert await posted(api, "system:usage") == captured_total
    await assert_audit_clean(database_url)
    assert extras == winners, "each loser's reservation_status should be the winner's status"


async def test_one_key_many_concurrent_creates_hold_once(
    api: Api, burst: Burst, database_url: str
) -> None:
    """20 concurrent identical reservations under one Idempotency-Key hold the credits once; the
    others replay it or answer idempotency_key_in_progress."""
    await api.employee("e1")
    await api.grant("e1", 100)
    headers = key()
    body = {"account": "employee:e1", "amount": 30}
    results = await asyncio.gather(
        *(burst.post("/v1/reservations", body, headers=headers) for _ in range(20))
    )
    assert burst.max_in_flight > 5, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert set(outcomes) <= {"201", "409 idempotency_key_in_progress"}, outcomes
    created = [r for r in results if r.status_code == 201]
    fresh = [r for r in created if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(fresh) == 1, outcomes
    assert all(r.json() == fresh[0].json() for r in created)
    assert await balances(api, "employee:e1") == (100, 30, 70)
    await assert_audit_clean(database_url)


async def test_random_mixed_traffic_keeps_invariants(
    api: Api, burst: Burst, database_url: str
) -> None:
    """About 200 seeded random reserve, capture, release, debit and transfer requests in concurrent
    batches over five wallets: every answer is 2xx or an expected 409, credits are conserved and the
    audit passes."""
    rng = random.Random(20300101)  # noqa: S311  # why: a reproducible mix, not secrets
    emps = [f"w{i}" for i in range(5)]
    addresses = [f"employee:{e}" for e in emps]
    granted = 0
    for e in emps:
        await api.employee(e)
        for amount in (150, 100):
            await api.grant(e, amount)
            granted += amount

    active: list[str] = []  # reservations believed active
    resolved: list[str] = []  # captured or released ones, to race against
    usage = 0
    counts: dict[str, int] = {}
    unexpected: list[tuple[str, str]] = []
    watcher = Watcher(burst, addresses)
    watcher.start()
    try:
        for _batch in range(8):
            ops: list[tuple[str, tuple[Any, ...]]] = []
            for _ in range(25):
                roll = rng.random()
                if roll < 0.3 or not active:
                    ops.append(("reserve", (rng.choice(addresses), rng.randint(1, 60))))
                elif roll < 0.5:
                    ops.append(("capture", (rng.choice(active), rng.randint(1, 90))))
                elif roll < 0.62:
                    ops.append(("release", (rng.choice(active),)))
                elif roll < 0.67 and resolved:
                    # A late capture or release of a resolved reservation.
                    late = rng.choice(resolved)
                    if rng.random() < 0.5:
                        ops.append(("capture", (late, rng.randint(1, 30))))
                    else:
                        ops.append(("release", (late,)))
                elif roll < 0.85:
                    ops.append(("debit", (rng.choice(addresses), rng.randint(1, 40))))
                else:
                    src, dst = rng.sample(addresses, 2)
                    ops.append(("transfer", (src, dst, rng.randint(1, 40))))
            send: dict[str, Callable[..., Awaitable[httpx.Response]]] = {
                "reserve": burst.reserve,
                "capture": burst.capture,
                "release": burst.release,
                "debit": burst.debit,
                "transfer": burst.transfer,
            }
            results = await asyncio.gather(*(send[op](*args) for op, args in ops))
            for (op, args), r in zip(ops, results, strict=True):
                o = outcome(r)
                counts[f"{op} {o}"] = counts.get(f"{op} {o}", 0) + 1
                allowed = {
                    "reserve": {"201", "409 insufficient_credits"},
                    "capture": {"200", "409 insufficient_credits", "409 reservation_not_active"},
                    "release": {"200", "409 reservation_not_active"},
                    "debit": {"201", "409 insufficient_credits"},
                    "transfer": {"201", "409 insufficient_credits"},
                }[op]
                if o not in allowed:
                    unexpected.append((op, o))
                if op == "reserve" and r.status_code == 201:
                    active.append(r.json()["id"])
                elif op in ("capture", "release") and r.status_code == 200:
                    rid = args[0]
                    if rid in active:
                        active.remove(rid)
                    resolved.append(rid)
                    if op == "capture":
                        usage += args[1]
                        assert r.json()["transaction"]["entries"][0]["amount"] == -args[1]
                elif op == "debit" and r.status_code == 201:
                    usage += args[1]
    finally:
        await watcher.stop()

    assert burst.max_in_flight > 10, "the requests did not overlap"
    assert not [o for o in unexpected if o[1].startswith("5")], unexpected
    assert unexpected == [], unexpected
    assert sum(counts.values()) == 200
    # The mix really exercised every path.
    for want in ("reserve 201", "capture 200", "release 200", "debit 201", "transfer 201"):
        assert counts.get(want, 0) > 0, counts
    assert counts.get("capture 409 reservation_not_active", 0) > 0, counts
    watcher.assert_never_overdrawn()

    wallets = [await api.account(a) for a in addresses]
    assert all(w["available"] >= 0 and w["reserved"] <= w["posted"] for w in wallets)
    assert sum(w["posted"] for w in wallets) == granted - usage
    assert await posted(api, "system:usage") == usage
    # Each wallet's reserved is exactly its active reservations.
    for w in wallets:
        r = await api.c.get(
            f"/v1/accounts/{w['address']}/reservations", params={"status": "active", "limit": 500}
        )
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert w["reserved"] == sum(x["amount"] for x in items), w
        assert {x["id"] for x in items} <= set(active)
    await assert_audit_clean(database_url)


async def test_returning_voided_credits_locks_the_funder_in_the_global_order(
    client: Any, api: Api, database_url: str
) -> None:
    """Releasing a reservation on a lot voided while held returns its credits
    to the funding department. The department (lower id than the wallet) is
    locked before the wallet, as every write does: while another transaction
    holds the department and then asks for the wallet, the release waits
    without holding the wallet, so there is no deadlock and no retry."""
    await api.department("eng")
    assert (await api.transfer("system:issuance", "department:eng", 1000)).status_code == 201
    await api.employee("e-w")
    lot = (await api.grant("e-w", 100, funded_by="department:eng"))["lot"]
    r = await client.post(
        "/v1/reservations", json={"account": "employee:e-w", "amount": 40}, headers=key()
    )
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    r = await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    ledger = client.app.state.ledger
    retries_before = ledger.metrics.db_retries._value.get()

    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SET lock_timeout = '5s'")
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "SELECT 1 FROM accounts WHERE address = 'department:eng' FOR NO KEY UPDATE"
        )
        release = asyncio.create_task(client.post(f"/v1/reservations/{rid}/release", headers=key()))
        await asyncio.sleep(0.5)  # the release is now waiting for a lock
        await other.execute(
            "SELECT 1 FROM accounts WHERE address = 'employee:e-w' FOR NO KEY UPDATE"
        )
        await tx.commit()
    finally:
        await other.close()
    r = await release
    assert r.status_code == 200, r.text
    assert ledger.metrics.db_retries._value.get() == retries_before, "the release deadlocked"
    assert await api.available("department:eng") == 1000
    await assert_audit_clean(database_url)
