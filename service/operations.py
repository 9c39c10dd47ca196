"""The operations routes: liveness, readiness and Prometheus metrics.

They need no token, so what they ask the database is asked at most once a
second however often they are called (RecentValues).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import MediaType, Response, get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import migrate
from service.auth import public
from service.journal import Database
from service.observability import Metrics
from service.webhooks import SecretBox

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


def operation_routes(metrics: Metrics, webhook_box: SecretBox | None) -> list[HTTPRouteHandler]:
    """/healthz, /readyz and /metrics, reporting into `metrics`; the webhook
    gauges only when webhooks are on (`webhook_box`)."""
    public_queries = RecentValues(PUBLIC_QUERY_SECONDS)

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
        ledger: Database = state.ledger
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
        ledger: Database = state.ledger
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

    return [healthz, readyz, metrics_endpoint]
