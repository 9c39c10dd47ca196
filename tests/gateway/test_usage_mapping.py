"""Provider usage blocks map onto the service's UsageCounts, checked against
recorded responses in tests/gateway/fixtures/ (each names what it expects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenledger_client import UsageCounts, usage_counts

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.json"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_recorded_response_maps_to_expected_counts(path: Path) -> None:
    """A recorded response's usage (or the whole response) maps to the counts it expects."""
    fixture = json.loads(path.read_text())
    expected = UsageCounts(model="m", **fixture["expected"])
    response = fixture["response"]
    usage = response.get("usage") or response.get("usageMetadata")
    assert usage_counts("m", usage) == expected
    assert usage_counts("m", response) == expected


def test_litellm_normalises_anthropic_usage_to_the_same_counts() -> None:
    """LiteLLM's own Usage of an Anthropic response maps to the same counts as
    Anthropic's raw usage block (pins LiteLLM's prompt_tokens convention)."""
    from litellm.llms.anthropic.chat.transformation import AnthropicConfig

    for name in ("anthropic_cache_read", "anthropic_cache_write", "anthropic_mixed"):
        raw = json.loads((Path(__file__).parent / "fixtures" / f"{name}.json").read_text())
        usage = raw["response"]["usage"]
        normalised = AnthropicConfig().calculate_usage(usage_object=usage, reasoning_content=None)
        assert usage_counts("m", normalised) == usage_counts("m", usage), name


def test_litellm_usage_object_of_an_openai_call() -> None:
    """A LiteLLM Usage object with cached prompt tokens maps like the OpenAI dict."""
    import litellm
    from litellm.types.utils import PromptTokensDetailsWrapper

    usage = litellm.Usage(
        prompt_tokens=1200,
        completion_tokens=50,
        total_tokens=1250,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=800),
    )
    assert usage_counts("m", usage) == UsageCounts("m", 1200, 50, cached_input_tokens=800)


def test_unknown_shapes_are_refused() -> None:
    """A block with no known token fields raises instead of charging zero."""
    with pytest.raises(ValueError):
        usage_counts("m", {"tokens": 5})
    with pytest.raises(ValueError):
        usage_counts("m", {"prompt_tokens": -1, "completion_tokens": 2})
