"""Running a scenario: its options and context, workers sending timed requests
until done or the time cap, and the balance checks the scenarios share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import RESULTS_DIR
from bench.api import SETUP_CONCURRENCY, Api, bounded_gather
from bench.http import LeanClient
from bench.http import Response as LeanResponse
from bench.probes import CpuProbe, Statements, add_cpu
from bench.stats import Stats

DEFAULT_JSON = RESULTS_DIR / "latest.json"
# Events per POST /v1/usage:batch in usage_batch_500 (--batch-size).
USAGE_BATCH_SIZE_DEFAULT = 500
# The spread scenarios (debit_spread_32, read_32) spread over this many
# funded wallets (--wallets, times --scale), as the gateway's callers do.
SPREAD_WALLETS_DEFAULT = 1000
# The pgbench reference (bench/pgbench.py): seconds of tpcb-like, and its -s.
PGBENCH_SECONDS_DEFAULT = 15.0
PGBENCH_SCALE_DEFAULT = 10


@dataclass
class Options:
    """`python -m bench`'s command line (bench.harness.parse_args)."""

    scale: float = 1.0
    requests: int | None = None  # overrides each scenario's default count
    workers: int | None = None  # overrides the concurrent scenarios' workers
    only: tuple[str, ...] = ()
    json_path: Path = DEFAULT_JSON
    database_url: str | None = None
    seed: int = 1
    time_cap_scale: float = 1.0
    batch_size: int = USAGE_BATCH_SIZE_DEFAULT  # events per POST /v1/usage:batch
    # Wallets of the spread scenarios (debit_spread_32, read_32), before --scale.
    wallets: int = SPREAD_WALLETS_DEFAULT
    # fsync, synchronous_commit and full_page_writes on a server the bench starts.
    fsync: bool = True
    pgbench_seconds: float = PGBENCH_SECONDS_DEFAULT  # 0: no pgbench reference
    pgbench_scale: int = PGBENCH_SCALE_DEFAULT
    stat_statements: bool = False
    wrk_seconds: float = 0.0  # the wrk throughput phases, each this long; 0: none


@dataclass
class Context:
    """What every scenario is given: the clients, the run's options and id,
    the probes, and what the scenarios before it left for the checks."""

    client: httpx.AsyncClient
    api: Api
    opts: Options
    run_id: str
    # The measured requests (send) go through this lean client: httpx cost
    # the 2-core machine more CPU per request than the service did (bench/http.py).
    fast: LeanClient | None = None
    probe: CpuProbe | None = None
    statements: Statements | None = None
    # Credits that went to system:usage (successful debits and captures), per
    # scenario, for the system:usage check; None once an outcome is unknown
    # (a transport error).
    debited: dict[str, int | None] = field(default_factory=dict)
    # The funded wallets of debit_spread_32, which read_32 reads when both run.
    spread_wallets: list[str] = field(default_factory=list)

    def count(self, default: int) -> int:
        base = self.opts.requests if self.opts.requests is not None else default
        return max(1, round(base * self.opts.scale))

    def workers(self, default: int) -> int:
        return max(1, self.opts.workers or default)

    def wallets(self) -> int:
        """How many wallets the spread scenarios spread over (--wallets x --scale)."""
        return max(1, round(self.opts.wallets * self.opts.scale))

    def key(self, scenario: str, w: int, i: int | str) -> dict[str, str]:
        return {"Idempotency-Key": f"{self.run_id}-{scenario}-{w}-{i}"}


Request = tuple[str, str, dict[str, Any] | None, dict[str, str] | None]


def split(total: int, workers: int) -> list[int]:
    """`total` requests over `workers`, as evenly as possible."""
    base, extra = divmod(total, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


async def run_workers(
    ctx: Context,
    stats: Stats,
    per_worker: Sequence[int],
    step: Callable[[int, int], Awaitable[None]],
    first: Sequence[int] | None = None,
) -> None:
    """Run workers, each doing its count of steps one after the other, until
    done or the scenario's time cap (a step begun before the cap finishes).

    Worker w's steps are numbered from first[w] (0 when not given): a
    scenario run in rounds (run_interleaved) calls this once per round, and
    the time, CPU and latencies of the rounds add up in `stats`."""
    if ctx.statements is not None:
        await ctx.statements.reset()
    before = await ctx.probe.snapshot() if ctx.probe else None
    started = time.monotonic()
    deadline = started + max(0.0, stats.time_cap - stats.elapsed)
    starts = first or [0] * len(per_worker)

    async def worker(w: int, count: int) -> None:
        for i in range(starts[w], starts[w] + count):
            if time.monotonic() >= deadline:
                stats.capped = True
                return
            await step(w, i)

    await asyncio.gather(*(worker(w, n) for w, n in enumerate(per_worker)))
    elapsed = time.monotonic() - started
    stats.elapsed += elapsed
    stats.rounds.append(elapsed)
    if ctx.probe and before:
        stats.cpu = add_cpu(stats.cpu, ctx.probe.delta(before, await ctx.probe.snapshot()))
    if ctx.statements is not None:
        stats.statements = await ctx.statements.top()


async def send(
    ctx: Context,
    stats: Stats,
    request: Request,
    expected: int | None = None,
    label: str | None = None,
) -> httpx.Response | LeanResponse | None:
    """One timed request, recorded in stats; None after a transport error."""
    method, path, body, headers = request
    t0 = time.perf_counter()
    try:
        client = ctx.fast or ctx.client
        r = await client.request(method, path, json=body, headers=headers)
    except httpx.TransportError as exc:
        stats.record_transport(exc)
        return None
    stats.record(r, time.perf_counter() - t0, expected, label)
    return r


async def drive(
    ctx: Context,
    stats: Stats,
    per_worker: Sequence[int],
    make: Callable[[int, int], Request],
    first: Sequence[int] | None = None,
) -> None:
    """Run workers, each sending its count of requests one after the other,
    until done or the scenario's time cap (run_workers: `first`)."""

    async def step(w: int, i: int) -> None:
        await send(ctx, stats, make(w, i))

    await run_workers(ctx, stats, per_worker, step, first)


@dataclass
class Prepared:
    """A scenario set up and ready to run its timed requests in one go or in
    rounds (bench.scenarios.run_interleaved): `run(share)` sends the next
    `share` of each worker's requests, `finish()` checks the outcome."""

    stats: Stats
    per_worker: list[int]
    run_share: Callable[[list[int], list[int]], Awaitable[None]]
    finish: Callable[[], Awaitable[None]]
    sent: list[int] = field(default_factory=list)

    async def run(self, share: list[int]) -> None:
        if not self.sent:
            self.sent = [0] * len(self.per_worker)
        await self.run_share(share, list(self.sent))
        self.sent = [a + b for a, b in zip(self.sent, share, strict=True)]

    async def run_all(self) -> Stats:
        await self.run(list(self.per_worker))
        await self.finish()
        return self.stats


def debits_known(stats: Stats) -> int | None:
    """Credits debited by a scenario of 1-credit debits, if every outcome is known."""
    return stats.ok if not stats.transport else None


async def balance_check(ctx: Context, address: str, expected: int | None) -> dict[str, Any]:
    actual = await ctx.api.posted(address)
    if expected is None:
        return {
            "account": address,
            "posted": actual,
            "passed": True,
            "skipped": "a transport error left some outcome unknown",
        }
    return {
        "account": address,
        "expected_posted": expected,
        "posted": actual,
        "passed": actual == expected,
    }


async def wallet_postings(ctx: Context, wallets: Sequence[str]) -> list[int]:
    """Posted balances of employee wallets, a few reads at a time."""

    def job(wallet: str) -> Callable[[], Awaitable[int]]:
        return lambda: ctx.api.posted(f"employee:{wallet}")

    return await bounded_gather(SETUP_CONCURRENCY, [job(w) for w in wallets])


def run_async(coro: Awaitable[Any]) -> Any:
    """Run on uvloop when it is installed (less client CPU taken from the
    service on a small machine), else on asyncio's loop."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]
