"""App fixtures: a real service on this test's own database, driven in-process.

`client` is an httpx AsyncClient on the ASGI app in the test's own event
loop, so concurrent requests really run concurrently against PostgreSQL
through the pool. `clock` pins the service's notion of now.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from service import db as service_db
from service.app import create_app
from service.audit import run_audit
from service.auth import new_key
from service.config import Config

# Employee tokens in tests are HS256 with this secret, issuer and audience.
JWT_SECRET = "test-secret-for-hs256-tokens-0123456789abcdef"  # noqa: S105  # why: a test fixture
JWT_ISSUER = "https://idp.test"
JWT_AUDIENCE = "tokenledger"
# The key that encrypts webhook secrets in tests (32 bytes, base64).
TEST_WEBHOOK_KEY = "dGVzdC13ZWJob29rLWtleS0wMTIzNDU2Nzg5YWJjZGU="


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
        background_enabled=False,  # tests run the sweeper explicitly
        pool_min_size=1,
        pool_max_size=30,
        # A busy 2-core CI box must not turn a queue for the pool into 503s;
        # overload behaviour has tests of its own (bench/chaos).
        pool_acquire_timeout_seconds=20,
        # Likewise a request queued behind another's row locks (a batch of
        # usage events on the same wallets): on a loaded box the 2 s default
        # lock timeout turns that wait into a 503, which is not what these
        # tests are about (the chaos smoke run pins 503 with Retry-After).
        lock_timeout_ms=10_000,
        statement_timeout_ms=15_000,
        chain_settle_seconds=20.0,
        log_format="json",
        log_level="warning",
        environment="development",
        bootstrap_admin_key=admin_key,
        jwt_issuer=JWT_ISSUER,
        jwt_audience=JWT_AUDIENCE,
        jwt_hs256_secret=JWT_SECRET,
        # Tests pin the clock and record usage at instants months before it
        # (price versions); test_occurred_at_must_be_recent pins the bounds.
        usage_max_age_seconds=5 * 365 * 86_400,
        # No key cache: these tests revoke a key on a connection of their own
        # and expect the very next request to fail, which the cache only
        # guarantees within a second (NOTIFY is asynchronous).
        # tests/api/test_key_cache.py tests the cache with its default.
        key_cache_ttl_seconds=0.0,
        # Employee tokens in tests may carry hr (test_extra_roles_claim).
        jwt_allowed_roles="employee,hr",
        rate_limits="",  # tests that pin rate limiting build their own app
        # Webhooks can be made (to loopback); tests/api/test_webhooks.py runs
        # the dispatcher in apps of its own.
        webhook_secret_key=TEST_WEBHOOK_KEY,
        webhook_allow_private=True,
        webhook_dispatcher_enabled=False,
    )


@pytest.fixture
async def client(config: Config, clock: FakeClock, admin_key: str) -> AsyncIterator[Any]:
    """An httpx client on the app over ASGI, in this test's event loop: requests
    gathered with asyncio really run concurrently in the app and its pool."""
    app = create_app(config, clock=clock)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver.local",
            timeout=30,
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            c.app = app  # type: ignore[attr-defined]  # why: tests reach the app's state
            yield c


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Start-up and shut-down of the app, both inside one task of their own
    (Litestar's lifespan uses an anyio task group, which must be entered and
    left by the same task, while pytest-asyncio sets a fixture up and tears it
    down in different tasks)."""
    started = asyncio.Event()
    stop = asyncio.Event()

    async def lifespan() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(lifespan())
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # start-up failed: raise its error here
    try:
        yield
    finally:
        stop.set()
        await task


PROBLEM_JSON = "application/problem+json"


def mismatch(r: Any, status: int, code: str) -> str | None:
    """Why `r` is not an RFC 9457 problem with this status and code, or None when it is."""
    if r.status_code != status:
        return f"status {r.status_code}, not {status}: {r.text[:300]}"
    if not r.headers.get("content-type", "").startswith(PROBLEM_JSON):
        return f"content-type {r.headers.get('content-type')}"
    body = r.json()
    if body.get("code") != code:
        return f"code {body.get('code')}, not {code}: {body}"
    # `status` is the HTTP status, for every code (a resource's state is an
    # extra of its own, such as reservation_status).
    if body.get("status") != status:
        return f"body status {body.get('status')}, not {status}: {body}"
    return None


def problem(r: Any, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem with this status and code; return its body."""
    why = mismatch(r, status, code)
    assert why is None, why
    body: dict[str, Any] = r.json()
    return body


def ts(when: datetime) -> str:
    """The service's rendering of an instant: UTC, six fractional digits, Z."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def posted(api: Api, address: str) -> int:
    return int((await api.account(address))["posted"])


async def assert_audit_clean(database_url: str) -> None:
    """`tokenledger audit` finds nothing wrong with this test's database."""
    conn = await service_db.connect(database_url)
    try:
        violations = await run_audit(conn)
    finally:
        await conn.close()
    assert violations == [], [str(v) for v in violations]


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
            f"/v1/employees/{emp}",
            json={"name": emp, "email": f"{emp}@example.com", "department": dept},
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
        return await self.c.post(
            "/v1/debits", json={"account": account, "amount": amount, **extra}, headers=key()
        )

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
