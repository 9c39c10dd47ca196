"""Prices to credits: pure functions, no I/O (STYLE.md, Layout).

A price gives a model's rates in credits per million tokens (Mtok). The cost
of one usage event (API.md, Metering and prices) is

    ceil(((input - cached) * input_per_mtok + cached * cached_input_per_mtok
          + output * output_per_mtok) / 10^6)

computed here in integers only and rounded up once per event, never per
token class. `tl_usage_cost` in schema.sql computes the same in SQL; a test
holds the two together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Protocol

TOKENS_PER_MTOK = 1_000_000
# Limits of a rate and of a token count of one event (schema.sql CHECKs the
# rates too). Their largest products sum to 2 * 10^18, within a signed 64-bit
# integer, so the SQL side never overflows either, and the largest cost
# (2 * 10^12 credits) is far below 2^53.
MAX_RATE_PER_MTOK = 10**9
MAX_TOKENS = 10**9


class Rates(Protocol):
    """What a cost needs from a price version."""

    @property
    def input_per_mtok(self) -> int: ...
    @property
    def cached_input_per_mtok(self) -> int: ...
    @property
    def output_per_mtok(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PriceRates:
    """The rates of one price version, in credits per million tokens."""

    input_per_mtok: int
    cached_input_per_mtok: int
    output_per_mtok: int

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok"):
            _check_range(name, getattr(self, name), MAX_RATE_PER_MTOK)


def _check_range(name: str, value: int, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= most:
        raise ValueError(f"{name} must be between 0 and {most}, got {value}")


def _numerator(
    input_tokens: int, cached_input_tokens: int, output_tokens: int, price: Rates
) -> int:
    """The cost times 10^6, exactly."""
    _check_range("input_tokens", input_tokens, MAX_TOKENS)
    _check_range("cached_input_tokens", cached_input_tokens, MAX_TOKENS)
    _check_range("output_tokens", output_tokens, MAX_TOKENS)
    if cached_input_tokens > input_tokens:
        raise ValueError(
            "cached_input_tokens counts among input_tokens, so it cannot exceed it "
            f"({cached_input_tokens} > {input_tokens})"
        )
    return (
        (input_tokens - cached_input_tokens) * price.input_per_mtok
        + cached_input_tokens * price.cached_input_per_mtok
        + output_tokens * price.output_per_mtok
    )


def usage_cost(
    input_tokens: int, cached_input_tokens: int, output_tokens: int, price: Rates
) -> int:
    """The credits one usage event costs: the exact cost rounded up once.

    `input_tokens` counts every prompt token, the cached ones included;
    `output_tokens` includes reasoning tokens. Raises ValueError for negative
    or too large counts and for more cached than input tokens.
    """
    numerator = _numerator(input_tokens, cached_input_tokens, output_tokens, price)
    return -(-numerator // TOKENS_PER_MTOK)


def max_output_tokens_for(
    budget: int, input_tokens: int, price: Rates, *, cached_input_tokens: int = 0
) -> int:
    """The most output tokens whose event still costs at most `budget` credits
    (0 when the input alone costs more), capped at MAX_TOKENS, which is also
    the answer when output is free. For sizing a reservation's `max_tokens`."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    base = _numerator(input_tokens, cached_input_tokens, 0, price)
    # ceil(x / 10^6) <= budget exactly when x <= budget * 10^6 (budget is whole).
    room = budget * TOKENS_PER_MTOK - base
    if room < 0:
        return 0
    if price.output_per_mtok == 0:
        return MAX_TOKENS
    return min(room // price.output_per_mtok, MAX_TOKENS)


def credits_per_mtok_from_usd_per_token(usd: Decimal | str | int, credits_per_usd: int) -> int:
    """A USD-per-token price (LiteLLM's `input_cost_per_token`) as credits per
    million tokens, rounded to the nearest credit, halves away from zero.

    Pass the USD figure as a Decimal or as its decimal text (parse JSON with
    `parse_float=Decimal`): a binary float has already lost the exact value.
    Raises ValueError for a negative, non-finite or out-of-range result.
    """
    if isinstance(usd, float):
        raise TypeError("pass the USD price as a Decimal or str, not a float")
    if isinstance(credits_per_usd, bool) or not isinstance(credits_per_usd, int):
        raise TypeError("credits_per_usd must be an int")
    if credits_per_usd <= 0:
        raise ValueError(f"credits_per_usd must be positive, got {credits_per_usd}")
    try:
        amount = Decimal(usd)
    except InvalidOperation:
        raise ValueError(f"not a number: {usd!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"a USD price must be a finite number >= 0, got {usd!r}")
    exact = amount * credits_per_usd * TOKENS_PER_MTOK
    # Checked before rounding: quantize() refuses numbers beyond the context's precision.
    credits = (
        int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        if exact <= MAX_RATE_PER_MTOK
        else MAX_RATE_PER_MTOK + 1
    )
    if credits > MAX_RATE_PER_MTOK:
        raise ValueError(
            f"{usd} USD/token is {exact} credits per Mtok, above the limit {MAX_RATE_PER_MTOK}"
        )
    return credits


# The model names schema.sql accepts (prices_model_format).
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
_MODEL = re.compile(MODEL_PATTERN)


@dataclass(frozen=True, slots=True)
class LiteLLMRates:
    """What a LiteLLM price map yields: rates by model, and what was skipped (and why)."""

    rates: dict[str, PriceRates]
    skipped: dict[str, str]


def rates_from_litellm(prices: Mapping[str, Any], credits_per_usd: int) -> LiteLLMRates:
    """Rates from a map in LiteLLM's `model_prices_and_context_window.json`
    format, parsed with `parse_float=Decimal`. Keys starting with `_` (notes)
    and `sample_spec` (LiteLLM's schema description) are ignored; entries
    without both `input_cost_per_token` and `output_cost_per_token` (images,
    embeddings priced per call) are skipped, as are names or prices outside
    the limits. A missing `cache_read_input_token_cost` means cached tokens
    cost the same as other input tokens."""
    rates: dict[str, PriceRates] = {}
    skipped: dict[str, str] = {}
    for model, entry in prices.items():
        if model.startswith("_") or model == "sample_spec":
            continue
        if not isinstance(entry, Mapping):
            skipped[model] = "not an object"
            continue
        usd_in = entry.get("input_cost_per_token")
        usd_out = entry.get("output_cost_per_token")
        if usd_in is None or usd_out is None:
            skipped[model] = "no input_cost_per_token or output_cost_per_token"
            continue
        usd_cached = entry.get("cache_read_input_token_cost")
        if usd_cached is None:
            usd_cached = usd_in
        if not _MODEL.match(model):
            skipped[model] = f"model name does not match {MODEL_PATTERN}"
            continue
        try:
            rates[model] = PriceRates(
                input_per_mtok=_usd(usd_in, credits_per_usd),
                cached_input_per_mtok=_usd(usd_cached, credits_per_usd),
                output_per_mtok=_usd(usd_out, credits_per_usd),
            )
        except (TypeError, ValueError) as exc:
            skipped[model] = str(exc)
    return LiteLLMRates(rates, skipped)


def _usd(value: Any, credits_per_usd: int) -> int:
    if isinstance(value, float):
        # A caller that parsed with plain floats: the shortest repr is the
        # decimal text the file most likely had.
        value = repr(value)
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
        raise TypeError(f"a USD price must be a number, got {value!r}")
    return credits_per_mtok_from_usd_per_token(value, credits_per_usd)
