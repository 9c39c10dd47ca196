"""End to end: a real LiteLLM proxy with the tokenledger hook, a real
tokenledger process, models answered by `mock_response` (no network)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from service.audit import run_audit  # noqa: F401  # why: assert_audit_clean uses it
from tests.api.conftest import assert_audit_clean
from tests.gateway.conftest import (
    GATEWAY_MODEL,
    Ledger,
    Proxy,
    cost_of,
    wait_until,
)

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in one sentence."}]


def mock_response(prompt: int, completion: int, cached: int = 0, text: str = "Done.") -> dict:
    """A whole mocked response object with its own usage (LITELLM.md)."""
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }  # fmt: skip


async def chat(proxy: Proxy, user: str, **body: Any) -> httpx.Response:
    async with proxy.client() as c:
        return await c.post(
            "/chat/completions",
            json={"model": GATEWAY_MODEL, "messages": MESSAGES, "user": user, **body},
        )


async def test_call_reserves_caps_max_tokens_and_captures_exact_cost(
    ledger: Ledger, proxy: Proxy
) -> None:
    """A call reserves by estimate, gets max_tokens capped to what the wallet
    covers, and is captured at the exact cost of its usage, cached tokens at
    the cached rate."""
    # 2,000 credits: the ~20-token prompt plus at most ~495 output tokens.
    emp = ledger.employee(2_000)
    mocked = mock_response(prompt=1_200, completion=50, cached=800)
    r = await chat(proxy, emp, max_tokens=2_000, mock_response=mocked)
    assert r.status_code == 200, r.text + proxy.log_tail()
    rsv_id = r.headers["x-tokenledger-reservation"]
    capped = int(r.headers["x-tokenledger-max-tokens"])
    assert 0 < capped < 2_000
    expected = cost_of(1_200, 50, cached=800)  # 400 + 200 + 200 = 800
    assert expected == 800
    assert int(r.headers["x-tokenledger-cost"]) == expected
    rsv = ledger.get(f"/v1/reservations/{rsv_id}")
    assert rsv["status"] == "captured" and rsv["captured"] == expected
    # The hold is the counted prompt plus `capped` output tokens, the most
    # that 2,000 credits cover (LITELLM.md: the max_tokens the pre-call hook
    # sets is the one LiteLLM sends to the model).
    prompt = rsv["amount"] - 4 * capped
    assert 0 < prompt < 100
    wallet = ledger.account(f"employee:{emp}")
    assert (wallet["posted"], wallet["reserved"]) == (2_000 - expected, 0)
    assert rsv["amount"] <= 2_000 and rsv["amount"] + 4 > 2_000  # the cap used what was there


async def test_failing_call_releases(ledger: Ledger, proxy: Proxy) -> None:
    """A call whose model fails releases its reservation and charges nothing."""
    emp = ledger.employee(10_000)
    r = await chat(proxy, emp, max_tokens=100, mock_response="litellm.InternalServerError")
    assert r.status_code >= 500, r.text
    address = f"employee:{emp}"
    await wait_until(lambda: not ledger.reservations(address, "active"))
    [rsv] = ledger.reservations(address)
    assert rsv["status"] == "released"
    wallet = ledger.account(address)
    assert (wallet["posted"], wallet["reserved"], wallet["available"]) == (10_000, 0, 10_000)


async def test_cancelled_stream_releases(ledger: Ledger, proxy: Proxy) -> None:
    """A stream the client abandons after its first chunk releases its reservation."""
    emp = ledger.employee(100_000)
    address = f"employee:{emp}"
    long_text = " ".join(f"word{i}" for i in range(3_000))
    async with proxy.client() as c:
        async with c.stream(
            "POST", "/chat/completions",
            json={"model": GATEWAY_MODEL, "messages": MESSAGES, "user": emp, "stream": True,
                  "max_tokens": 5_000, "mock_response": long_text},
        ) as r:  # fmt: skip
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break  # the client goes away mid-stream
    await wait_until(lambda: not ledger.reservations(address, "active"), within=15)
    [rsv] = ledger.reservations(address)
    assert rsv["status"] == "released", rsv
    wallet = ledger.account(address)
    assert (wallet["posted"], wallet["reserved"]) == (100_000, 0)


async def test_finished_stream_captures_once(ledger: Ledger, proxy: Proxy) -> None:
    """A stream read to its end is captured once, at its end, by the usage of
    its final chunk (the client asked for it here, so it can check the cost)."""
    emp = ledger.employee(100_000)
    address = f"employee:{emp}"
    async with proxy.client() as c:
        async with c.stream(
            "POST", "/chat/completions",
            json={"model": GATEWAY_MODEL, "messages": MESSAGES, "user": emp, "stream": True,
                  "stream_options": {"include_usage": True}, "max_tokens": 500,
                  "mock_response": "a short streamed answer"},
        ) as r:  # fmt: skip
            assert r.status_code == 200
            assert r.headers["x-tokenledger-max-tokens"] == "500"
            body = (await r.aread()).decode()
    assert "[DONE]" in body
    chunks = [json.loads(line[6:]) for line in body.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    [usage] = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    await wait_until(lambda: not ledger.reservations(address, "active"))
    [rsv] = ledger.reservations(address)
    expected = cost_of(usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["completion_tokens"] > 0
    assert (rsv["status"], rsv["captured"]) == ("captured", expected)
    assert ledger.account(address)["posted"] == 100_000 - expected


async def test_stream_without_usage_chunk_charges_counted_tokens(
    ledger: Ledger, proxy: Proxy
) -> None:
    """A stream whose client did not ask for usage is still charged its prompt
    and its output, never just the prompt."""
    emp = ledger.employee(100_000)
    address = f"employee:{emp}"
    async with proxy.client() as c:
        async with c.stream(
            "POST", "/chat/completions",
            json={"model": GATEWAY_MODEL, "messages": MESSAGES, "user": emp, "stream": True,
                  "max_tokens": 500, "mock_response": "a short streamed answer"},
        ) as r:  # fmt: skip
            assert r.status_code == 200
            await r.aread()
    await wait_until(lambda: not ledger.reservations(address, "active"))
    [rsv] = ledger.reservations(address)
    prompt = rsv["amount"] - 4 * 500  # the hold: counted prompt + 500 output tokens
    assert rsv["status"] == "captured"
    assert rsv["captured"] >= prompt + 4 * 3  # "a short streamed answer" is 4 tokens or so


async def test_twenty_calls_on_a_wallet_for_seven(ledger: Ledger, proxy: Proxy) -> None:
    """20 concurrent calls on a wallet that covers 7: 7 succeed, 13 get a 402,
    the audit passes and no reservation is left active."""
    # Each call reserves its prompt and 300 output tokens (all or nothing down
    # to 256) and uses exactly that, so a finished call frees nothing: after 7
    # the wallet holds less than the cost of 256 output tokens, whatever the order.
    probe = ledger.employee(1_000_000)
    r = await chat(proxy, probe, max_tokens=300, mock_response=mock_response(10, 10))
    assert r.status_code == 200, r.text
    per_call = ledger.reservations(f"employee:{probe}")[0]["amount"]
    prompt = per_call - 4 * 300  # the counted prompt, at 1 credit per token
    assert cost_of(prompt, 300) == per_call
    emp = ledger.employee(7 * per_call + 3 * 4)  # room for 7 and 3 output tokens more
    address = f"employee:{emp}"
    results = await asyncio.gather(
        *[chat(proxy, emp, max_tokens=300, mock_response=mock_response(prompt, 300))
          for _ in range(20)]
    )  # fmt: skip
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 7 + [402] * 13, [(r.status_code, r.text[:200]) for r in results]
    refusal = next(r for r in results if r.status_code == 402).json()
    assert "insufficient_credits" in str(refusal) and "credits" in str(refusal), refusal
    assert ledger.reservations(address, "active") == []
    wallet = ledger.account(address)
    assert (wallet["posted"], wallet["reserved"]) == (12, 0)
    await assert_audit_clean(ledger.dsn)
