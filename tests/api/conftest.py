"""App fixtures: a real service on this test's own database, driven in-process.

`client` is an httpx-compatible async client on the ASGI app (Litestar's
AsyncTestClient), so concurrent requests really run concurrently against
PostgreSQL through the pool. `clock` pins the service's notion of now.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.auth import new_key
from service.config import Config

# Employee tokens in tests are HS256 with this secret, issuer and audience.
JWT_SECRET = "test-secret-for-hs256-tokens-0123456789abcdef"
JWT_ISSUER = "https://idp.test"
JWT_AUDIENCE = "tokenledger"


class FakeClock:
    """The service's clock. `None` (the default) means PostgreSQL's own
    clock; set `now` to pin every operation to an exact instant."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime | None:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when

    def advance(self, **delta: float) -> datetime:
        assert self.now is not None, "set the clock before advancing it"
        self.now = self.now + timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def admin_key() -> str:
    """The secret of an admin service key the app creates at start-up."""
    return new_key().secret


@pytest.fixture
def config(database_url: str, admin_key: str) -> Config:
    return Config(
        database_url=database_url,
        apply_schema=False,  # the template already has it
        sweeper_enabled=False,  # tests run the sweeper explicitly
        pool_min_size=1,
        pool_max_size=30,
        log_format="json",
        log_level="warning",
        environment="development",
        bootstrap_admin_key=admin_key,
        jwt_issuer=JWT_ISSUER,
        jwt_audience=JWT_AUDIENCE,
        jwt_hs256_secret=JWT_SECRET,
        rate_limits="",  # tests that pin rate limiting build their own app
    )


@pytest.fixture
async def client(config: Config, clock: FakeClock, admin_key: str) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(config, clock=clock)
    async with AsyncTestClient(app=app, timeout=30) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        yield c


_keys = itertools.count()


def key() -> dict[str, str]:
    """A fresh Idempotency-Key header."""
    return {"Idempotency-Key": f"test-key-{next(_keys)}-{datetime.now(UTC).timestamp()}"}


class Api:
    """Small helpers over the HTTP API, so tests read as the scenario they pin."""

    def __init__(self, client: AsyncTestClient[Any]) -> None:
        self.c = client

    async def department(self, dept: str = "eng", **body: Any) -> dict[str, Any]:
        r = await self.c.put(f"/v1/departments/{dept}", json={"name": dept.title(), **body})
        assert r.status_code in (200, 201), r.text
        return r.json()  # type: ignore[no-any-return]

    async def employee(self, emp: str, dept: str = "eng") -> dict[str, Any]:
        r = await self.c.put(
            f"/v1/employees/{emp}", json={"name": emp, "email": f"{emp}@example.com", "department": dept}
        )
        if r.status_code == 404:
            await self.department(dept)
            return await self.employee(emp, dept)
        assert r.status_code in (200, 201), r.text
        return r.json()  # type: ignore[no-any-return]

    async def grant(self, emp: str, amount: int, **extra: Any) -> dict[str, Any]:
        body = {"employee": emp, "amount": amount, "reason": "spot_bonus", **extra}
        r = await self.c.post("/v1/grants", json=body, headers=key())
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def debit(self, account: str, amount: int, **extra: Any) -> Any:
        return await self.c.post("/v1/debits", json={"account": account, "amount": amount, **extra}, headers=key())

    async def transfer(self, src: str, dst: str, amount: int, **extra: Any) -> Any:
        return await self.c.post(
            "/v1/transfers", json={"from": src, "to": dst, "amount": amount, **extra}, headers=key()
        )

    async def account(self, address: str) -> dict[str, Any]:
        r = await self.c.get(f"/v1/accounts/{address}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def available(self, address: str) -> int:
        return int((await self.account(address))["available"])


@pytest.fixture
def api(client: AsyncTestClient[Any]) -> Api:
    return Api(client)
