"""What a scenario saw: its answers, latencies and CPU, summed up per
operation (percentiles by nearest rank).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.api import problem_code
from bench.http import Response as LeanResponse


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def latency_summary(lat: Sequence[float]) -> dict[str, float | None]:
    """Percentiles, mean and max of an ascending list of seconds, in ms."""
    return {
        "p50": ms(percentile(lat, 50)),
        "p95": ms(percentile(lat, 95)),
        "p99": ms(percentile(lat, 99)),
        "mean": ms(sum(lat) / len(lat)) if lat else None,
        "max": ms(lat[-1]) if lat else None,
    }


@dataclass
class Stats:
    """What one scenario saw. `ok` answers are the expected 2xx (`ok_status`,
    or the status a request was sent expecting); `allowed` statuses (409 for
    transfers) are business rejections, not errors; everything else,
    transport failures included, is an error. An op is one request, unless
    the scenario counts its ops itself (`ops_done`, in `op_unit`s: a
    reserve+capture pair is one op of two requests)."""

    name: str
    workers: int
    planned: int
    time_cap: float
    ok_status: int
    allowed: frozenset[int] = frozenset()
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    transport: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    capped: bool = False
    setup_error: str | None = None
    check: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None
    statements: list[dict[str, Any]] | None = None  # --stat-statements: the top ones
    op_unit: str = "request"
    ops_done: int | None = None
    ok_answers: int = 0
    # Latencies by request kind, for scenarios that send more than one kind.
    latencies_by: dict[str, list[float]] = field(default_factory=dict)
    # Wall seconds of each timed round: one for most scenarios, several for
    # the pairs run interleaved (bench.scenarios.run_interleaved).
    rounds: list[float] = field(default_factory=list)

    def record(
        self,
        response: httpx.Response | LeanResponse,
        seconds: float,
        expected: int | None = None,
        label: str | None = None,
    ) -> None:
        status = response.status_code
        self.statuses[status] += 1
        self.latencies.append(seconds)
        if label is not None:
            self.latencies_by.setdefault(label, []).append(seconds)
        if status == (self.ok_status if expected is None else expected):
            self.ok_answers += 1
        else:
            code = problem_code(response)
            self.codes[f"{status} {code}"] += 1
            if status not in self.allowed and len(self.samples) < 5:
                self.samples.append(
                    {
                        "status": status,
                        "path": response.request.url.path,
                        "body": response.text[:500],
                        "retry_after": response.headers.get("Retry-After"),
                    }
                )

    def record_transport(self, exc: Exception) -> None:
        self.transport[type(exc).__name__] += 1
        if len(self.samples) < 5:
            self.samples.append({"transport_error": f"{type(exc).__name__}: {exc}"[:300]})

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def requests(self) -> int:
        return self.answered + sum(self.transport.values())

    @property
    def ok(self) -> int:
        return self.ok_answers

    @property
    def ops(self) -> int:
        return self.ok if self.ops_done is None else self.ops_done

    @property
    def rejected(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in self.allowed)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def errors(self) -> int:
        return self.requests - self.ok - self.rejected

    @property
    def passed(self) -> bool:
        return (
            self.setup_error is None
            and self.errors == 0
            and (self.check is None or bool(self.check.get("passed", True)))
        )

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        elapsed = self.elapsed or float("nan")
        return {
            "name": self.name,
            "workers": self.workers,
            "op": self.op_unit,
            "planned": self.planned,
            "requests": self.requests,
            "ok": self.ok,
            "ops": self.ops,
            "rejected_409": self.rejected,
            "errors": self.errors,
            "server_errors_5xx": self.server_errors,
            "transport_errors": dict(self.transport),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "error_codes": dict(self.codes),
            "elapsed_s": round(self.elapsed, 3),
            "rounds": len(self.rounds),
            "round_seconds": [round(x, 6) for x in self.rounds] if len(self.rounds) > 1 else [],
            "ops_per_s": round(self.ops / elapsed, 1) if self.elapsed else None,
            "req_per_s": round(self.requests / elapsed, 1) if self.elapsed else None,
            "latency_ms": latency_summary(lat),
            "latency_ms_by_request": {
                label: latency_summary(sorted(values))
                for label, values in self.latencies_by.items()
            },
            "time_cap_s": self.time_cap,
            "capped": self.capped,
            "setup_error": self.setup_error,
            "check": self.check,
            "cpu": self.cpu,
            **cpu_ms_per_op(self.cpu, self.ops),
            "stat_statements": self.statements,
            "samples": self.samples,
            "passed": self.passed,
        }


def cpu_ms_per_op(cpu_delta: dict[str, Any] | None, ops: int) -> dict[str, float | None]:
    """CPU-milliseconds per operation: `postgres` the pool's backends,
    `postgres_server` every process of the server, `service` the service's
    process tree."""
    per_op: dict[str, float | None] = {}
    for part in ("postgres", "postgres_server", "service"):
        seconds = (cpu_delta or {}).get(f"{part}_cpu_s")
        per_op[f"{part}_cpu_ms_per_op"] = (
            round(seconds / ops * 1000, 4) if seconds is not None and ops > 0 else None
        )
    return per_op
