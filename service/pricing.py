"""Prices in: LiteLLM's USD-per-token map to credits per million tokens,
exactly (`tokenledger prices import`), and the limits of a rate and of a
token count. Pure functions, no I/O (STYLE.md, Layout).

A price gives a model's rates in credits per million tokens (Mtok). What a
usage event costs is computed in one place, `tl_usage_cost` in schema.sql
(README, Prices; its cases are tests/db/test_usage_cost.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

TOKENS_PER_MTOK = 1_000_000
# Limits of a rate and of a token count of one event (schema.sql CHECKs the
# rates too). Their largest products sum to 2 * 10^18, within a signed 64-bit
# integer, so tl_usage_cost's sum never overflows, and the largest cost
# (2 * 10^12 credits) is far below 2^53.
MAX_RATE_PER_MTOK = 10**9
MAX_TOKENS = 10**9


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
