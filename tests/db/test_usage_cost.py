"""tl_usage_cost and tl_estimate (schema.sql): the cost formula of README,
Prices, exactly, and the largest output an estimate's budget covers. The
service prices in SQL only; these are the cases that pin its arithmetic."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from service.pricing import MAX_RATE_PER_MTOK, MAX_TOKENS, PriceRates
from tests.costs import sql_costs

# 2.5 / 1.25 / 10 credits per token at the default 10^6 credits per USD.
GPT = PriceRates(
    input_per_mtok=2_500_000, cached_input_per_mtok=1_250_000, output_per_mtok=10_000_000
)
CHEAP = PriceRates(input_per_mtok=150, cached_input_per_mtok=75, output_per_mtok=600)
TOP = PriceRates(MAX_RATE_PER_MTOK, MAX_RATE_PER_MTOK, MAX_RATE_PER_MTOK)
NOW = datetime(2030, 1, 1, tzinfo=UTC)


async def cost(db: asyncpg.Connection, rates: PriceRates, i: int, c: int, o: int) -> int:
    (credits,) = await sql_costs(db, rates, [(i, c, o)])
    return credits


async def test_cost_of_a_plain_event(db: asyncpg.Connection) -> None:
    """1000 input and 500 output tokens cost input and output at their rates."""
    assert await cost(db, GPT, 1000, 0, 500) == 2500 + 5000


async def test_cached_tokens_are_part_of_input_and_billed_at_the_cached_rate(
    db: asyncpg.Connection,
) -> None:
    """Of 1000 input tokens, the 400 cached ones are billed at the cached rate only."""
    assert await cost(db, GPT, 1000, 400, 0) == 2000  # 600 * 2.5 + 400 * 1.25


async def test_zero_output_and_zero_everything(db: asyncpg.Connection) -> None:
    """No output tokens costs the input alone; no tokens at all cost nothing."""
    assert await sql_costs(db, GPT, [(10, 0, 0), (0, 0, 0)]) == [25, 0]


async def test_one_token_rounds_up_to_one_credit(db: asyncpg.Connection) -> None:
    """A single token at a rate below one credit per token still costs one credit."""
    assert await sql_costs(db, CHEAP, [(1, 0, 0), (0, 0, 1), (1, 1, 0)]) == [1, 1, 1]


async def test_rounded_up_once_per_event_not_per_token_class(db: asyncpg.Connection) -> None:
    """Fractions of the token classes add up before the single rounding."""
    # 1 * 150 + 1 * 75 + 1 * 600 = 825 millionths: one credit, not three.
    assert await cost(db, CHEAP, 2, 1, 1) == 1
    # Exactly 10^6 millionths is one credit; one millionth more is two.
    rates = PriceRates(1, 1, 1)
    assert await sql_costs(db, rates, [(1_000_000, 0, 0), (1_000_000, 0, 1)]) == [1, 2]


async def test_counts_and_rates_at_their_limits_do_not_overflow(db: asyncpg.Connection) -> None:
    """10^9 tokens of each class at 10^9 credits/Mtok cost exactly 2 * 10^12 credits."""
    assert await sql_costs(
        db, TOP, [(MAX_TOKENS, 0, MAX_TOKENS), (MAX_TOKENS, MAX_TOKENS, MAX_TOKENS)]
    ) == [2 * 10**12, 2 * 10**12]
    near = PriceRates(MAX_RATE_PER_MTOK - 1, 3, MAX_RATE_PER_MTOK)
    # (10^9 - 1 - 7) * (10^9 - 1) + 7 * 3 + (10^9 - 1) * 10^9, over 10^6, rounded up.
    exact = (MAX_TOKENS - 8) * (MAX_RATE_PER_MTOK - 1) + 21 + (MAX_TOKENS - 1) * MAX_RATE_PER_MTOK
    got = await cost(db, near, MAX_TOKENS - 1, 7, MAX_TOKENS - 1)
    assert got == -(-exact // 10**6) == 1_999_999_990_001


@pytest.mark.parametrize("counts", [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (5, 6, 0)], ids=str)
async def test_bad_counts_are_refused(db: asyncpg.Connection, counts: tuple[int, int, int]) -> None:
    """Negative counts, or more cached than input tokens, raise invalid_request (TLD01)."""
    with pytest.raises(asyncpg.PostgresError, match="token counts must be >= 0") as raised:
        await cost(db, GPT, *counts)
    assert raised.value.sqlstate == "TLD01"


async def test_no_price_version_costs_null(db: asyncpg.Connection) -> None:
    """Without a price version (a NULL row) the cost is NULL: the caller answers unknown_model."""
    assert await db.fetchval("SELECT tl_usage_cost(NULL::prices, 1, 0, 1)") is None


# tl_estimate: the most output tokens a wallet's credits cover -------------------


async def estimate(
    db: asyncpg.Connection,
    rates: PriceRates,
    available: int,
    input_tokens: int,
    max_output_tokens: int,
    min_output_tokens: int = 0,
) -> dict[str, Any]:
    """tl_estimate for a model priced at `rates` since before NOW."""
    model = f"m-{rates.input_per_mtok}-{rates.cached_input_per_mtok}-{rates.output_per_mtok}"
    await db.execute(
        "INSERT INTO prices (id, model, effective_from, input_per_mtok, cached_input_per_mtok,"
        " output_per_mtok, source) VALUES (gen_random_uuid(), $1, '2020-01-01', $2, $3, $4, 'test')"
        " ON CONFLICT (model, effective_from) DO NOTHING",
        model,
        rates.input_per_mtok,
        rates.cached_input_per_mtok,
        rates.output_per_mtok,
    )
    args = {
        "model": model,
        "input_tokens": input_tokens,
        "max_output_tokens": max_output_tokens,
        "min_output_tokens": min_output_tokens,
    }
    answer = await db.fetchval(
        "SELECT tl_estimate($1::jsonb, $2, $3, 'employee:e-1')", json.dumps(args), available, NOW
    )
    return json.loads(answer)  # type: ignore[no-any-return]


async def test_estimate_covers_the_most_output_a_budget_allows(db: asyncpg.Connection) -> None:
    """The largest output whose event fits the budget, and never one token more."""
    # 1000 input tokens cost 2500; 10 credits per output token leaves room for 750.
    out = await estimate(db, GPT, 10_000, 1000, MAX_TOKENS)
    assert (out["max_output_tokens_allowed"], out["amount"]) == (750, 10_000)
    assert await sql_costs(db, GPT, [(1000, 0, 750), (1000, 0, 751)]) == [10_000, 10_010]
    # A partial credit of rounding headroom still counts: 600 millionths per token.
    out = await estimate(db, CHEAP, 1, 0, MAX_TOKENS)
    assert (out["max_output_tokens_allowed"], out["amount"]) == (1666, 1)
    assert await sql_costs(db, CHEAP, [(0, 0, 1666), (0, 0, 1667)]) == [1, 2]


async def test_estimate_edges(db: asyncpg.Connection) -> None:
    """Input that uses the whole budget leaves 0 output; input over it is refused;
    a budget that covers the worst case reserves max_output_tokens, free output too."""
    out = await estimate(db, GPT, 2500, 1000, 500)
    assert (out["max_output_tokens_allowed"], out["amount"]) == (0, 2500)
    with pytest.raises(asyncpg.PostgresError, match="has 2499 credits available") as raised:
        await estimate(db, GPT, 2499, 1000, 500)
    assert raised.value.sqlstate == "TLB01"
    out = await estimate(db, PriceRates(1, 1, 1), 10**15, 0, MAX_TOKENS)
    assert (out["max_output_tokens_allowed"], out["amount"]) == (MAX_TOKENS, 1000)
    out = await estimate(db, PriceRates(1_000_000, 1, 0), 5, 1, MAX_TOKENS)
    assert (out["max_output_tokens_allowed"], out["amount"]) == (MAX_TOKENS, 1)
