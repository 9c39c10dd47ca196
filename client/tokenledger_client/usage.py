"""Provider usage blocks -> the service's `UsageCounts`.

The service counts like OpenAI: `input_tokens` is every prompt token, cached
ones included, and `cached_input_tokens` (a part of it) is billed at the
cached rate; `output_tokens` includes reasoning tokens. Providers differ:

* OpenAI Chat Completions: `prompt_tokens` (cached included),
  `prompt_tokens_details.cached_tokens`, `completion_tokens` (reasoning
  included). LiteLLM's `Usage` has this shape for every provider.
* OpenAI Responses: `input_tokens` (cached included),
  `input_tokens_details.cached_tokens`, `output_tokens`.
* Anthropic Messages: `input_tokens` EXCLUDES both `cache_read_input_tokens`
  and `cache_creation_input_tokens`, so the prompt is the sum of the three;
  cache reads are the cached part. Cache writes are billed as ordinary input
  (the ledger has no cache-write rate; Anthropic charges them 1.25x, so this
  undercharges them by a quarter of the input rate: documented in the README).
* Gemini: `promptTokenCount` (cached included), `cachedContentTokenCount`,
  `candidatesTokenCount` + `thoughtsTokenCount`.

tests/client/test_usage_mapping.py checks each against recorded responses in
tests/client/fixtures/.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenledger_client.models import UsageCounts

__all__ = ["usage_counts", "as_mapping"]


def as_mapping(obj: Any) -> dict[str, Any]:
    """A plain dict from a dict, a pydantic model (LiteLLM's Usage) or an object."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        try:
            return dict(dump())
        except Exception:  # noqa: S110, BLE001  # why: fall back to attributes below
            pass
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(f"cannot read a usage block from {type(obj).__name__}")


def _int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a token count must be a number, not {value!r}")
    if value < 0:
        raise ValueError(f"a token count cannot be negative: {value}")
    return int(value)


def _details(usage: dict[str, Any], name: str) -> dict[str, Any]:
    return as_mapping(usage.get(name))


def usage_counts(model: str, usage: Any) -> UsageCounts:
    """Map a provider's usage block (a dict or LiteLLM `Usage`) onto `UsageCounts`
    for the price model `model`. A whole response is accepted too (its
    `usage` or `usageMetadata` is read)."""
    u = as_mapping(usage)
    if "usage" in u and not any(k in u for k in ("prompt_tokens", "input_tokens")):
        u = as_mapping(u["usage"])
    elif "usageMetadata" in u:
        u = as_mapping(u["usageMetadata"])

    if "prompt_tokens" in u or "completion_tokens" in u:
        # OpenAI Chat convention (and LiteLLM's normalised Usage).
        prompt = _int(u.get("prompt_tokens"))
        cached = _int(_details(u, "prompt_tokens_details").get("cached_tokens"))
        if cached == 0 and u.get("cache_read_input_tokens"):
            # LiteLLM keeps Anthropic's cache reads here as well; prompt_tokens
            # already includes them.
            cached = _int(u.get("cache_read_input_tokens"))
        output = _int(u.get("completion_tokens"))
    elif "promptTokenCount" in u or "candidatesTokenCount" in u:
        prompt = _int(u.get("promptTokenCount"))
        cached = _int(u.get("cachedContentTokenCount"))
        output = _int(u.get("candidatesTokenCount")) + _int(u.get("thoughtsTokenCount"))
    elif "input_tokens_details" in u:
        # OpenAI Responses convention: input_tokens includes the cached ones.
        prompt = _int(u.get("input_tokens"))
        cached = _int(_details(u, "input_tokens_details").get("cached_tokens"))
        output = _int(u.get("output_tokens"))
    elif "input_tokens" in u or "output_tokens" in u:
        # Anthropic convention: input_tokens excludes cache reads and writes.
        read = _int(u.get("cache_read_input_tokens"))
        written = _int(u.get("cache_creation_input_tokens"))
        prompt = _int(u.get("input_tokens")) + read + written
        cached = read
        output = _int(u.get("output_tokens"))
    else:
        raise ValueError(f"not a usage block this client knows: keys {sorted(u)}")
    # A provider that reports more cached than prompt tokens is wrong, and the
    # service would refuse it; bill the prompt, all of it cached.
    return UsageCounts(
        model=model,
        input_tokens=prompt,
        cached_input_tokens=min(cached, prompt),
        output_tokens=output,
    )
