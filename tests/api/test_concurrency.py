"""Concurrency: many requests at once through the real app and pool never
overspend, never deadlock, apply an idempotency key once, and leave a ledger
that passes `tokenledger audit`.

The `client` fixture runs the app in the test's own event loop, so requests
gathered with asyncio overlap in the app and in PostgreSQL; the `burst`
helper counts how many were in flight at once and every test checks that
they really overlapped.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, assert_audit_clean, key, posted


def outcome(r: Any) -> str:
    """201, or the error code of a 4xx/5xx answer."""
    if r.status_code in (200, 201):
        return str(r.status_code)
    try:
        return f"{r.status_code} {r.json().get('code')}"
    except ValueError:
        return f"{r.status_code} {r.text[:200]}"


class Burst:
    """Sends requests concurrently through the test client and records how
    many were in flight at once, so each test can show they overlapped."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._in_flight = 0
        self.max_in_flight = 0

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            response: httpx.Response = await self.client.request(method, url, **kwargs)
            return response
        finally:
            self._in_flight -= 1

    async def post(
        self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.request(
            "POST", url, json=body, headers=headers if headers is not None else key()
        )

    async def debit(self, account: str, amount: int) -> httpx.Response:
        return await self.post("/v1/debits", {"account": account, "amount": amount})

    async def transfer(self, src: str, dst: str, amount: int) -> httpx.Response:
        return await self.post("/v1/transfers", {"from": src, "to": dst, "amount": amount})

    async def grant(self, employee: str, amount: int) -> httpx.Response:
        return await self.post(
            "/v1/grants", {"employee": employee, "amount": amount, "reason": "monthly_allotment"}
        )

    def close(self) -> None:
        pass


@pytest.fixture
async def burst(client: AsyncTestClient[Any]) -> AsyncIterator[Burst]:
    b = Burst(client)
    try:
        yield b
    finally:
        b.close()


async def test_concurrent_debits_never_overspend(api: Api, burst: Burst, database_url: str) -> None:
    """50 concurrent debits of 7 against 100 credits: exactly 14 succeed, the rest are
    insufficient_credits, and no concurrent reader ever sees available below zero or a half-
    applied debit."""
    balance, amount, n = 100, 7, 50
    wins = balance // amount
    await api.employee("e1")
    await api.grant("e1", balance)

    done = asyncio.Event()
    observed: list[int] = []
    poll_failures: list[str] = []

    async def poll() -> None:
        while not done.is_set():
            r = await burst.request("GET", "/v1/accounts/employee:e1")
            if r.status_code != 200:
                poll_failures.append(outcome(r))
                continue
            observed.append(int(r.json()["available"]))

    async def debit_all() -> list[Any]:
        try:
            return await asyncio.gather(*(burst.debit("employee:e1", amount) for _ in range(n)))
        finally:
            done.set()

    pollers = [asyncio.create_task(poll()) for _ in range(3)]
    results = await debit_all()
    await asyncio.gather(*pollers)

    assert burst.max_in_flight > 10, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert not [o for o in outcomes if o.startswith("5")], outcomes
    assert outcomes.count("201") == wins, outcomes
    assert outcomes.count("409 insufficient_credits") == n - wins, outcomes
    for r in results:
        if r.status_code == 409:
            body = r.json()
            assert body["requested"] == amount and 0 <= body["available"] < amount, body

    assert poll_failures == []
    assert observed, "the pollers never completed a read"
    # Every read sees a whole number of committed debits: never below zero, never a partial debit.
    assert all(0 <= a <= balance for a in observed), observed
    assert all((balance - a) % amount == 0 for a in observed), observed

    final = await api.account("employee:e1")
    assert final["available"] == balance - wins * amount
    assert final["posted"] == balance - wins * amount
    assert await posted(api, "system:usage") == wins * amount
    await assert_audit_clean(database_url)


async def test_opposing_transfers_do_not_deadlock(
    api: Api, burst: Burst, database_url: str
) -> None:
    """40 A→B and 40 B→A transfers at once: each is 201 or insufficient_credits (no deadlock, 500 or
    503) and the balances add up."""
    await api.employee("a")
    await api.employee("b")
    start = {"employee:a": 400, "employee:b": 300}
    for address, amount in start.items():
        await api.grant(address.split(":")[1], amount)
    rng = random.Random(7)  # noqa: S311  # why: reproducible test data
    requests = [("employee:a", "employee:b", rng.randint(1, 25)) for _ in range(40)]
    requests += [("employee:b", "employee:a", rng.randint(1, 25)) for _ in range(40)]
    rng.shuffle(requests)

    results = await asyncio.gather(*(burst.transfer(s, d, amt) for s, d, amt in requests))

    assert burst.max_in_flight > 10, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert set(outcomes) <= {"201", "409 insufficient_credits"}, outcomes
    assert outcomes.count("201") > 0
    expected = dict(start)
    for (src, dst, amt), r in zip(requests, results, strict=True):
        if r.status_code == 201:
            expected[src] -= amt
            expected[dst] += amt
            legs = {e["account"]: e["amount"] for e in r.json()["entries"]}
            assert legs == {src: -amt, dst: amt}
    for address, amount in expected.items():
        acct = await api.account(address)
        assert (acct["posted"], acct["available"]) == (amount, amount), address
    await assert_audit_clean(database_url)


async def _same_key_burst(
    burst: Burst, path: str, body: dict[str, Any], n: int
) -> list[httpx.Response]:
    headers = key()
    return await asyncio.gather(*(burst.post(path, body, headers=headers) for _ in range(n)))


async def test_one_idempotency_key_one_effect_debit(
    api: Api, burst: Burst, database_url: str
) -> None:
    """20 concurrent identical debits with one Idempotency-Key debit once; the others replay the
    same body or answer idempotency_key_in_progress."""
    await api.employee("e1")
    await api.grant("e1", 100)

    results = await _same_key_burst(
        burst, "/v1/debits", {"account": "employee:e1", "amount": 30}, 20
    )

    assert burst.max_in_flight > 5, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert set(outcomes) <= {"201", "409 idempotency_key_in_progress"}, outcomes
    created = [r for r in results if r.status_code == 201]
    fresh = [r for r in created if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(fresh) == 1, outcomes
    assert all(r.json() == fresh[0].json() for r in created)
    assert await api.available("employee:e1") == 70
    r = await api.c.get("/v1/transactions", params={"kind": "debit"})
    assert [t["id"] for t in r.json()["items"]] == [fresh[0].json()["id"]]
    await assert_audit_clean(database_url)


async def test_one_idempotency_key_one_effect_grant(
    api: Api, burst: Burst, database_url: str
) -> None:
    """20 concurrent identical grants with one Idempotency-Key create one lot and one grant
    transaction."""
    await api.employee("e1")

    body = {"employee": "e1", "amount": 500, "reason": "spot_bonus"}
    results = await _same_key_burst(burst, "/v1/grants", body, 20)

    assert burst.max_in_flight > 5, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert set(outcomes) <= {"201", "409 idempotency_key_in_progress"}, outcomes
    created = [r for r in results if r.status_code == 201]
    assert len([r for r in created if r.headers.get("Idempotent-Replayed") != "true"]) == 1
    assert len({r.json()["lot"]["id"] for r in created}) == 1
    assert await api.available("employee:e1") == 500
    r = await api.c.get("/v1/accounts/employee:e1/lots")
    assert len(r.json()["items"]) == 1
    r = await api.c.get("/v1/transactions", params={"kind": "grant"})
    assert len(r.json()["items"]) == 1
    await assert_audit_clean(database_url)


async def test_mixed_concurrent_traffic_keeps_invariants(
    api: Api, burst: Burst, database_url: str
) -> None:
    """Concurrent grants to many wallets, debits and transfers among them: no 5xx, credits are
    conserved and the audit passes."""
    emps = [f"e{i}" for i in range(12)]
    await api.department("eng")
    for e in emps:
        await api.employee(e)
    # Everyone starts with a little, so early debits and transfers can succeed.
    for e in emps:
        await api.grant(e, 50)

    rng = random.Random(11)  # noqa: S311  # why: reproducible test data
    ops: list[tuple[str, tuple[Any, ...]]] = []
    for e in emps:
        for _ in range(3):
            ops.append(("grant", (e, rng.randint(10, 60))))
    for _ in range(60):
        ops.append(("debit", (f"employee:{rng.choice(emps)}", rng.randint(1, 40))))
    for _ in range(60):
        src, dst = rng.sample(emps, 2)
        ops.append(("transfer", (f"employee:{src}", f"employee:{dst}", rng.randint(1, 40))))
    rng.shuffle(ops)
    send: dict[str, Callable[..., Awaitable[httpx.Response]]] = {
        "grant": burst.grant,
        "debit": burst.debit,
        "transfer": burst.transfer,
    }

    results = await asyncio.gather(*(send[op](*args) for op, args in ops))

    assert burst.max_in_flight > 10, "the requests did not overlap"
    outcomes = [outcome(r) for r in results]
    assert set(outcomes) <= {"201", "409 insufficient_credits"}, outcomes
    done = list(zip(ops, results, strict=True))
    # Grants never fail; debits partly succeed.
    assert all(r.status_code == 201 for (op, _), r in done if op == "grant")
    granted = 50 * len(emps) + sum(args[1] for (op, args), _ in done if op == "grant")
    debited = sum(args[1] for (op, args), r in done if op == "debit" and r.status_code == 201)
    assert debited > 0
    wallets = [await api.account(f"employee:{e}") for e in emps]
    assert all(w["available"] >= 0 for w in wallets)
    assert sum(w["posted"] for w in wallets) == granted - debited
    assert await posted(api, "system:usage") == debited
    assert await posted(api, "system:issuance") == -granted
    await assert_audit_clean(database_url)
