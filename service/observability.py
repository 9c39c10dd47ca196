"""Logs and metrics.

One canonical JSON log line per request (STYLE.md habit 11) and Prometheus
metrics with bounded label sets: route templates, never account ids.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_ID_HEADER = "x-request-id"


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """JSON lines when not on a terminal, readable console output on one."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def new_request_id() -> str:
    # 128 random bits, as uuid4().hex gave, for a fraction of its cost.
    return "req_" + secrets.token_hex(16)


_REQUEST_ID_OK = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id_for(incoming: str | None) -> str:
    """The request id a request is logged and answered with: the caller's
    X-Request-Id when it is 1 to 128 printable ASCII characters (no spaces),
    else a new one."""
    return incoming if incoming and _REQUEST_ID_OK.match(incoming) else new_request_id()


class Metrics:
    """The service's metrics, on a registry of their own so that several apps
    (tests build many) never collide on the process-global one."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        # Every metric on this registry (a label list, and buckets, when it has them).
        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.request_latency = histogram(
            "tokenledger_http_request_duration_seconds",
            "HTTP request latency by method, route template and status class.",
            ["method", "route", "status_class"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.operations = counter(
            "tokenledger_ledger_operations_total",
            "Ledger operations by kind and outcome (ok, replayed, or an error code).",
            ["kind", "outcome"],
        )
        self.pool_size = gauge(
            "tokenledger_db_pool_connections",
            "Connections open in the database pool.",
        )
        self.pool_in_use = gauge(
            "tokenledger_db_pool_connections_in_use",
            "Connections of the pool currently lent to a request.",
        )
        self.pool_max = gauge(
            "tokenledger_db_pool_connections_max",
            "Configured maximum size of the database pool.",
        )
        self.db_retries = counter(
            "tokenledger_db_retries_total",
            "Whole transactions retried after a serialization failure or deadlock.",
        )
        self.coalesced_batch_size = histogram(
            "tokenledger_coalesced_batch_size",
            "Operations sent together in one tl_execute_batch call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.coalesced_fallbacks = counter(
            "tokenledger_coalesced_fallbacks_total",
            "Coalesced batches that failed as a whole and were run again one by one.",
        )
        self.sweeper_runs = counter(
            "tokenledger_sweeper_runs_total",
            "Background sweeps by task and outcome.",
            ["task", "outcome"],
        )
        self.reservations = counter(
            "tokenledger_reservations_total",
            "Reservations by outcome: created, captured, released (expiries show as the "
            "active gauge falling).",
            ["outcome"],
        )
        self.active_reservations = gauge(
            "tokenledger_reservations_active",
            "Reservations holding credits now (read at scrape time).",
        )
        self.refusals = counter(
            "tokenledger_refusals_total",
            "409 answers (business refusals) by error code: limit_exceeded, "
            "model_not_allowed, insufficient_credits, ...",
            ["code"],
        )
        self.overage_credits = counter(
            "tokenledger_overage_credits_total",
            "Credits of recorded usage that no wallet could cover, charged to system:overage.",
        )
        self.expired_credits = counter(
            "tokenledger_expired_credits_total",
            "Credits moved to system:expired by the sweeper.",
        )
        self.chained_transactions = counter(
            "tokenledger_chained_transactions_total",
            "Transactions appended to the hash chain by this replica.",
        )
        self.program_grants = counter(
            "tokenledger_program_grants_total",
            "Grant-program members by program and outcome: issued, or the reason they were "
            "skipped (already_granted, offboarded, insufficient_budget, prorated_to_zero).",
            ["program", "outcome"],
        )
        self.program_scheduler_last_run = gauge(
            "tokenledger_program_scheduler_last_run_timestamp_seconds",
            "When this replica's scheduler last ran a cycle of the program (Unix time of the "
            "run, by the ledger's clock).",
            ["program"],
        )
        # Alerts and webhooks (service/webhooks.py).
        self.outbox_lag = gauge(
            "tokenledger_outbox_lag_seconds",
            "Age of the oldest event not yet delivered: not fanned out to its webhooks yet, or "
            "with a delivery still pending (0 when there is none).",
        )
        self.webhook_pending = gauge(
            "tokenledger_webhook_deliveries_pending",
            "Webhook deliveries not yet delivered nor failed.",
        )
        self.webhook_deliveries = counter(
            "tokenledger_webhook_deliveries_total",
            "Webhook delivery attempts by this replica, by outcome: delivered, retry (failed, "
            "retried later), failed (gave up), refused (the address is not allowed), stale "
            "(a later attempt had taken over).",
            ["outcome"],
        )
        self.webhook_retries = counter(
            "tokenledger_webhook_retries_total",
            "Webhook attempts by this replica that were not a delivery's first.",
        )
        self.webhook_latency = histogram(
            "tokenledger_webhook_attempt_seconds",
            "Time from sending a webhook to its answer (or its failure).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.events_emitted = counter(
            "tokenledger_alert_events_total",
            "credits.expiring events emitted by this replica's background loop.",
            ["type"],
        )

        # Operations (deploy/grafana, deploy/prometheus): what the dashboard
        # and the alert rules read besides the above. The ledger-wide gauges
        # are read from the database at scrape time (one query, at most once a
        # second), so every replica reports the same values: aggregate them
        # with max(), not sum().
        self.unavailable_responses = counter(
            "tokenledger_http_unavailable_responses_total",
            "503 answers by method and route template: the pool, the database or a lock "
            "wait was over its bound (the latency histogram only keeps the status class).",
            ["method", "route"],
        )
        self.chain_lag = gauge(
            "tokenledger_chain_lag_seconds",
            "Age of the oldest committed transaction not yet in the hash chain, settle "
            "window included (0 when all are chained).",
        )
        self.sweeper_lag = gauge(
            "tokenledger_sweeper_lag_seconds",
            "Age of the oldest expiry (of a lot or a reservation) that is due and not yet "
            "written to the journal (0 when none is due).",
        )
        self.scheduler_lag = gauge(
            "tokenledger_scheduler_lag_seconds",
            "Age of the oldest grant-program cycle that has started and has not been run "
            "(0 when none is owed).",
        )
        self.system_balance = gauge(
            "tokenledger_system_account_balance_credits",
            "Posted balance of each system account, summed over its shards: minus the "
            "credits ever issued (system:issuance), the credits ever spent (system:usage) "
            "and expired (system:expired), net of reversals.",
            ["account"],
        )

    def record_ledger_gauges(self, row: Any) -> None:
        """Set the ledger-wide gauges from the ledger_gauges query's row."""
        self.chain_lag.set(float(row["chain_lag_seconds"]))
        self.sweeper_lag.set(float(row["sweeper_lag_seconds"]))
        self.scheduler_lag.set(float(row["scheduler_lag_seconds"]))
        for account, posted in (row["system_balances"] or {}).items():
            self.system_balance.labels(str(account)).set(int(posted))

    def record_program_run(self, run: dict[str, Any]) -> None:
        """Count a program run's members by outcome."""
        program = str(run["program"])
        if run["issued"]:
            self.program_grants.labels(program, "issued").inc(int(run["issued"]))
        for reason, count in (run.get("skipped") or {}).items():
            self.program_grants.labels(program, str(reason)).inc(int(count))


class Stopwatch:
    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def status_class(status: int) -> str:
    return f"{status // 100}xx"
