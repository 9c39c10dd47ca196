"""Concurrent reserve-then-capture pairs, on wallets of their own or one shared
team wallet, checked capture by capture.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.driver import Context, Prepared, run_workers, send, split
from bench.scenarios.usage import USAGE_MODEL, usage_price
from bench.stats import Stats

# Reservation scenarios: each pair holds RESERVE_AMOUNT, then captures
# 1..RESERVE_AMOUNT, or OVER_CAPTURE_AMOUNT (more than held, the excess from
# available credits) on one pair in OVER_CAPTURE_EVERY.
RESERVE_AMOUNT = 10
OVER_CAPTURE_AMOUNT = 12
OVER_CAPTURE_EVERY = 10
# reserve_capture_gateway_32, the LiteLLM hook's shape (README, "What the hook
# does"): a reservation by estimate of GATEWAY_INPUT_TOKENS in and at most
# GATEWAY_MAX_OUTPUT_TOKENS out of the bench model (11 credits at its price),
# captured by usage of 1..GATEWAY_MAX_OUTPUT_TOKENS output tokens (4 to 11).
GATEWAY_INPUT_TOKENS = 1000
GATEWAY_MAX_OUTPUT_TOKENS = 500


@dataclass
class PairLog:
    """What the workers of a reservation scenario learned, for its checks."""

    created: dict[str, str] = field(default_factory=dict)  # reservation id -> wallet
    captured: dict[str, int] = field(default_factory=dict)  # reservation id -> amount
    capture_answers: Counter[str] = field(default_factory=Counter)  # id -> 200 answers
    over_captures: int = 0
    unknown_reserves: int = 0  # transport errors: a hold may exist that we do not know
    unknown_captures: int = 0  # transport errors: a capture may have happened


async def prepare_reserve_capture(
    ctx: Context,
    name: str,
    shared: bool,
    policy: bool = False,
    default_count: int = 800,
    gateway: bool = False,
) -> Prepared:
    """Workers each doing sequential pairs: reserve RESERVE_AMOUNT, then
    capture 1..RESERVE_AMOUNT of it, or now and then OVER_CAPTURE_AMOUNT.
    With `gateway`, as the LiteLLM hook does: reserve by estimate, capture by
    usage (GATEWAY_*). One op = one pair (both answers 2xx); latencies are per
    request."""
    workers = ctx.workers(32)
    total = ctx.count(default_count)  # pairs
    per_worker = split(total, workers)
    stats = Stats(
        name, workers, total, 90 * ctx.opts.time_cap_scale, 201, op_unit="reserve+capture pair"
    )
    stats.ops_done = 0
    # Enough for every pair to over-capture, and for every worker's hold at once.
    margin = 100 + workers * OVER_CAPTURE_AMOUNT
    if shared:
        # One team wallet (an employee wallet) that every worker spends from.
        wallets = [f"{name.replace('_', '-')}-team"]
        funding = {wallets[0]: total * OVER_CAPTURE_AMOUNT + margin}
    else:
        wallets = [f"{name.replace('_', '-')}-{w}" for w in range(workers)]
        funding = {wallets[w]: per_worker[w] * OVER_CAPTURE_AMOUNT + margin for w in range(workers)}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    if policy:
        await ctx.api.policies(wallets, funding)
    if gateway:
        await usage_price(ctx)
    # What system:usage gained during this scenario's own rounds (another
    # scenario's rounds may run between them: run_interleaved).
    usage_gain = [0]
    rngs = [random.Random(ctx.opts.seed * 1000 + w) for w in range(workers)]  # noqa: S311  # why: load shape, not security
    log = PairLog()

    async def step(w: int, i: int) -> None:
        wallet = wallets[0] if shared else wallets[w]
        reserve: dict[str, Any] = {"account": f"employee:{wallet}", "amount": RESERVE_AMOUNT}
        if gateway:
            reserve = {
                "account": f"employee:{wallet}",
                "estimate": {
                    "model": USAGE_MODEL,
                    "input_tokens": GATEWAY_INPUT_TOKENS,
                    "max_output_tokens": GATEWAY_MAX_OUTPUT_TOKENS,
                },
            }
        r = await send(
            ctx,
            stats,
            ("POST", "/v1/reservations", reserve, ctx.key(name, w, f"{i}-reserve")),
            201,
            "reserve",
        )
        if r is None:
            log.unknown_reserves += 1
            return
        if r.status_code != 201:
            return
        rid = str(r.json()["id"])
        log.created[rid] = wallet
        over = not gateway and (w + i) % OVER_CAPTURE_EVERY == 0
        amount = OVER_CAPTURE_AMOUNT if over else rngs[w].randint(1, RESERVE_AMOUNT)
        capture: dict[str, Any] = {"amount": amount}
        if gateway:
            capture = {
                "usage": {
                    "model": USAGE_MODEL,
                    "input_tokens": GATEWAY_INPUT_TOKENS,
                    "output_tokens": rngs[w].randint(1, GATEWAY_MAX_OUTPUT_TOKENS),
                }
            }
        c = await send(
            ctx,
            stats,
            (
                "POST",
                f"/v1/reservations/{rid}/capture",
                capture,
                ctx.key(name, w, f"{i}-capture"),
            ),
            200,
            "capture",
        )
        if c is None:
            log.unknown_captures += 1
            return
        if c.status_code == 200:
            log.capture_answers[rid] += 1
            # (By usage, the priced cost is what the capture answers.)
            log.captured[rid] = int(c.json()["reservation"]["captured"]) if gateway else amount
            log.over_captures += int(over)
            stats.ops_done = (stats.ops_done or 0) + 1

    async def run_share(share: list[int], first: list[int]) -> None:
        before = await ctx.api.posted("system:usage")
        await run_workers(ctx, stats, share, step, first)
        usage_gain[0] += await ctx.api.posted("system:usage") - before

    async def finish() -> None:
        captured_sum = sum(log.captured.values())
        ctx.debited[name] = None if log.unknown_captures else captured_sum
        stats.check = await pair_check(ctx, stats, log, wallets, funding, usage_gain[0])

    return Prepared(stats, per_worker, run_share, finish)


async def _reserve_capture(ctx: Context, name: str, shared: bool, policy: bool = False) -> Stats:
    prepared = await prepare_reserve_capture(ctx, name, shared, policy)
    return await prepared.run_all()


async def pair_check(
    ctx: Context,
    stats: Stats,
    log: PairLog,
    wallets: Sequence[str],
    funding: dict[str, int],
    usage_gain: int,
) -> dict[str, Any]:
    """After a reservation scenario: no 5xx; every reservation the workers
    created got exactly one successful capture (by its answers, and by the
    capture transactions on the wallets); every wallet's `reserved` is 0;
    system:usage gained, and the wallets lost, exactly the captured credits."""
    captured_sum = sum(log.captured.values())
    accounts = {w: await ctx.api.account(f"employee:{w}") for w in wallets}
    # Capture transactions, by the reservation they captured (details.reservation_id).
    txn_count: Counter[str] = Counter()
    txn_amount: dict[str, int] = {}
    for w in wallets:
        for txn in await ctx.api.transactions(f"employee:{w}", "capture"):
            rid = str((txn.get("details") or {}).get("reservation_id"))
            txn_count[rid] += 1
            txn_amount[rid] = sum(
                int(e["amount"]) for e in txn["entries"] if e["account"] == "system:usage"
            )
    not_captured = [rid for rid in log.created if log.capture_answers[rid] != 1]
    txn_not_once = [rid for rid in log.created if txn_count[rid] != 1]
    txn_unexpected = [rid for rid in txn_count if rid not in log.created]
    amount_wrong = [rid for rid, amount in log.captured.items() if txn_amount.get(rid) != amount]
    reserved = {w: int(a["reserved"]) for w, a in accounts.items() if int(a["reserved"]) != 0}
    posted_sum = sum(int(a["posted"]) for a in accounts.values())
    expected_posted = sum(funding.values()) - captured_sum
    check: dict[str, Any] = {
        "wallets": len(wallets),
        "server_errors_5xx": stats.server_errors,
        "reservations_created": len(log.created),
        "captures_ok": len(log.captured),
        "over_captures_ok": log.over_captures,
        "not_captured_exactly_once": not_captured[:10],
        "capture_transactions": sum(txn_count.values()),
        "capture_transactions_not_once": txn_not_once[:10],
        "capture_transactions_unexpected": txn_unexpected[:10],
        "capture_amount_mismatch": amount_wrong[:10],
        "reserved_nonzero": dict(list(reserved.items())[:10]),
        "captured_sum": captured_sum,
        "usage_gain": usage_gain,
        "expected_posted_sum": expected_posted,
        "posted_sum": posted_sum,
    }
    check["passed"] = (
        stats.server_errors == 0
        and not not_captured
        and not txn_not_once
        and not txn_unexpected
        and not amount_wrong
        and not reserved
        and usage_gain == captured_sum
        and posted_sum == expected_posted
    )
    if log.unknown_reserves or log.unknown_captures:
        # As the other scenarios: with an outcome unknown, the arithmetic
        # cannot be checked (the transport errors already fail the scenario).
        check["passed"] = True
        check["skipped"] = (
            f"transport errors left {log.unknown_reserves} reserve(s) and "
            f"{log.unknown_captures} capture(s) unknown"
        )
    return check


async def reserve_capture_spread(ctx: Context) -> Stats:
    """32 workers, each doing reserve-then-capture pairs on a wallet of its own."""
    return await _reserve_capture(ctx, "reserve_capture_spread_32", shared=False)


async def reserve_capture_gateway(ctx: Context) -> Stats:
    """reserve_capture_spread_32 as the LiteLLM hook sends it: reservations by
    estimate, captured by usage (each capture records a usage event)."""
    prepared = await prepare_reserve_capture(
        ctx, "reserve_capture_gateway_32", shared=False, gateway=True
    )
    return await prepared.run_all()


async def reserve_capture_spread_policy(ctx: Context) -> Stats:
    """reserve_capture_spread_32 on wallets that each have a spend policy."""
    return await _reserve_capture(
        ctx, "reserve_capture_spread_32_policy", shared=False, policy=True
    )


async def reserve_capture_shared(ctx: Context) -> Stats:
    """32 workers, all doing reserve-then-capture pairs on one shared team wallet."""
    return await _reserve_capture(ctx, "reserve_capture_shared_32", shared=True)
