"""Talking to the service for set-up: an HTTP client, and the departments,
employees, grants and policies a scenario needs before it is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from bench.http import Response as LeanResponse

DEPARTMENT = "bench"
# Setup requests run this many at a time.
SETUP_CONCURRENCY = 8
# Pages of a list read back for a check, at most.
MAX_PAGES = 200


def make_client(base_url: str, concurrency: int, token: str | None = None) -> httpx.AsyncClient:
    """HTTP/1.1 keep-alive, one connection per concurrent worker, explicit timeouts.
    trust_env=False: proxies from the environment never see our traffic."""
    size = max(1, concurrency) + 2
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=base_url,
        http1=True,
        http2=False,
        limits=httpx.Limits(
            max_connections=size, max_keepalive_connections=size, keepalive_expiry=60
        ),
        timeout=httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=30.0),
        headers=headers,
        trust_env=False,
    )


def problem_code(response: httpx.Response | LeanResponse) -> str | None:
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


class SetupError(RuntimeError):
    """A setup request did not answer as expected."""


async def expect(response: Awaitable[httpx.Response], *statuses: int) -> dict[str, Any]:
    r = await response
    if r.status_code not in statuses:
        raise SetupError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")
    body = r.json()
    assert isinstance(body, dict)
    return body


async def bounded_gather(limit: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


class Api:
    """Setup through the API: departments, employees, grants, balances."""

    def __init__(self, client: httpx.AsyncClient, run_id: str) -> None:
        self.c = client
        self.run_id = run_id
        self._n = 0

    def key(self, label: str) -> dict[str, str]:
        self._n += 1
        return {"Idempotency-Key": f"{self.run_id}-{label}-{self._n}"}

    async def department(self, dept: str = DEPARTMENT) -> None:
        await expect(self.c.put(f"/v1/departments/{dept}", json={"name": dept.title()}), 200, 201)

    async def employees(self, ids: Sequence[str], dept: str = DEPARTMENT) -> None:
        def job(emp: str) -> Callable[[], Awaitable[Any]]:
            body = {"name": emp, "email": f"{emp}@bench.example", "department": dept}
            return lambda: expect(self.c.put(f"/v1/employees/{emp}", json=body), 200, 201)

        await bounded_gather(SETUP_CONCURRENCY, [job(e) for e in ids])

    async def grants(self, amounts: dict[str, int]) -> None:
        def job(emp: str, amount: int) -> Callable[[], Awaitable[Any]]:
            body = {
                "employee": emp,
                "amount": amount,
                "reason": "adjustment",
                "memo": "bench setup",
            }
            headers = self.key("setup-grant")
            return lambda: expect(self.c.post("/v1/grants", json=body, headers=headers), 201)

        await bounded_gather(SETUP_CONCURRENCY, [job(e, a) for e, a in amounts.items()])

    async def policies(self, ids: Sequence[str], funding: dict[str, int]) -> None:
        """A spend policy on each wallet that never refuses the bench's load but is
        checked on every operation: a hard daily limit well above the wallet's
        funding, a soft monthly limit, and a tier rule (the issue-12 speed target)."""

        def job(emp: str) -> Callable[[], Awaitable[Any]]:
            body = {
                "limits": [
                    {"window": "day", "amount": 10 * funding[emp] + 1000},
                    {"window": "month", "amount": 100 * funding[emp] + 1000, "mode": "soft"},
                ],
                "models": {"tiers": ["standard", "premium"]},
            }
            return lambda: expect(self.c.put(f"/v1/accounts/employee:{emp}/policy", json=body), 200)

        await bounded_gather(SETUP_CONCURRENCY, [job(e) for e in ids])

    async def account(self, address: str) -> dict[str, Any]:
        return await expect(self.c.get(f"/v1/accounts/{address}"), 200)

    async def posted(self, address: str) -> int:
        return int((await self.account(address))["posted"])

    async def transactions(self, address: str, kind: str) -> list[dict[str, Any]]:
        """Every transaction of `kind` touching `address`, all pages (bounded)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"account": address, "kind": kind, "limit": 500}
            if cursor is not None:
                params["cursor"] = cursor
            page = await expect(self.c.get("/v1/transactions", params=params), 200)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items
        raise SetupError(f"GET /v1/transactions?account={address}: over {MAX_PAGES} pages")
