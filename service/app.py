"""create_app(config): the service assembled on one screen.

Routes, lifespan (pool, background tasks), dependencies, middleware and the
error mapping are listed here; what they do lives in their own modules:
service/middleware.py (request id, log line, metrics; the authorize-and-
decode hook), service/bodies.py (strict body and query decoding),
service/problems.py (every error as problem+json) and service/operations.py
(/healthz, /readyz, /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import asyncpg
import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme, Server

from service import __version__, db, migrate
from service.api.accounts import AccountsController
from service.api.approvals import ApprovalsController
from service.api.common import provide_ledger
from service.api.directory import DirectoryController
from service.api.finance import FinanceReportsController
from service.api.funding import FundingController
from service.api.grants import GrantsController
from service.api.imports import ImportsController
from service.api.policy import PolicyController
from service.api.prices import PricesController
from service.api.programs import ProgramsController
from service.api.reports import ReportsController
from service.api.reservations import ReservationsController
from service.api.transactions import TransactionsController
from service.api.usage import UsageController
from service.api.wallet import WalletController
from service.api.webhooks import WebhooksController
from service.auth import (
    PUBLIC,
    JwtVerifier,
    KeyCache,
    KeyListener,
    check_strong,
    new_key,
    parse_key,
)
from service.background import Background
from service.config import Config
from service.journal import Clock, Database, database_clock
from service.middleware import before_request, request_middleware
from service.observability import Metrics
from service.openapi import ContractJson, openapi_description
from service.operations import operation_routes
from service.pages import LocalSwagger, cors_config, page_routes, security_headers
from service.problems import EXCEPTION_HANDLERS
from service.ratelimit import FailureLimiter, RateLimiter, parse_limits
from service.reports import sync_report_tags
from service.webhooks import Dispatcher, SecretBox

log = structlog.get_logger("tokenledger")

OPENAPI_PATH = "/schema"


def create_app(
    config: Config,
    *,
    clock: Clock = database_clock,
    pool: asyncpg.Pool | None = None,
) -> Litestar:
    """Build the service. `pool` lets tests share one; otherwise the lifespan
    opens a pool on config.database_url and closes it at shutdown."""
    metrics = Metrics()
    jwt_verifier = JwtVerifier.from_config(config)
    if config.environment == "production" and jwt_verifier is None:
        raise RuntimeError(
            "refusing to start in production without employee-token verification: set "
            "TOKENLEDGER_JWT_ISSUER, TOKENLEDGER_JWT_AUDIENCE and a key "
            "(TOKENLEDGER_JWT_JWKS_FILE, _PUBLIC_KEY_FILE or _HS256_SECRET), or "
            "TOKENLEDGER_ENVIRONMENT=development"
        )
    rate_limiter = RateLimiter(parse_limits(config.rate_limits), config.rate_limit_burst_seconds)
    if config.bootstrap_admin_key:
        check_strong(config.bootstrap_admin_key, "TOKENLEDGER_BOOTSTRAP_ADMIN_KEY")
    # The cache is only as fresh as the NOTIFY that clears it: without a
    # session to LISTEN on (behind pgbouncer, no direct URL) it stays off.
    listen_url = config.session_url()
    key_cache = KeyCache(config.key_cache_ttl_seconds if listen_url else 0.0)
    auth_failures = FailureLimiter(config.auth_failures_per_second, config.auth_failure_burst)
    # None without TOKENLEDGER_WEBHOOK_SECRET_KEY: no webhooks can be made or sent.
    webhook_box = SecretBox.from_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        own_pool = pool is None
        the_pool = pool
        if the_pool is None:
            if not config.database_url:
                raise RuntimeError("database_url is not set")
            if config.apply_schema:
                conn = await db.connect(
                    config.database_direct_url or config.database_url,
                    connect_timeout_seconds=config.connect_timeout_seconds,
                    statement_cache_size=(
                        100 if config.database_direct_url else config.statement_cache_size()
                    ),
                )
                try:
                    report = await migrate.migrate(conn)
                finally:
                    await conn.close()
                if report.applied:
                    log.info("schema_migrated", applied=report.applied, version=report.version)
            the_pool = await db.create_pool(
                config.database_url,
                min_size=config.pool_min_size,
                max_size=config.pool_max_size,
                statement_timeout_ms=config.statement_timeout_ms,
                lock_timeout_ms=config.lock_timeout_ms,
                idle_in_transaction_timeout_ms=config.idle_in_transaction_timeout_ms,
                connect_timeout_seconds=config.connect_timeout_seconds,
                role=config.db_role,
                pgbouncer=config.db_pooler == "pgbouncer",
            )
            if config.db_pooler == "pgbouncer":
                await db.check_pooled_timeouts(the_pool)
        ledger = Database(the_pool, config, metrics, clock)
        app.state.ledger = ledger
        # TOKENLEDGER_REPORT_TAGS into report_tag_keys; a change rebuilds the
        # tag roll-ups (README, Reports, "Tag roll-ups").
        if await sync_report_tags(ledger):
            log.info("report_tags_rebuilt", report_tags=list(config.report_tag_names()))
        key_listener = None
        if config.database_url and listen_url:
            key_listener = KeyListener(
                listen_url,
                key_cache,
                connect_timeout_seconds=config.connect_timeout_seconds,
                role=config.db_role,
            )
            key_listener.start()
            await key_listener.wait_connected(config.connect_timeout_seconds)
        if config.bootstrap_admin_key:
            await ensure_admin_key(ledger, config.bootstrap_admin_key)
        background = Background(ledger)
        if config.background_enabled:
            background.start()
        dispatcher = None
        if webhook_box is not None and config.webhook_dispatcher_enabled:
            dispatcher = Dispatcher(ledger, webhook_box)
            dispatcher.start()
        app.state.webhook_dispatcher = dispatcher
        # What start-up built (modules, routes, the pool) lives as long as the
        # process: out of the collector's sight, so that the collections the
        # requests' garbage triggers do not walk it again each time.
        gc.freeze()
        try:
            yield
        finally:
            if dispatcher is not None:
                await dispatcher.stop()
            await background.stop()
            if key_listener is not None:
                await key_listener.stop()
            if own_pool:
                # Bounded: a connection never given back must not keep the
                # process from exiting; terminate() drops what is left.
                try:
                    await asyncio.wait_for(the_pool.close(), config.shutdown_grace_seconds)
                except TimeoutError:
                    log.warning("pool_close_timed_out")
                    the_pool.terminate()

    controllers = [
        DirectoryController,
        AccountsController,
        GrantsController,
        ProgramsController,
        TransactionsController,
        ReservationsController,
        PricesController,
        UsageController,
        ReportsController,
        PolicyController,
        WebhooksController,
        WalletController,
        ApprovalsController,
        ImportsController,
        FinanceReportsController,
        FundingController,
    ]
    app = Litestar(
        route_handlers=[
            *operation_routes(metrics, webhook_box),
            *controllers,
            *page_routes(config),
        ],
        dependencies={"ledger": Provide(provide_ledger)},
        state=State(
            {
                "jwt_verifier": jwt_verifier,
                "rate_limiter": rate_limiter,
                "key_cache": key_cache,
                "auth_failures": auth_failures,
                "webhook_box": webhook_box,
                "pages_token_header": config.pages_token_header,
            }
        ),
        lifespan=[lifespan],
        before_request=before_request,
        middleware=[lambda app: request_middleware(app, metrics), security_headers],
        cors_config=cors_config(config),
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="tokenledger",
            version=__version__,
            description=openapi_description(),
            path=OPENAPI_PATH,
            # Both serve service.openapi.served(): Litestar's document with
            # what it cannot know added (service/openapi.py).
            # Swagger UI from the service's own static files (service/pages.py),
            # never from a CDN.
            render_plugins=[ContractJson(), LocalSwagger()],
            servers=[Server(url="/")],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="A service key (tlk_...) or an employee JWT.",
                    ),
                },
            ),
            security=[{"bearer": []}],
        ),
        debug=False,
    )
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            # Litestar answers OPTIONS itself; the schema docs are Litestar's
            # routes and public; every other handler is ours and says who may
            # call it (the guard refuses one that does not).
            if handler.http_methods == {"OPTIONS"}:
                continue
            if "access" not in handler.opt and route.path.startswith(OPENAPI_PATH):
                handler.opt["access"] = PUBLIC
            assert "access" in handler.opt, f"{route.path} declares no access rule"
    return app


async def ensure_admin_key(ledger: Database, secret: str) -> None:
    """Make a configured bootstrap key usable (idempotent across restarts)."""
    parsed = parse_key(secret)
    if parsed is None:
        raise RuntimeError("TOKENLEDGER_BOOTSTRAP_ADMIN_KEY must be a tlk_ service key")
    prefix, digest = parsed
    await ledger.fetchval(
        "ensure_key", new_key().id, prefix, digest, "bootstrap-admin", "admin", "bootstrap"
    )
