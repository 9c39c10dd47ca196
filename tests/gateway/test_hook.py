"""The LiteLLM hook in-process, against a real tokenledger: who is charged,
and what happens when the ledger cannot be reached (fail-closed, fail-open,
a capture that gets no answer)."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg
import litellm
import pytest
from litellm.types.utils import PromptTokensDetailsWrapper

from tests.gateway.conftest import PRICE_MODEL, Ledger, cost_of
from tests.gateway.test_client import Faulty
from tokenledger_client import AsyncClient, RetryPolicy
from tokenledger_client.litellm_hook import HookConfig, Refusal, TokenledgerHook

MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]
NO_KEY_USER = SimpleNamespace(user_id=None, user_email=None)


def hook_for(ledger: Ledger, transport: Faulty | None = None, **settings: Any) -> TokenledgerHook:
    config = HookConfig(
        url=ledger.url, api_key=ledger.meter_key, model_aliases={"chat": PRICE_MODEL},
        retry_total_seconds=0.5, **settings,
    )  # fmt: skip
    hook = TokenledgerHook(config)
    hook._client = AsyncClient(
        ledger.url, ledger.meter_key, transport=transport,
        retry=RetryPolicy(total_seconds=0.5, backoff_initial_seconds=0.02),
    )  # fmt: skip
    return hook


def request(user: str, **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": list(MESSAGES), "user": user,
            "litellm_call_id": str(uuid.uuid4()), **extra}  # fmt: skip


def response(prompt: int, completion: int, cached: int = 0) -> litellm.ModelResponse:
    return litellm.ModelResponse(
        usage=litellm.Usage(
            prompt_tokens=prompt, completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=cached),
        )
    )  # fmt: skip


async def test_employee_is_resolved_by_key_user_then_request_user(ledger: Ledger) -> None:
    """The key's user wins over the request's `user`; emails go through the map;
    a plain employee id is used as it is; anything else is refused with 403."""
    hook = hook_for(ledger, employee_map={"Ada@Example.com": "e-1042", "u-7": "e-7"})
    assert hook.employee_for(NO_KEY_USER, {"user": "e-9"}) == "e-9"
    assert hook.employee_for(NO_KEY_USER, {"user": "Ada@Example.com"}) == "e-1042"
    key_user = SimpleNamespace(user_id="u-7", user_email=None)
    assert hook.employee_for(key_user, {"user": "e-9"}) == "e-7"
    for data in ({}, {"user": "stranger@example.com"}, {"user": "Not An Id"}):
        with pytest.raises(Refusal) as caught:
            hook.employee_for(NO_KEY_USER, data)
        assert caught.value.status_code == 403
    await hook.aclose()


def test_config_from_environment() -> None:
    """The alias table and employee map are JSON objects in the environment."""
    config = HookConfig.from_env({
        "TOKENLEDGER_URL": "http://ledger:8000", "TOKENLEDGER_API_KEY": "tlk_a_b",
        "TOKENLEDGER_MODEL_ALIASES": '{"chat-default": "gpt-4o-mini"}',
        "TOKENLEDGER_FAIL_MODE": "open",
    })  # fmt: skip
    assert config.model_aliases == {"chat-default": "gpt-4o-mini"}
    assert config.fail_mode == "open"
    with pytest.raises(ValueError):
        HookConfig.from_env({"TOKENLEDGER_URL": "http://ledger:8000"})


async def test_fail_closed_refuses_with_503(ledger: Ledger) -> None:
    """With the ledger unreachable and fail-closed, the call is refused with 503."""
    emp = ledger.employee(10_000)
    transport = Faulty()
    transport.down = True
    hook = hook_for(ledger, transport)
    with pytest.raises(Refusal) as caught:
        await hook.async_pre_call_hook(NO_KEY_USER, None, request(emp), "acompletion")
    assert caught.value.status_code == 503
    assert caught.value.headers["Retry-After"]
    await hook.aclose()


async def test_fail_open_records_the_usage_afterwards(ledger: Ledger) -> None:
    """With the ledger unreachable and fail-open, the call goes through
    uncapped and its usage is charged once when the ledger is back."""
    emp = ledger.employee(10_000)
    transport = Faulty()
    transport.down = True
    hook = hook_for(ledger, transport, fail_mode="open")
    data = request(emp, max_tokens=100)
    data = await hook.async_pre_call_hook(NO_KEY_USER, None, data, "acompletion")
    assert data["max_tokens"] == 100  # not capped: nothing was reserved
    await hook.async_post_call_success_hook(data, NO_KEY_USER, response(30, 20, cached=10))
    await asyncio.sleep(0.3)
    assert hook.flusher.pending_count == 1
    transport.down = False
    await hook.aclose()
    conn = await asyncpg.connect(ledger.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, sum(cost) AS cost FROM usage_events "
            "WHERE source = 'litellm' AND event_id = $1", data["litellm_call_id"],
        )  # fmt: skip
    finally:
        await conn.close()
    assert (row["n"], row["cost"]) == (1, cost_of(30, 20, cached=10))
    assert ledger.account(f"employee:{emp}")["posted"] == 10_000 - cost_of(30, 20, cached=10)


async def test_capture_without_an_answer_is_retried_with_its_key(ledger: Ledger) -> None:
    """A capture whose answer is lost, then finds the ledger down, is retried
    in the background with the same key and charged once."""
    emp = ledger.employee(10_000)
    transport = Faulty()
    hook = hook_for(ledger, transport)
    data = await hook.async_pre_call_hook(
        NO_KEY_USER, None, request(emp, max_tokens=100), "acompletion"
    )
    first_capture = len(transport.requests) + 1

    def drop_then_down(n: int, r: Any) -> Any:
        if n == first_capture:
            transport.down = True  # the next attempts find nothing listening
            return "drop"
        return None

    transport.fault = drop_then_down
    await hook.async_post_call_success_hook(data, NO_KEY_USER, response(40, 10))
    await asyncio.sleep(0.2)
    transport.down = False
    await hook.aclose()
    captures = [r for r in transport.requests if r.url.path.endswith("/capture")]
    assert len(captures) >= 2 and len({r.headers["idempotency-key"] for r in captures}) == 1
    [rsv] = ledger.reservations(f"employee:{emp}")
    assert rsv["status"] == "captured" and rsv["captured"] == cost_of(40, 10)
    assert ledger.account(f"employee:{emp}")["posted"] == 10_000 - cost_of(40, 10)


async def test_unknown_price_model_is_a_400(ledger: Ledger) -> None:
    """A gateway model with no price is refused with 400 before any model is called."""
    emp = ledger.employee(10_000)
    hook = hook_for(ledger)
    data = request(emp)
    data["model"] = "no-such-model"
    with pytest.raises(Refusal) as caught:
        await hook.async_pre_call_hook(NO_KEY_USER, None, data, "acompletion")
    assert caught.value.status_code == 400 and caught.value.code == "unknown_model"
    await hook.aclose()


async def test_overhead_script_measures(ledger: Ledger) -> None:
    """bench.gateway_overhead runs calls through the hook and reports percentiles."""
    from bench.gateway_overhead import measure

    emp = ledger.employee(10**9)
    result = await measure(ledger.url, ledger.meter_key, [emp], calls=5, warmup=2)
    assert result["calls"] == 5
    assert 0 < result["total"]["p50_ms"] <= result["total"]["max_ms"]
    assert ledger.reservations(f"employee:{emp}", "active") == []


async def test_call_longer_than_the_hold_is_still_charged_once(ledger: Ledger) -> None:
    """A call that outlives its reservation's TTL is charged its usage as an
    event (by its call id), and the user still gets the answer."""
    emp = ledger.employee(10_000)
    hook = hook_for(ledger, reservation_ttl_seconds=1)
    data = await hook.async_pre_call_hook(
        NO_KEY_USER, None, request(emp, max_tokens=100), "acompletion"
    )
    await asyncio.sleep(1.3)
    answer = response(40, 10)
    assert await hook.async_post_call_success_hook(data, NO_KEY_USER, answer) is answer
    await hook.aclose()
    [rsv] = ledger.reservations(f"employee:{emp}")
    assert rsv["status"] == "expired"
    assert ledger.account(f"employee:{emp}")["posted"] == 10_000 - cost_of(40, 10)
