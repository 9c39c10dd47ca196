"""service/pricing.py: the cost formula of API.md and the USD converter, exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.pricing import (
    MAX_RATE_PER_MTOK,
    MAX_TOKENS,
    PriceRates,
    credits_per_mtok_from_usd_per_token,
    max_output_tokens_for,
    rates_from_litellm,
    usage_cost,
)

# 2.5 / 1.25 / 10 credits per token at the default 10^6 credits per USD.
GPT = PriceRates(
    input_per_mtok=2_500_000, cached_input_per_mtok=1_250_000, output_per_mtok=10_000_000
)
CHEAP = PriceRates(input_per_mtok=150, cached_input_per_mtok=75, output_per_mtok=600)
TOP = PriceRates(MAX_RATE_PER_MTOK, MAX_RATE_PER_MTOK, MAX_RATE_PER_MTOK)


def test_cost_of_a_plain_event() -> None:
    """1000 input and 500 output tokens cost input and output at their rates."""
    assert usage_cost(1000, 0, 500, GPT) == 2500 + 5000


def test_cached_tokens_are_part_of_input_and_billed_at_the_cached_rate() -> None:
    """Of 1000 input tokens, the 400 cached ones are billed at the cached rate only."""
    assert usage_cost(1000, 400, 0, GPT) == 2000  # 600 * 2.5 + 400 * 1.25


def test_zero_output_and_zero_everything() -> None:
    """No output tokens costs the input alone; no tokens at all cost nothing."""
    assert usage_cost(10, 0, 0, GPT) == 25
    assert usage_cost(0, 0, 0, GPT) == 0


def test_one_token_rounds_up_to_one_credit() -> None:
    """A single token at a rate below one credit per token still costs one credit."""
    assert usage_cost(1, 0, 0, CHEAP) == 1
    assert usage_cost(0, 0, 1, CHEAP) == 1
    assert usage_cost(1, 1, 0, CHEAP) == 1


def test_rounded_up_once_per_event_not_per_token_class() -> None:
    """Fractions of the token classes add up before the single rounding."""
    # 1 * 150 + 1 * 75 + 1 * 600 = 825 millionths: one credit, not three.
    assert usage_cost(2, 1, 1, CHEAP) == 1
    # Exactly 10^6 millionths is one credit; one millionth more is two.
    rates = PriceRates(1, 1, 1)
    assert usage_cost(1_000_000, 0, 0, rates) == 1
    assert usage_cost(1_000_000, 0, 1, rates) == 2


def test_counts_and_rates_at_their_limits_do_not_overflow() -> None:
    """10^9 tokens of each class at 10^9 credits/Mtok cost exactly 2 * 10^12 credits."""
    assert usage_cost(MAX_TOKENS, 0, MAX_TOKENS, TOP) == 2 * 10**12
    assert usage_cost(MAX_TOKENS, MAX_TOKENS, MAX_TOKENS, TOP) == 2 * 10**12
    near = PriceRates(MAX_RATE_PER_MTOK - 1, 3, MAX_RATE_PER_MTOK)
    # (10^9 - 1 - 7) * (10^9 - 1) + 7 * 3 + (10^9 - 1) * 10^9, over 10^6, rounded up.
    exact = (MAX_TOKENS - 8) * (MAX_RATE_PER_MTOK - 1) + 21 + (MAX_TOKENS - 1) * MAX_RATE_PER_MTOK
    assert usage_cost(MAX_TOKENS - 1, 7, MAX_TOKENS - 1, near) == -(-exact // 10**6)
    assert usage_cost(MAX_TOKENS - 1, 7, MAX_TOKENS - 1, near) == 1_999_999_990_001


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ((-1, 0, 0), "input_tokens must be between 0 and 1000000000"),
        ((0, 0, -1), "output_tokens must be between 0 and 1000000000"),
        ((MAX_TOKENS + 1, 0, 0), "input_tokens must be between 0 and 1000000000"),
        ((5, 6, 0), "cached_input_tokens counts among input_tokens"),
    ],
)
def test_bad_counts_are_refused(counts: tuple[int, int, int], message: str) -> None:
    """Negative, too large, or more cached than input tokens raise ValueError."""
    with pytest.raises(ValueError, match=message):
        usage_cost(*counts, GPT)


def test_rates_outside_the_limits_are_refused() -> None:
    """A rate below 0 or above 10^9 credits/Mtok is not a price."""
    with pytest.raises(ValueError, match="output_per_mtok must be between 0 and 1000000000"):
        PriceRates(0, 0, MAX_RATE_PER_MTOK + 1)
    with pytest.raises(ValueError, match="input_per_mtok must be between 0 and 1000000000"):
        PriceRates(-1, 0, 0)


def test_max_output_tokens_for_a_budget() -> None:
    """The largest output whose event fits the budget, and never one token more."""
    # 1000 input tokens cost 2500; 10 credits per output token leaves room for 750.
    assert max_output_tokens_for(10_000, 1000, GPT) == 750
    assert usage_cost(1000, 0, 750, GPT) == 10_000
    assert usage_cost(1000, 0, 751, GPT) == 10_010
    # A partial credit of rounding headroom still counts: 600 millionths per token.
    assert max_output_tokens_for(1, 0, CHEAP) == 1666
    assert usage_cost(0, 0, 1666, CHEAP) == 1
    assert usage_cost(0, 0, 1667, CHEAP) == 2
    assert max_output_tokens_for(10_000, 1000, GPT, cached_input_tokens=1000) == 875


def test_max_output_tokens_edges() -> None:
    """Input over budget leaves 0; free output is capped at the token limit."""
    assert max_output_tokens_for(2499, 1000, GPT) == 0
    assert max_output_tokens_for(2500, 1000, GPT) == 0
    assert max_output_tokens_for(5, 0, PriceRates(1, 1, 0)) == MAX_TOKENS
    assert max_output_tokens_for(10**15, 0, PriceRates(1, 1, 1)) == MAX_TOKENS
    with pytest.raises(ValueError, match="budget must be a non-negative int"):
        max_output_tokens_for(-1, 0, GPT)


@pytest.mark.parametrize(
    ("usd", "credits_per_usd", "credits"),
    [
        ("2.5e-06", 1_000_000, 2_500_000),
        (Decimal("1e-05"), 1_000_000, 10_000_000),
        ("1.5e-07", 1_000_000, 150_000),
        ("0", 1_000_000, 0),
        (0, 1_000_000, 0),
        # 3.33e-7 USD at 1000 credits/USD is 333 credits/Mtok exactly.
        ("3.33e-07", 1000, 333),
        # Halves round away from zero, below them down.
        ("2.5e-09", 100, 0),
        ("5e-09", 100, 1),
        ("4.9e-09", 100, 0),
        ("1.5e-08", 100, 2),
        ("1e-03", 1_000_000, MAX_RATE_PER_MTOK),
    ],
)
def test_usd_per_token_to_credits_per_mtok(
    usd: str | Decimal | int, credits_per_usd: int, credits: int
) -> None:
    """USD per token times credits per USD times 10^6, rounded to the nearest credit."""
    assert credits_per_mtok_from_usd_per_token(usd, credits_per_usd) == credits


@pytest.mark.parametrize(
    ("usd", "credits_per_usd", "error", "message"),
    [
        ("-1e-06", 1_000_000, ValueError, "finite number >= 0"),
        ("NaN", 1_000_000, ValueError, "finite number >= 0"),
        ("Infinity", 1_000_000, ValueError, "finite number >= 0"),
        ("abc", 1_000_000, ValueError, "not a number"),
        ("1.1e-03", 1_000_000, ValueError, "above the limit 1000000000"),
        ("1e+30", 1_000_000, ValueError, "above the limit 1000000000"),
        ("1e-06", 0, ValueError, "credits_per_usd must be positive"),
        (2.5e-06, 1_000_000, TypeError, "not a float"),
    ],
)
def test_converter_refuses_bad_input(
    usd: object, credits_per_usd: int, error: type[Exception], message: str
) -> None:
    """Negative, non-finite, non-numeric, float or out-of-range prices are refused."""
    with pytest.raises(error, match=message):
        credits_per_mtok_from_usd_per_token(usd, credits_per_usd)  # type: ignore[arg-type]


def test_rates_from_a_litellm_map() -> None:
    """Notes and sample_spec are ignored, per-call entries skipped, no cache rate means input."""
    parsed = rates_from_litellm(
        {
            "_comment": "ignored",
            "sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0},
            "gpt-4o": {
                "input_cost_per_token": Decimal("2.5e-06"),
                "cache_read_input_token_cost": Decimal("1.25e-06"),
                "output_cost_per_token": Decimal("1e-05"),
            },
            "gemini/gemini-1.5-pro": {
                "input_cost_per_token": Decimal("1.25e-06"),
                "output_cost_per_token": Decimal("5e-06"),
            },
            "dall-e-3": {"input_cost_per_pixel": 0},
            "bad name": {"input_cost_per_token": 0, "output_cost_per_token": 0},
            "too-dear": {"input_cost_per_token": Decimal("1"), "output_cost_per_token": 0},
        },
        1_000_000,
    )
    assert parsed.rates == {
        "gpt-4o": PriceRates(2_500_000, 1_250_000, 10_000_000),
        "gemini/gemini-1.5-pro": PriceRates(1_250_000, 1_250_000, 5_000_000),
    }
    assert parsed.skipped == {
        "dall-e-3": "no input_cost_per_token or output_cost_per_token",
        "bad name": "model name does not match ^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$",
        "too-dear": "1 USD/token is 1000000000000 credits per Mtok, above the limit 1000000000",
    }
