"""create_app(config): routes, lifespan, dependencies and error mapping on one screen."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, get_args

import asyncpg
import msgspec
import structlog
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme, Server
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__, db, errors, migrate
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
    authorize,
    check_strong,
    new_key,
    parse_key,
    public,
)
from service.background import Background
from service.config import Config
from service.journal import Clock, Ledger, database_clock
from service.observability import (
    REQUEST_ID_HEADER,
    Metrics,
    Stopwatch,
    new_request_id,
    status_class,
)
from service.openapi import ContractJson, openapi_description
from service.pages import LocalSwagger, cors_config, page_routes, security_headers
from service.ratelimit import FailureLimiter, RateLimiter, parse_limits
from service.webhooks import Dispatcher, SecretBox

log = structlog.get_logger("tokenledger")

PROBLEM_JSON = "application/problem+json"
OPENAPI_PATH = "/schema"
_REQUEST_ID_OK = re.compile(r"^[\x21-\x7e]{1,128}$")
_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)


def problem_response(exc: errors.LedgerError, request: Request[Any, Any, Any]) -> Response[Any]:
    request.state.outcome = exc.code
    headers = dict(exc.headers)
    if "request_id" not in request.scope.get("state", {}):
        # Router-level 404/405 never reach the request middleware (it runs
        # per route), so they get their request id here.
        incoming = request.headers.get(REQUEST_ID_HEADER)
        ok = incoming is not None and _REQUEST_ID_OK.match(incoming)
        headers[REQUEST_ID_HEADER] = incoming if ok and incoming else new_request_id()
    return Response(
        exc.problem(instance=request.url.path),
        status_code=exc.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def handle_ledger_error(request: Request[Any, Any, Any], exc: errors.LedgerError) -> Response[Any]:
    return problem_response(exc, request)


def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    details = []
    for item in exc.extra or []:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key", ""))
        source = item.get("source")
        if source == "body":
            path = "$" if key in ("", "data") else "$." + key
        else:
            path = key
        details.append({"path": path, "message": item.get("message", "")})
    first = details[0] if details else {"path": "$", "message": exc.detail}
    err = errors.InvalidRequest(f"{first['path']}: {first['message']}", errors=details or [first])
    return problem_response(err, request)


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    err: errors.LedgerError
    if isinstance(exc, NotFoundException):
        err = errors.NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = errors.MethodNotAllowed()
        # RFC 9110: a 405 names the methods the route takes.
        allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        if allow:
            err.headers["Allow"] = allow
    elif exc.status_code == 413:
        err = errors.PayloadTooLarge()
    elif exc.status_code == 403:
        # The development sign-in's CSRF check (service/pages.py).
        err = errors.Forbidden(str(exc.detail))
    elif exc.status_code == 400:
        err = errors.InvalidRequest(
            str(exc.detail), errors=[{"path": "$", "message": str(exc.detail)}]
        )
    else:
        request.state.outcome = "http_error"
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "code": "http_error",
        }
        return Response(body, status_code=exc.status_code, media_type=PROBLEM_JSON)
    return problem_response(err, request)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    translated = errors.translate(exc)
    if translated is not None:
        return problem_response(translated, request)
    # A bug or a broken invariant: 500, with the traceback in the log.
    log.error("unhandled_error", path=request.url.path, exc_info=exc)
    request.state.outcome = "internal"
    body = {
        "type": "https://tokenledger.internal/problems/internal",
        "title": "Internal error",
        "status": 500,
        "detail": "An unexpected error occurred; it has been logged.",
        "code": "internal",
    }
    return Response(body, status_code=500, media_type=PROBLEM_JSON)


def integral(value: Any) -> Any:
    """`value` with every number that has no fractional part (5.0) made an
    int: JSON Schema counts 5.0 as an integer, so the served schema's
    `integer` admits it, and so does the service. 1.5 and "5" are still no
    amount."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [integral(item) for item in value]
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    return value


def in_utc(value: Any, path: str = "$") -> Any:
    """`value` (from msgspec.to_builtins) with its datetimes as RFC 3339 UTC
    text; text with a NUL character is refused (PostgreSQL cannot store it,
    and the schema's strings exclude it)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise errors.InvalidRequest(
                f"{path}: text may not contain the NUL character",
                errors=[{"path": path, "message": "text may not contain the NUL character"}],
            )
        return value
    if isinstance(value, datetime):
        try:
            return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        except OverflowError:
            message = "the timestamp is out of range"
            raise errors.InvalidRequest(
                message, errors=[{"path": path, "message": message}]
            ) from None
    if isinstance(value, list):
        return [in_utc(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {in_utc(key, path): in_utc(item, f"{path}.{key!s}") for key, item in value.items()}
    return value


_HAS_DATETIME: dict[Any, bool] = {}


def has_datetime(annotation: Any) -> bool:
    """Whether a body type holds a timestamp anywhere (cached per type)."""
    known = _HAS_DATETIME.get(annotation)
    if known is None:
        known = _HAS_DATETIME[annotation] = _holds_datetime(
            msgspec.inspect.type_info(annotation), set()
        )
    return known


def _holds_datetime(info: Any, seen: set[int]) -> bool:
    if id(info) in seen:
        return False
    seen.add(id(info))
    if isinstance(info, msgspec.inspect.DateTimeType):
        return True
    if isinstance(info, msgspec.inspect.StructType | msgspec.inspect.TypedDictType):
        return any(_holds_datetime(f.type, seen) for f in info.fields)
    # Annotated types are Metadata wrappers (.type), optional ones unions.
    for attr in ("type", "types", "item_type", "key_type", "value_type"):
        inner = getattr(info, attr, None)
        if isinstance(inner, tuple) and any(_holds_datetime(t, seen) for t in inner):
            return True
        if inner is not None and not isinstance(inner, tuple) and _holds_datetime(inner, seen):
            return True
    return False


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """Decode the JSON body strictly against the handler's `data` type before
    Litestar's lenient conversion runs: "5" or 1.5 is not an amount (5.0 is 5,
    as JSON Schema counts it an integer).

    Also enforces the body size limit and gives precise JSON paths
    (`$.grants[3].amount`) in the 400.
    """
    handler = request.route_handler
    field = handler.parsed_fn_signature.parameters.get("data")
    if field is None:
        return
    body = await request.body()
    if not body.strip():
        return
    try:
        # Parsed once: Litestar keeps this for the handler's `data`, and the
        # strict check converts the parsed value without parsing it again.
        parsed = await request.json()
    except SerializationException as exc:
        raise errors.InvalidRequest(
            f"the body is not valid JSON: {exc}", errors=[{"path": "$", "message": str(exc)}]
        ) from None
    except RecursionError:
        message = "the body is nested too deeply"
        raise errors.InvalidRequest(message, errors=[{"path": "$", "message": message}]) from None
    try:
        # The hot path's bodies (integers, no timestamps, no NUL) pass as they
        # are; only a body that needs it is normalised, since walking every
        # body in Python cost the service a fifth more CPU per debit.
        normalise = has_datetime(field.annotation) or b"\\u0000" in body
        try:
            value = msgspec.convert(parsed, field.annotation, strict=True)
        except msgspec.ValidationError:
            value = msgspec.convert(integral(parsed), field.annotation, strict=True)
            normalise = True
        if normalise:
            # What the handler decodes: the same body with 5.0 as 5 and every
            # timestamp in UTC (PostgreSQL takes offsets up to 15:59 only; RFC
            # 3339 allows 23:59). Litestar decodes the handler's `data` from
            # this cache.
            normal = in_utc(msgspec.to_builtins(value, builtin_types=(datetime,)))
            request._json = request._connection_state.json = normal
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_PATH.match(str(exc))
        message = match.group("message") if match else str(exc)
        path = (match.group("path") if match else None) or "$"
        raise errors.InvalidRequest(
            f"{path}: {message}", errors=[{"path": path, "message": message}]
        ) from None


# RFC 3339 date-time with an offset, as the schema's `format: date-time` says;
# Litestar alone would also take a number of seconds since the epoch.
_DATE_TIME = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def datetime_queries(handler: Any) -> list[str]:
    """The query parameters a handler takes as datetimes, by their names in the URL."""
    names = []
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if type(kwarg).__name__ != "QueryParameter" and not (
            kwarg is None and name not in ("request", "scope", "state", "data")
        ):
            continue
        if field.annotation is datetime or datetime in get_args(field.annotation):
            names.append(getattr(kwarg, "name", None) or getattr(kwarg, "query", None) or name)
    return names


def strict_query(request: Request[Any, Any, Any]) -> None:
    """A datetime in the query is RFC 3339 with an offset, nothing else."""
    handler = request.route_handler
    names = handler.opt.get("_datetime_queries")
    if names is None:
        names = handler.opt["_datetime_queries"] = datetime_queries(handler)
    for name in names:
        for value in request.query_params.getall(name, []):
            if not _DATE_TIME.match(value):
                message = "must be an RFC 3339 date-time with an offset"
                raise errors.InvalidRequest(
                    f"{name} {message}", errors=[{"path": name, "message": message}]
                )


async def before_request(request: Request[Any, Any, Any]) -> None:
    """Authentication and authorization, then the strict body check, for
    every route. A hook rather than a Litestar guard: Litestar copies the
    route handler for each guard call, which cost about a twentieth of the
    service's CPU per request, and a hook sees the same handler."""
    await authorize(request, request.route_handler)
    strict_query(request)
    await strict_body(request)


def request_middleware(app: ASGIApp, metrics: Metrics) -> ASGIApp:
    """Request id, the canonical log line and the latency histogram."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        watch = Stopwatch()
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _REQUEST_ID_OK.match(incoming) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            seconds = watch.seconds()
            route = scope.get("path_template") or "unmatched"
            status = status_holder["status"]
            metrics.request_latency.labels(method, route, status_class(status)).observe(seconds)
            if status == 409:
                metrics.refusals.labels(str(state.get("outcome", "unknown"))).inc()
            if status == 503:
                metrics.unavailable_responses.labels(method, route).inc()
            principal = state.get("principal")
            log.info(
                "request",
                request_id=request_id,
                method=method,
                route=route,
                status=status,
                latency_seconds=round(seconds, 6),
                outcome=state.get("outcome", "ok" if status < 400 else "error"),
                principal=getattr(principal, "id", None),
            )

    return middleware


# /readyz and /metrics need no token: the database answers each of their
# queries at most once in this long, however often they are asked.
PUBLIC_QUERY_SECONDS = 1.0


class RecentValues:
    """The values of a few queries, each asked again only once it is older
    than `seconds` (concurrent askers share one query)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._values: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def value(self, name: str, fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        cached = self._values.get(name)
        if cached is not None and now - cached[0] < self.seconds:
            return cached[1]
        pending = self._pending.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[name] = future
        try:
            value = await fetch()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters, if any, get it; none is fine too
            raise
        finally:
            del self._pending[name]
        self._values[name] = (time.monotonic(), value)
        future.set_result(value)
        return value


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
    public_queries = RecentValues(PUBLIC_QUERY_SECONDS)
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
        ledger = Ledger(the_pool, config, metrics, clock)
        app.state.ledger = ledger
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
        if config.sweeper_enabled:
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

    @get("/healthz", include_in_schema=True, tags=["Operations"], summary="Liveness", opt=public())
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/readyz",
        tags=["Operations"],
        summary="Readiness: database reachable, schema current",
        opt=public(),
        responses={
            503: ResponseSpec(
                data_container=dict[str, Any],
                description="Not ready: the database is unreachable or its schema is behind.",
                generate_examples=False,
            )
        },
    )
    async def readyz(state: State) -> Response[dict[str, Any]]:
        ledger: Ledger = state.ledger
        try:
            schema = await public_queries.value(
                "schema_state",
                lambda: asyncio.wait_for(
                    ledger.fetchrow("schema_state", migrate.schema_checksum()), timeout=2.0
                ),
            )
        except Exception as exc:  # noqa: BLE001  # why: any failure means "not ready", reported, not raised
            return Response(
                {"status": "unavailable", "reason": type(exc).__name__}, status_code=503
            )
        version = schema["version"]
        required = migrate.latest_version()
        # Behind is not ready; ahead is (the next release has migrated while
        # this one still serves: migrations add, so it keeps working).
        if version is None or int(version) < required or not schema["schema_applied"]:
            return Response(
                {
                    "status": "unavailable",
                    "reason": "schema behind",
                    "schema_version": version,
                    "required": required,
                },
                status_code=503,
            )
        return Response({"status": "ok", "schema_version": int(version)}, status_code=200)

    @get(
        "/metrics",
        tags=["Operations"],
        summary="Prometheus metrics",
        media_type=MediaType.TEXT,
        opt=public(),
    )
    async def metrics_endpoint(state: State) -> Response[bytes]:
        ledger: Ledger = state.ledger
        metrics.pool_size.set(ledger.pool.get_size())
        metrics.pool_in_use.set(ledger.pool.get_size() - ledger.pool.get_idle_size())
        metrics.pool_max.set(ledger.pool.get_max_size())
        active = await public_queries.value(
            "active_reservations", lambda: ledger.fetchval("active_reservations")
        )
        metrics.active_reservations.set(int(active))
        gauges = await public_queries.value(
            "ledger_gauges", lambda: ledger.fetchrow("ledger_gauges")
        )
        metrics.record_ledger_gauges(gauges)
        if webhook_box is not None:
            stats = await public_queries.value(
                "webhook_stats", lambda: ledger.fetchrow("webhook_stats")
            )
            metrics.outbox_lag.set(float(stats["lag_seconds"]))
            metrics.webhook_pending.set(int(stats["pending"]))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
            healthz,
            readyz,
            metrics_endpoint,
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
        exception_handlers={
            errors.LedgerError: handle_ledger_error,
            ValidationException: handle_validation,
            HTTPException: handle_http,
            Exception: handle_unexpected,
        },
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


async def ensure_admin_key(ledger: Ledger, secret: str) -> None:
    """Make a configured bootstrap key usable (idempotent across restarts)."""
    parsed = parse_key(secret)
    if parsed is None:
        raise RuntimeError("TOKENLEDGER_BOOTSTRAP_ADMIN_KEY must be a tlk_ service key")
    prefix, digest = parsed
    await ledger.fetchval(
        "ensure_key", new_key().id, prefix, digest, "bootstrap-admin", "admin", "bootstrap"
    )
