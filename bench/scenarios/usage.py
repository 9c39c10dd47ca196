"""Usage events, single and in batches, checked event by event and sent twice."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.api import SetupError, expect, problem_code
from bench.driver import Context, run_workers, send, split
from bench.stats import Stats

# The usage scenarios charge events of one bench model, priced from
# USAGE_PRICE_FROM, spread round-robin over USAGE_WALLETS funded wallets.
# Token counts vary per event (a seeded generator), so costs vary and some
# round up; the expected cost of each is usage_cost below.
USAGE_MODEL = "bench-model"
USAGE_SOURCE = "bench"
USAGE_PRICE_FROM = "2024-01-01T00:00:00Z"
USAGE_RATES = {"input_per_mtok": 3_000, "cached_input_per_mtok": 300, "output_per_mtok": 15_000}
USAGE_WALLETS = 32
# A second send of events already recorded (the duplicate check), at most.
USAGE_RESEND_MAX = 500
USAGE_SINGLE_RESEND_SINGLY = 16


def usage_cost(input_tokens: int, cached: int, output_tokens: int, rates: Any) -> int:
    """README, Prices: the credits of one event, rounded up once. The bench's own
    oracle, to check the cost the service answers (tl_usage_cost in schema.sql)."""
    millionths = (
        (input_tokens - cached) * rates.input_per_mtok
        + cached * rates.cached_input_per_mtok
        + output_tokens * rates.output_per_mtok
    )
    return -(-millionths // 1_000_000)


@dataclass
class UsageEvent:
    body: dict[str, Any]
    cost: int  # expected, by usage_cost

    @property
    def event_id(self) -> str:
        return str(self.body["event_id"])

    @property
    def wallet(self) -> str:
        return str(self.body["account"])


@dataclass
class UsageLog:
    """What the workers of a usage scenario learned, for its checks."""

    recorded: dict[str, int] = field(default_factory=dict)  # event id -> expected cost
    answers: Counter[str] = field(default_factory=Counter)  # event statuses (and codes)
    cost_mismatch: list[dict[str, Any]] = field(default_factory=list)
    order_mismatch: int = 0
    sent: int = 0  # events sent (answered or not)
    # Events of batches answered with an allowed 503 (usage_batch_500_c16):
    # nothing of such a batch may have been recorded.
    unavailable: int = 0


async def usage_price(ctx: Context) -> Any:
    """The bench model's price version (created once; the same version again
    answers the existing one), as rates for usage_cost."""
    from service.pricing import PriceRates

    body = {"model": USAGE_MODEL, "effective_from": USAGE_PRICE_FROM, **USAGE_RATES}
    price = await expect(
        ctx.client.post("/v1/prices", json=body, headers=ctx.api.key("setup-price")), 200, 201
    )
    rates = {k: int(price[k]) for k in USAGE_RATES}
    if rates != USAGE_RATES:
        raise SetupError(f"POST /v1/prices answered other rates: {rates} != {USAGE_RATES}")
    return PriceRates(**rates)


def usage_events(
    ctx: Context, name: str, wallets: Sequence[str], total: int, rates: Any
) -> list[UsageEvent]:
    """`total` events with unique ids, round-robin over `wallets`."""
    rng = random.Random(ctx.opts.seed * 7919 + len(name))  # noqa: S311  # why: load shape, not security
    events: list[UsageEvent] = []
    for k in range(total):
        input_tokens = rng.randint(100, 4000)
        cached = rng.randint(0, input_tokens // 2) if k % 3 else 0
        output_tokens = rng.randint(10, 1000)
        body: dict[str, Any] = {
            "source": USAGE_SOURCE,
            "event_id": f"{ctx.run_id}-{name}-{k}",
            "account": f"employee:{wallets[k % len(wallets)]}",
            "model": USAGE_MODEL,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        if cached:  # else left out: the default 0
            body["cached_input_tokens"] = cached
        events.append(UsageEvent(body, usage_cost(input_tokens, cached, output_tokens, rates)))
    return events


async def usage_setup(
    ctx: Context, name: str, total: int, wallet_count: int = USAGE_WALLETS
) -> tuple[list[str], dict[str, int], list[UsageEvent]]:
    """Untimed: the price, `wallet_count` wallets each funded with the expected
    cost of its events plus a margin, and the events."""
    rates = await usage_price(ctx)
    wallets = [f"{name.replace('_', '-')}-{k}" for k in range(wallet_count)]
    events = usage_events(ctx, name, wallets, total, rates)
    funding = {w: 100 for w in wallets}
    for e in events:
        funding[e.wallet.removeprefix("employee:")] += e.cost
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    return wallets, funding, events


def note_answer(log: UsageLog, event: UsageEvent, status: str, cost: Any, code: Any) -> None:
    log.answers[status if code is None else f"{status} {code}"] += 1
    if status != "recorded":
        return
    log.recorded[event.event_id] = event.cost
    if cost != event.cost and len(log.cost_mismatch) < 10:
        log.cost_mismatch.append({"event_id": event.event_id, "cost": cost, "expected": event.cost})


async def resend_batch(ctx: Context, events: Sequence[UsageEvent]) -> dict[str, Any]:
    """Untimed: events already recorded, sent again as one batch: every one
    must answer duplicate (with its cost)."""
    r = await ctx.client.post("/v1/usage:batch", json={"events": [e.body for e in events]})
    answers: Counter[str] = Counter()
    wrong: list[Any] = []
    if r.status_code == 200:
        results = r.json().get("results") or []
        for e, res in zip(events, results, strict=False):
            answers[str(res.get("status"))] += 1
            if res.get("status") != "duplicate" or res.get("event_id") != e.event_id:
                if len(wrong) < 5:
                    wrong.append(res)
        if len(results) != len(events):
            wrong.append(f"{len(results)} results for {len(events)} events")
    else:
        wrong.append(f"{r.status_code} {r.text[:300]}")
    return {
        "events": len(events),
        "answers": dict(answers),
        "wrong": wrong,
        "passed": not wrong and answers["duplicate"] == len(events),
    }


async def usage_check(
    ctx: Context,
    stats: Stats,
    log: UsageLog,
    wallets: Sequence[str],
    funding: dict[str, int],
    usage_before: int,
    resend: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """After a usage scenario: every event sent answered recorded with its
    expected cost; system:usage gained, and the wallets lost, exactly the
    expected costs; a second send answers duplicate and charges nothing."""
    expected_gain = sum(log.recorded.values())
    usage_gain = await ctx.api.posted("system:usage") - usage_before
    posted_sum = sum([await ctx.api.posted(f"employee:{w}") for w in wallets])
    expected_posted = sum(funding.values()) - expected_gain
    check: dict[str, Any] = {
        "wallets": len(wallets),
        "events_sent": log.sent,
        "events_recorded": len(log.recorded),
        "event_answers": dict(log.answers),
        "cost_mismatch": log.cost_mismatch,
        "results_out_of_order": log.order_mismatch,
        "expected_usage_gain": expected_gain,
        "usage_gain": usage_gain,
        "expected_posted_sum": expected_posted,
        "posted_sum": posted_sum,
    }
    if stats.transport:
        check["passed"] = True
        check["skipped"] = "a transport error left some outcome unknown"
        return check
    duplicate = await resend()
    resend_gain = await ctx.api.posted("system:usage") - usage_before - usage_gain
    posted_after = sum([await ctx.api.posted(f"employee:{w}") for w in wallets])
    duplicate["usage_gain"] = resend_gain
    duplicate["posted_change"] = posted_after - posted_sum
    duplicate["passed"] = duplicate["passed"] and resend_gain == 0 and posted_after == posted_sum
    check["second_send"] = duplicate
    if log.unavailable:
        check["events_in_503_batches"] = log.unavailable
    unexpected_5xx = sum(
        n for s, n in stats.statuses.items() if s >= 500 and s not in stats.allowed
    )
    check["passed"] = (
        unexpected_5xx == 0
        and len(log.recorded) + log.unavailable == log.sent
        and not log.cost_mismatch
        and not log.order_mismatch
        and usage_gain == expected_gain
        and posted_sum == expected_posted
        and duplicate["passed"]
    )
    return check


async def usage_single(ctx: Context) -> Stats:
    """16 workers, each posting single POST /v1/usage events (unique ids)
    against 32 funded wallets. One op = one event = one request."""
    return await _usage_single(ctx, "usage_single", 16, 800, USAGE_WALLETS)


async def usage_single_32(ctx: Context) -> Stats:
    """32 workers posting single POST /v1/usage events (unique ids) spread over
    --wallets (1,000) funded wallets, as debit_spread_32 spreads its debits:
    the two compare one request kind with the other at the same load (single
    usage events are coalesced as debits are). One op = one event = one request."""
    return await _usage_single(ctx, "usage_single_32", 32, 5000, ctx.wallets())


async def _usage_single(
    ctx: Context, name: str, default_workers: int, default_events: int, wallet_count: int
) -> Stats:
    workers = ctx.workers(default_workers)
    total = ctx.count(default_events)
    per_worker = split(total, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 201, op_unit="event")
    stats.ops_done = 0
    wallets, funding, events = await usage_setup(ctx, name, total, wallet_count)
    starts = [sum(per_worker[:w]) for w in range(workers)]
    usage_before = await ctx.api.posted("system:usage")
    log = UsageLog()

    async def step(w: int, i: int) -> None:
        event = events[starts[w] + i]
        log.sent += 1
        r = await send(ctx, stats, ("POST", "/v1/usage", event.body, None))
        if r is None:
            return
        if r.status_code in (200, 201):
            body = r.json()
            status = str(body.get("status"))
            if r.status_code == 201 and status == "recorded":
                stats.ops_done = (stats.ops_done or 0) + 1
            note_answer(log, event, status, body.get("cost"), None)
        else:
            log.answers[f"{r.status_code} {problem_code(r)}"] += 1

    await run_workers(ctx, stats, per_worker, step)
    ctx.debited[name] = None if stats.transport else sum(log.recorded.values())
    sent = [e for e in events if e.event_id in log.recorded]

    async def resend() -> dict[str, Any]:
        # A few singly (200 duplicate each), then up to USAGE_RESEND_MAX as one batch.
        singly: Counter[str] = Counter()
        for e in sent[:USAGE_SINGLE_RESEND_SINGLY]:
            r = await ctx.client.post("/v1/usage", json=e.body)
            ok = r.status_code == 200 and r.json().get("status") == "duplicate"
            ok = ok and r.json().get("cost") == e.cost
            singly["duplicate" if ok else f"{r.status_code} {r.text[:100]}"] += 1
        batch = await resend_batch(ctx, sent[:USAGE_RESEND_MAX])
        batch["singly"] = dict(singly)
        n = min(len(sent), USAGE_SINGLE_RESEND_SINGLY)
        batch["passed"] = batch["passed"] and singly["duplicate"] == n
        return batch

    stats.check = await usage_check(ctx, stats, log, wallets, funding, usage_before, resend)
    return stats


async def usage_batch(ctx: Context) -> Stats:
    """4 workers, each posting POST /v1/usage:batch of --batch-size (500)
    events (unique ids, spread over 32 wallets). The count is of events;
    one op is one event recorded, latencies are per request (per batch)."""
    return await _usage_batch(
        ctx, "usage_batch_500", default_workers=4, default_events=20_000, allow_503=False
    )


async def usage_batch_c16(ctx: Context) -> Stats:
    """As usage_batch_500 at 16 workers: sixteen concurrent batches, every
    one of them touching all 32 wallets (the overlap that made them
    deadlock-retry into seconds). A batch answered 503 (overloaded, the
    known failure this scenario exists to show) is a rejection, reported
    but not an error, provided it recorded nothing: the checks stay exact."""
    return await _usage_batch(
        ctx, "usage_batch_500_c16", default_workers=16, default_events=32_000, allow_503=True
    )


async def _usage_batch(
    ctx: Context, name: str, *, default_workers: int, default_events: int, allow_503: bool
) -> Stats:
    size = max(1, ctx.opts.batch_size)
    total = ctx.count(default_events)  # events
    batches = math.ceil(total / size)
    workers = min(ctx.workers(default_workers), batches)
    per_worker = split(batches, workers)
    allowed = frozenset({503}) if allow_503 else frozenset()
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 200, allowed, op_unit="event")
    stats.ops_done = 0
    wallets, funding, events = await usage_setup(ctx, name, total)
    chunks = [events[b * size : (b + 1) * size] for b in range(batches)]
    starts = [sum(per_worker[:w]) for w in range(workers)]
    usage_before = await ctx.api.posted("system:usage")
    log = UsageLog()
    sent_chunks: list[list[UsageEvent]] = []

    async def step(w: int, i: int) -> None:
        chunk = chunks[starts[w] + i]
        log.sent += len(chunk)
        body = {"events": [e.body for e in chunk]}
        r = await send(ctx, stats, ("POST", "/v1/usage:batch", body, None))
        if r is None:
            return
        if r.status_code != 200:
            log.answers[f"{r.status_code} {problem_code(r)}"] += len(chunk)
            if r.status_code in stats.allowed:
                log.unavailable += len(chunk)
            return
        sent_chunks.append(chunk)
        results = r.json().get("results") or []
        if len(results) != len(chunk):
            log.order_mismatch += 1
        for e, res in zip(chunk, results, strict=False):
            if res.get("event_id") != e.event_id:
                log.order_mismatch += 1
                continue
            note_answer(log, e, str(res.get("status")), res.get("cost"), res.get("code"))
            if res.get("status") == "recorded":
                stats.ops_done = (stats.ops_done or 0) + 1

    await run_workers(ctx, stats, per_worker, step)
    ctx.debited[name] = None if stats.transport else sum(log.recorded.values())

    async def resend() -> dict[str, Any]:
        if not sent_chunks:
            return {"events": 0, "wrong": ["no batch answered 200"], "passed": False}
        return await resend_batch(ctx, sent_chunks[0])

    stats.check = await usage_check(ctx, stats, log, wallets, funding, usage_before, resend)
    stats.check["batch_size"] = size
    stats.check["batches"] = batches
    return stats
