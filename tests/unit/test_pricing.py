"""service/pricing.py: the limits of a rate and the USD converter, exactly (the cost
formula is SQL's: tests/db/test_usage_cost.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.pricing import (
    MAX_RATE_PER_MTOK,
    PriceRates,
    credits_per_mtok_from_usd_per_token,
    rates_from_litellm,
)


def test_rates_outside_the_limits_are_refused() -> None:
    """A rate below 0 or above 10^9 credits/Mtok is not a price."""
    with pytest.raises(ValueError, match="output_per_mtok must be between 0 and 1000000000"):
        PriceRates(0, 0, MAX_RATE_PER_MTOK + 1)
    with pytest.raises(ValueError, match="input_per_mtok must be between 0 and 1000000000"):
        PriceRates(-1, 0, 0)


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
