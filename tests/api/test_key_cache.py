"""Service keys are cached per replica, and a revocation still reaches every
replica within a second (issue 10): by NOTIFY at once, by the TTL when the
notification channel is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from service import db
from service.app import create_app
from service.auth import KEYS_CHANNEL, KeyCache, Principal, new_key
from service.config import Config
from tests.api.conftest import running

REVOCATION_BOUND_SECONDS = 1.0


async def create_key(database_url: str, role: str = "meter") -> str:
    k = new_key()
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            db.load_queries()["create_key"], k.id, k.prefix, k.secret_hash, "cache", role, "t"
        )
    finally:
        await conn.close()
    return k.secret


async def heard_key(database_url: str, replicas: list[Replica], role: str = "meter") -> str:
    """A new key (create_key), once every replica has heard of it. A new key
    notifies every replica to drop its cache (an unknown key may be this one).
    The notification reaches each replica's listener in its own time: one that
    arrived after a first request had cached the key dropped that entry too, and
    the next request looked the key up again. That is the likely cause of one CI
    failure on a loaded machine (`assert a.lookups == 1` saw 2); a second request
    more than the 1 s TTL after the first would do the same, and is not ruled out."""
    before = [replica.clears for replica in replicas]
    secret = await create_key(database_url, role)
    await until(lambda: all(r.clears > b for r, b in zip(replicas, before, strict=True)), 5.0)
    assert all(r.clears > b for r, b in zip(replicas, before, strict=True)), "no replica heard"
    return secret


async def revoke(database_url: str, secret: str) -> None:
    conn = await db.connect(database_url)
    try:
        await conn.fetchrow(db.load_queries()["revoke_key"], secret.split("_")[1])
    finally:
        await conn.close()


async def until(condition: Callable[[], bool], within_seconds: float) -> None:
    """Wait until `condition` holds (something another connection does), at most this long."""
    deadline = time.monotonic() + within_seconds
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110  # why: polls state set by a callback
        await asyncio.sleep(0.01)


class Replica:
    """One app with its own pool, key cache and listener: a replica."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app = app
        self.c = client
        self.lookups = 0
        # Each time the replica drops its key cache (a notification heard).
        self.clears = 0
        cache = app.state.key_cache
        clear = cache.clear

        def counting_clear() -> None:
            self.clears += 1
            clear()

        cache.clear = counting_clear
        ledger = app.state.ledger
        fetchrow = ledger.fetchrow

        async def counting(query: str, *args: Any) -> Any:
            if query == "authenticate_key":
                self.lookups += 1
            return await fetchrow(query, *args)

        ledger.fetchrow = counting

    async def status(self, secret: str) -> int:
        r = await self.c.get(
            "/v1/accounts/system:usage", headers={"Authorization": f"Bearer {secret}"}
        )
        return r.status_code


@pytest.fixture
async def replicas(config: Config) -> AsyncIterator[list[Replica]]:
    """Two replicas of the service on one database, with the default key cache."""
    config = msgspec.structs.replace(config, key_cache_ttl_seconds=1.0)
    async with running(app_a := create_app(config)), running(app_b := create_app(config)):
        out = []
        for app in (app_a, app_b):
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://replica.local", timeout=30
            )
            out.append(Replica(app, client))
        try:
            yield out
        finally:
            for replica in out:
                await replica.c.aclose()


async def test_a_cached_key_costs_no_database_lookup(
    replicas: list[Replica], database_url: str
) -> None:
    """The second request with a key is authenticated from the replica's cache."""
    a = replicas[0]
    secret = await heard_key(database_url, replicas)
    assert await a.status(secret) == 200
    assert await a.status(secret) == 200
    assert a.lookups == 1


async def test_revocation_reaches_a_second_replica_within_a_second(
    replicas: list[Replica], database_url: str
) -> None:
    """A key revoked while both replicas have it cached answers 401 on both within 1 s."""
    secret = await heard_key(database_url, replicas)
    for replica in replicas:
        assert await replica.status(secret) == 200
        assert await replica.status(secret) == 200  # now from the cache
    started = time.monotonic()
    await revoke(database_url, secret)
    pending = list(replicas)
    while pending and time.monotonic() - started < 5:
        pending = [r for r in pending if await r.status(secret) != 401]
        if pending:
            await asyncio.sleep(0.01)
    took = time.monotonic() - started
    assert not pending, "a replica still accepted a revoked key after 5 s"
    assert took < REVOCATION_BOUND_SECONDS, f"revocation took {took:.3f} s"


async def test_revocation_without_notifications_is_bounded_by_the_ttl(
    replicas: list[Replica], database_url: str
) -> None:
    """With its listener's connection killed, a replica stops caching, so a
    key revoked meanwhile fails within the bound too."""
    a = replicas[0]
    secret = await heard_key(database_url, replicas)
    assert await a.status(secret) == 200
    assert await a.status(secret) == 200
    assert a.lookups == 1
    conn = await asyncpg.connect(database_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'tokenledger-keys'"
        )
    finally:
        await conn.close()
    assert killed == 2
    cache: KeyCache = a.app.state.key_cache
    await until(lambda: not cache.enabled, REVOCATION_BOUND_SECONDS)
    assert not cache.enabled, "the cache stayed on with its listener gone"
    await revoke(database_url, secret)
    assert await a.status(secret) == 401


async def test_a_wrong_secret_for_a_cached_prefix_is_401(
    replicas: list[Replica], database_url: str
) -> None:
    """The cache is keyed by the whole secret's hash, not by its prefix."""
    a = replicas[0]
    secret = await heard_key(database_url, replicas)
    assert await a.status(secret) == 200
    assert await a.status(secret[:-3] + "abc") == 401


def test_cache_entries_expire_after_the_ttl() -> None:
    """An entry is trusted for ttl seconds from the moment its look-up was sent."""
    now = [100.0]
    cache = KeyCache(1.0, clock=lambda: now[0])
    cache.set_enabled(True)
    principal = Principal(id="key:x", roles=frozenset({"meter"}))
    cache.put(b"d", principal, since=99.5)
    assert cache.get(b"d") == principal
    now[0] = 100.49
    assert cache.get(b"d") == principal
    now[0] = 100.5
    assert cache.get(b"d") is None


def test_a_disabled_cache_remembers_nothing() -> None:
    """Off (no listener, or ttl 0), the cache neither keeps nor answers."""
    principal = Principal(id="key:x", roles=frozenset({"meter"}))
    off = KeyCache(1.0)
    off.put(b"d", principal, since=off.clock())
    assert off.get(b"d") is None
    zero = KeyCache(0.0)
    zero.set_enabled(True)
    assert not zero.enabled
    zero.put(b"d", principal, since=zero.clock())
    assert zero.get(b"d") is None


async def test_key_changes_notify_and_use_does_not(
    db: asyncpg.Connection, database_url: str
) -> None:
    """The api_keys_changed trigger notifies on a new key, revocation, a new
    secret, role or deletion, and not when only last_used_at moves."""
    heard: list[str] = []
    await db.add_listener(KEYS_CHANNEL, lambda *args: heard.append(args[3]))
    k = new_key()
    other = await asyncpg.connect(database_url)
    try:
        await other.execute(
            "INSERT INTO api_keys (id, prefix, secret_hash, name, role)"
            " VALUES ($1, $2, $3, 'n', 'meter')",
            k.id,
            k.prefix,
            k.secret_hash,
        )
        await until(lambda: len(heard) >= 1, 5.0)
        assert len(heard) == 1  # the new key
        await other.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", k.id)
        await asyncio.sleep(0.2)
        assert len(heard) == 1
        await other.execute("UPDATE api_keys SET role = 'finance' WHERE id = $1", k.id)
        await other.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", k.id)
        await other.execute("DELETE FROM api_keys WHERE id = $1", k.id)
        await until(lambda: len(heard) >= 4, 5.0)
        assert len(heard) == 4
    finally:
        await other.close()


async def test_malformed_keys_cost_no_database_lookup(replicas: list[Replica]) -> None:
    """A token shaped like a key but not like one this service makes (prefix not
    8 hex digits, secret too short or with other characters) is 401 without
    asking the database."""
    a = replicas[0]
    for token in (
        "tlk_00000000_x",
        "tlk_ZZZZZZZZ_" + "a" * 43,
        "tlk_0123abcd_" + "a" * 20,
        "tlk_0123abcd_" + "a" * 40 + "!!!",
    ):
        assert await a.status(token) == 401, token
    assert a.lookups == 0


async def test_an_unknown_key_is_looked_up_once_until_keys_change(
    replicas: list[Replica], database_url: str
) -> None:
    """A well-formed key the database does not know is remembered as unknown
    (a flood of it costs one look-up), until a key is created: then it is
    asked for again, and works if it is the new one."""
    from service.auth import new_key

    a = replicas[0]
    k = new_key()
    for _ in range(5):
        assert await a.status(k.secret) == 401
    assert a.lookups == 1
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            db.load_queries()["create_key"], k.id, k.prefix, k.secret_hash, "late", "meter", "t"
        )
    finally:
        await conn.close()
    await until(lambda: not a.app.state.key_cache.knows_unknown(k.secret_hash), 1.0)
    assert await a.status(k.secret) == 200


async def test_concurrent_misses_of_one_key_share_one_lookup(
    replicas: list[Replica], database_url: str
) -> None:
    """When a key is not in the cache (first use, or its entry expired), the requests that
    arrive while its look-up is on its way wait for that look-up instead of each sending one."""
    a = replicas[0]
    secret = await heard_key(database_url, replicas)
    statuses = await asyncio.gather(*(a.status(secret) for _ in range(20)))
    assert statuses == [200] * 20
    assert a.lookups == 1


async def test_a_failed_shared_lookup_makes_the_waiters_ask_on_their_own(
    replicas: list[Replica], database_url: str
) -> None:
    """The look-up the others wait for fails (the database answered an error to it alone):
    its request fails, and each waiting request looks the key up itself."""
    a = replicas[0]
    secret = await heard_key(database_url, replicas)
    ledger = a.app.state.ledger
    counting = ledger.fetchrow
    first = asyncio.Event()

    async def failing_once(query: str, *args: Any) -> Any:
        if query == "authenticate_key" and not first.is_set():
            first.set()
            await asyncio.sleep(0.05)  # the others arrive meanwhile
            raise asyncpg.exceptions.ConnectionDoesNotExistError("gone")
        return await counting(query, *args)

    ledger.fetchrow = failing_once
    statuses = await asyncio.gather(*(a.status(secret) for _ in range(5)))
    assert sorted(statuses) == [200, 200, 200, 200, 503]
