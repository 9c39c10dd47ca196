"""The API through pgbouncer in transaction pooling mode (README, "Behind pgbouncer").

Every test imported below runs again here, with the app's pool connected
through pgbouncer (4 server connections for a pool of 30 clients, so any
statement may run on another server connection than the one before it), the
key listener and the start-up migration on a direct connection, and the
timeouts carried by the role as an operator sets them. Session-level
advisory locks, LISTEN or prepared statements kept between statements would
fail here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest

from service.app import create_app
from service.config import Config
from tests.api.conftest import Api, running
from tests.api.test_coalescing import (  # noqa: F401  # why: re-run through pgbouncer
    test_batch_mixes_outcomes_without_failing_the_others,
    test_hot_wallet_in_one_batch_applies_in_arrival_order,
)
from tests.api.test_concurrency import (  # noqa: F401  # why: re-run through pgbouncer
    burst,
    test_concurrent_debits_never_overspend,
    test_mixed_concurrent_traffic_keeps_invariants,
    test_one_idempotency_key_one_effect_debit,
)
from tests.api.test_http import (  # noqa: F401  # why: re-run through pgbouncer
    test_health_and_readiness,
)
from tests.api.test_idempotency import (  # noqa: F401  # why: re-run through pgbouncer
    test_concurrent_requests_with_one_key,
    test_replay_debit,
    test_same_key_different_body,
)
from tests.api.test_reservations import (  # noqa: F401  # why: re-run through pgbouncer
    test_capture_replay_returns_the_stored_response,
    test_partial_capture_releases_the_rest,
)
from tests.api.test_smoke import test_walkthrough  # noqa: F401  # why: re-run through pgbouncer
from tests.api.test_usage import (  # noqa: F401  # why: re-run through pgbouncer
    test_concurrent_duplicates_are_charged_once,
    test_golden_charges,
)
from tests.pg import Server, run_sync
from tests.pgbouncer import Bouncer, running_pgbouncer

# What an operator sets on the role the service connects as behind pgbouncer
# (the pool cannot send them as startup parameters), per database here so
# that other tests on the same server keep theirs.
ROLE_SETTINGS = {
    "statement_timeout": "15s",
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "10s",
    "client_connection_check_interval": "1s",
}


@pytest.fixture(scope="session")
def pgbouncer(pg_server: Server) -> Iterator[Bouncer]:
    """One pgbouncer per test session (per xdist worker) in front of its server."""
    with running_pgbouncer(pg_server.dsn) as bouncer:
        yield bouncer


async def _set_role_defaults(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        for name, value in ROLE_SETTINGS.items():
            await conn.execute(
                f"ALTER ROLE CURRENT_USER IN DATABASE \"{database}\" SET {name} = '{value}'"
            )
    finally:
        await conn.close()


@pytest.fixture
def config(config: Config, pgbouncer: Bouncer, database_url: str) -> Config:
    """The API tests' config, its pool through pgbouncer."""
    run_sync(_set_role_defaults(database_url))
    return msgspec.structs.replace(
        config,
        database_url=pgbouncer.url_for(database_url),
        database_direct_url=database_url,
        db_pooler="pgbouncer",
        # The key cache on, as in production: its LISTEN runs on the direct URL.
        key_cache_ttl_seconds=1.0,
    )


async def test_pool_statements_really_go_through_pgbouncer(
    config: Config, db: asyncpg.Connection, api: Api
) -> None:
    """The tests above do reach PostgreSQL through pgbouncer: the service's backends are
    pgbouncer's few server connections (at most its pool size), not one per pool client."""
    await api.department("eng")
    await api.employee("e-1")
    backends = await db.fetch(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = "
        "'client backend'"
    )
    pooled = [b for b in backends if b["application_name"] != "tokenledger-keys"]
    assert 1 <= len(pooled) <= 4, backends


async def test_unlimited_role_timeouts_refuse_to_start(config: Config, database_url: str) -> None:
    """Behind pgbouncer the pool cannot set statement_timeout: a role without one (0, unlimited)
    makes start-up fail with the ALTER ROLE to run, instead of serving without a bound."""
    conn = await asyncpg.connect(database_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f'ALTER ROLE CURRENT_USER IN DATABASE "{database}" RESET statement_timeout'
        )
    finally:
        await conn.close()
    app: Any = create_app(config)
    # Litestar's lifespan runs in an anyio task group: the error arrives in an ExceptionGroup.
    with pytest.raises(BaseException) as info:  # noqa: B017  # why: checked just below
        async with running(app):
            pass
    assert "must carry statement_timeout" in repr(info.value), repr(info.value)


def test_a_role_cannot_be_set_through_pgbouncer() -> None:
    """TOKENLEDGER_DB_ROLE needs a startup parameter pgbouncer does not pass: refused."""
    with pytest.raises(ValueError, match="DB_ROLE"):
        Config(db_pooler="pgbouncer", db_role="tokenledger_app")
