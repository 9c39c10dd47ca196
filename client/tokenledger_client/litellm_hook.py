"""A LiteLLM proxy hook: reserve before the call, cap max_tokens, capture after.

Name it in the proxy's config:

    litellm_settings:
      callbacks: ["tokenledger_client.litellm_hook.proxy_handler_instance"]

`proxy_handler_instance` is built on first access from the environment
(`HookConfig.from_env`), so a proxy with a missing setting refuses to start.

Per chat completion:

1. **Pre-call.** The employee is the LiteLLM key's user (`user_id`, else
   `user_email`), else the OpenAI `user` field of the request; either goes
   through `TOKENLEDGER_EMPLOYEE_MAP` (id or email -> employee id) or is
   used as the employee id when it is one. The gateway model name becomes a
   price model through the alias table (`model_info.tokenledger_price_model`
   of the model_list entry, or `TOKENLEDGER_MODEL_ALIASES`). Input tokens are
   counted with `litellm.token_counter`; the hook reserves by estimate
   (Idempotency-Key derived from the call id) and sets `max_tokens` (or
   `max_completion_tokens`, whichever the request used) to
   `max_output_tokens_allowed`. When nothing fits the request is refused
   before it reaches a model: 402 (not enough credits), 429 (a spend limit
   or the ledger's rate limit; with Retry-After), 403 (unknown employee,
   closed wallet, model not allowed by policy), 400 (no price for the
   model), 503 (ledger unreachable and fail-closed).
2. **Success.** Captures by the response's real usage (cached prompt tokens
   at the cached rate), once; the response carries `x-tokenledger-reservation`,
   `x-tokenledger-cost` and `x-tokenledger-max-tokens` headers. A stream is
   captured once, when it ends, by its final usage chunk (the hook asks for
   `stream_options.include_usage`).
3. **Failure, or a stream the client abandoned.** Releases the reservation.
4. **Ledger unreachable.** `TOKENLEDGER_FAIL_MODE=closed` (default) refuses
   with 503; `open` lets the call through unreserved and records its usage
   afterwards through the usage flusher (event id = the call id), which
   retries until the ledger answers and can spool to disk
   (`TOKENLEDGER_SPOOL_PATH`). A capture that gets no answer is retried in
   the background with the same key; if its reservation expired meanwhile,
   the usage goes through the flusher instead, so it is charged exactly once.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenledger_client import errors
from tokenledger_client.client import AsyncClient, Client, RetryPolicy, Timeouts
from tokenledger_client.flusher import UsageFlusher
from tokenledger_client.models import UsageCounts, UsageEvent
from tokenledger_client.usage import usage_counts

try:
    from fastapi import HTTPException
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "tokenledger_client.litellm_hook needs LiteLLM: pip install 'tokenledger-client[litellm]'"
    ) from exc

__all__ = ["HookConfig", "TokenledgerHook", "Refusal"]

log = logging.getLogger("tokenledger_client.litellm")

EMPLOYEE_REF = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Call types that have messages and a max_tokens to cap.
CHAT_CALL_TYPES = frozenset({"completion", "acompletion", "text_completion", "atext_completion"})


def _env_json(value: str | None, name: str) -> dict[str, str]:
    """A JSON object given inline or as @path (or a path to a .json file)."""
    if not value:
        return {}
    text = value
    if value.startswith("@") or value.endswith(".json"):
        with open(value.lstrip("@"), encoding="utf-8") as f:
            text = f.read()
    parsed = json.loads(text)
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
    ):
        raise ValueError(f"{name} must be a JSON object of strings")
    return parsed


@dataclass(frozen=True)
class HookConfig:
    """The hook's settings; `from_env` reads them (README, Gateway integration)."""

    url: str
    api_key: str
    fail_mode: str = (
        "closed"  # "closed": refuse when the ledger is unreachable; "open": let through
    )
    source: str = "litellm"  # usage-event source of fail-open usage
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    employee_map: Mapping[str, str] = field(default_factory=dict)
    default_max_output_tokens: int = 4096
    # Reserve down to this many output tokens when the wallet cannot cover the request's
    # max_tokens (capped to the request's own max); 0 means all or nothing.
    min_output_tokens: int = 256
    reservation_ttl_seconds: int = 600
    spool_path: str | None = None
    retry_total_seconds: float = 5.0
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.fail_mode not in ("closed", "open"):
            raise ValueError("TOKENLEDGER_FAIL_MODE must be 'closed' or 'open'")
        if not self.url or not self.api_key:
            raise ValueError("TOKENLEDGER_URL and TOKENLEDGER_API_KEY must be set")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HookConfig:
        e = os.environ if env is None else env
        return cls(
            url=e.get("TOKENLEDGER_URL", ""),
            api_key=e.get("TOKENLEDGER_API_KEY", ""),
            fail_mode=e.get("TOKENLEDGER_FAIL_MODE", "closed"),
            source=e.get("TOKENLEDGER_USAGE_SOURCE", "litellm"),
            model_aliases=_env_json(
                e.get("TOKENLEDGER_MODEL_ALIASES"), "TOKENLEDGER_MODEL_ALIASES"
            ),
            employee_map=_env_json(e.get("TOKENLEDGER_EMPLOYEE_MAP"), "TOKENLEDGER_EMPLOYEE_MAP"),
            default_max_output_tokens=int(e.get("TOKENLEDGER_DEFAULT_MAX_OUTPUT_TOKENS", "4096")),
            min_output_tokens=int(e.get("TOKENLEDGER_MIN_OUTPUT_TOKENS", "256")),
            reservation_ttl_seconds=int(e.get("TOKENLEDGER_RESERVATION_TTL_SECONDS", "600")),
            spool_path=e.get("TOKENLEDGER_SPOOL_PATH") or None,
            retry_total_seconds=float(e.get("TOKENLEDGER_RETRY_TOTAL_SECONDS", "5")),
            timeout_seconds=float(e.get("TOKENLEDGER_TIMEOUT_SECONDS", "5")),
        )


class Refusal(HTTPException):
    """What the end user gets when the hook refuses a call: an OpenAI-style
    error with our code and the ledger's extras."""

    def __init__(
        self, status: int, code: str, message: str, extras: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        detail = {"error": message, "code": code, **(extras or {})}
        super().__init__(status_code=status, detail=detail, headers=dict(headers or {}))
        self.code = code


@dataclass
class _Call:
    """What the hook knows about one call between its hooks."""

    call_id: str
    account: str
    price_model: str
    input_tokens: int
    reservation_id: str | None  # None: let through unreserved (fail-open)
    max_tokens: int | None
    started: float = field(default_factory=time.monotonic)
    settled: bool = False
    cost: int | None = None
    # Seconds spent waiting for the ledger on this call (reserve + capture).
    ledger_seconds: float = 0.0


class TokenledgerHook(CustomLogger):
    def __init__(self, config: HookConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config or HookConfig.from_env()
        self._client: AsyncClient | None = None
        self._flusher: UsageFlusher | None = None
        self._calls: dict[str, _Call] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Seconds the hook spent talking to the ledger, per call (reserve + capture).
        self.overhead_seconds: list[float] = []
        atexit.register(self._flush_at_exit)

    # --- plumbing ---------------------------------------------------------------

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(
                self.config.url,
                self.config.api_key,
                retry=RetryPolicy(total_seconds=self.config.retry_total_seconds),
                timeouts=Timeouts(
                    connect_seconds=min(2.0, self.config.timeout_seconds),
                    read_seconds=self.config.timeout_seconds,
                    write_seconds=self.config.timeout_seconds,
                ),
            )
        return self._client

    @property
    def flusher(self) -> UsageFlusher:
        if self._flusher is None:
            self._flusher = UsageFlusher(self.client, spool_path=self.config.spool_path)
            self._flusher.start()
        return self._flusher

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Wait for background captures and releases, flush usage, close the client."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._flusher is not None:
            await self._flusher.close()
            self._flusher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _flush_at_exit(self) -> None:
        """At interpreter exit, send the flusher's pending events synchronously
        (the proxy's event loop is gone by then)."""
        flusher = self._flusher
        if flusher is None or not flusher.pending_count:
            return
        events = list(flusher._pending)
        try:
            with Client(self.config.url, self.config.api_key) as client:
                client.record_usage_batch(events)
        except Exception as exc:  # noqa: BLE001  # why: last resort; the spool keeps them
            log.error("%d usage events not delivered at exit: %r", len(events), exc)

    # --- resolving ----------------------------------------------------------------

    def employee_for(self, user_api_key_dict: Any, data: Mapping[str, Any]) -> str:
        candidates = [
            getattr(user_api_key_dict, "user_id", None),
            getattr(user_api_key_dict, "user_email", None),
            data.get("user"),
        ]
        for who in candidates:
            if not who or not isinstance(who, str):
                continue
            mapped = self.config.employee_map.get(who) or self.config.employee_map.get(who.lower())
            if mapped:
                return mapped
            if EMPLOYEE_REF.match(who):
                return who
        raise Refusal(
            403, "employee_unknown",
            "tokenledger: this call cannot be charged to an employee: send the OpenAI `user` "
            "field (employee id or a mapped email) or use a key that belongs to a user",
        )  # fmt: skip

    def price_model_for(self, model: str) -> str:
        alias = self.config.model_aliases.get(model)
        if alias:
            return alias
        # Inside the proxy its router knows the model_list; elsewhere (tests, a
        # plain SDK) do not import the proxy (seconds) just to find none.
        server = sys.modules.get("litellm.proxy.proxy_server")
        router = getattr(server, "llm_router", None)
        if router is not None:
            for deployment in router.get_model_list(model_name=model) or []:
                info = deployment.get("model_info") or {}
                if info.get("tokenledger_price_model"):
                    return str(info["tokenledger_price_model"])
        return model

    @staticmethod
    def count_input_tokens(data: Mapping[str, Any]) -> int:
        import litellm

        model = str(data.get("model", ""))
        if data.get("messages") is not None:
            kwargs: dict[str, Any] = {"model": model, "messages": data["messages"]}
            if data.get("tools"):
                kwargs["tools"] = data["tools"]
            try:
                return int(litellm.token_counter(**kwargs))
            except TypeError:
                return int(litellm.token_counter(model=model, messages=data["messages"]))
        prompt = data.get("prompt")
        return int(litellm.token_counter(model=model, text=str(prompt or "")))

    # --- pre-call -------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str
    ) -> dict[str, Any]:
        if call_type not in CHAT_CALL_TYPES:
            return data
        started = time.monotonic()
        call_id = str(data.get("litellm_call_id") or uuid.uuid4())
        data["litellm_call_id"] = call_id
        employee = self.employee_for(user_api_key_dict, data)
        account = f"employee:{employee}"
        gateway_model = str(data.get("model", ""))
        price_model = self.price_model_for(gateway_model)
        input_tokens = self.count_input_tokens(data)
        field_name = "max_completion_tokens" if data.get("max_completion_tokens") else "max_tokens"
        requested = int(
            data.get("max_completion_tokens")
            or data.get("max_tokens")
            or self.config.default_max_output_tokens
        )
        min_tokens = min(requested, self.config.min_output_tokens) or requested
        try:
            rsv = await self.client.reserve_for(
                price_model,
                input_tokens,
                requested,
                min_tokens,
                account=account,
                ttl_seconds=self.config.reservation_ttl_seconds,
                metadata={"source": self.config.source, "call_id": call_id,
                          "gateway_model": gateway_model, "price_model": price_model},
                idempotency_key=f"litellm-{call_id}-reserve",
            )  # fmt: skip
        except errors.TokenledgerError as exc:
            raise self._refusal(exc) from exc
        except errors.LedgerUnreachable as exc:
            if self.config.fail_mode == "closed":
                raise Refusal(
                    503, "ledger_unavailable",
                    "tokenledger is unreachable and this gateway fails closed; retry shortly",
                    headers={"Retry-After": "5"},
                ) from exc  # fmt: skip
            log.warning("tokenledger unreachable; call %s goes through unreserved", call_id)
            self._remember(_Call(call_id, account, price_model, input_tokens, None, None))
            return data
        allowed = rsv.max_output_tokens_allowed or requested
        data[field_name] = allowed
        if field_name == "max_completion_tokens" and data.get("max_tokens"):
            data["max_tokens"] = min(int(data["max_tokens"]), allowed)
        if data.get("stream"):
            # The usage of a stream comes in its last chunk only when asked for.
            options = dict(data.get("stream_options") or {})
            options["include_usage"] = True
            data["stream_options"] = options
        metadata = data.setdefault("metadata", {})
        if isinstance(metadata, dict):
            metadata["tokenledger_reservation_id"] = rsv.id
        call = _Call(call_id, account, price_model, input_tokens, rsv.id, allowed)
        call.ledger_seconds = time.monotonic() - started
        self._remember(call)
        return data

    def _remember(self, call: _Call) -> None:
        """Keep a call until its last hook; calls no hook ever finished (a
        path of the proxy that skipped them) are forgotten after twice the
        reservation TTL, by which time their holds have expired anyway."""
        self._calls[call.call_id] = call
        if len(self._calls) > 10_000:
            horizon = time.monotonic() - 2 * self.config.reservation_ttl_seconds
            for key in [k for k, c in self._calls.items() if c.started < horizon]:
                del self._calls[key]

    def _refusal(self, exc: errors.TokenledgerError) -> Refusal:
        ex = dict(exc.extras)
        if isinstance(exc, errors.InsufficientCredits):
            return Refusal(
                402, exc.code,
                f"tokenledger: not enough AI credits for this call "
                f"(available {exc.available}, needed {exc.requested} for the prompt "
                "and the smallest allowed answer)", ex,
            )  # fmt: skip
        if isinstance(exc, errors.LimitExceeded):
            headers = {}
            if exc.resets_at:
                headers["x-tokenledger-resets-at"] = str(exc.resets_at)
            return Refusal(
                429, exc.code,
                f"tokenledger: your {exc.window} spend limit is reached "
                f"(remaining {exc.remaining}); it resets at {exc.resets_at}", ex, headers,
            )  # fmt: skip
        if isinstance(exc, errors.RateLimited):
            retry = exc.retry_after_seconds or 1
            return Refusal(
                429, exc.code, "tokenledger: too many calls; retry shortly", ex,
                {"Retry-After": str(int(retry + 0.999))},
            )  # fmt: skip
        if isinstance(exc, errors.UnknownModel):
            return Refusal(400, exc.code, f"tokenledger: no price for this model: {exc.detail}", ex)
        if isinstance(exc, errors.ModelNotAllowed | errors.AccountClosed | errors.EmployeeNotFound
                      | errors.AccountNotFound):  # fmt: skip
            return Refusal(403, exc.code, f"tokenledger: {exc.detail}", ex)
        return Refusal(502, exc.code, f"tokenledger refused the reservation: {exc}", ex)

    def _record_overhead(self, seconds: float) -> None:
        self.overhead_seconds.append(seconds)
        if len(self.overhead_seconds) > 100_000:  # a bounded sample
            del self.overhead_seconds[:50_000]

    # --- success ----------------------------------------------------------------------

    async def async_post_call_success_hook(
        self, data: dict[str, Any], user_api_key_dict: Any, response: Any
    ) -> Any:
        call = self._calls.get(str(data.get("litellm_call_id")))
        if call is None or data.get("stream"):
            return response
        usage = getattr(response, "usage", None)
        if usage is None and isinstance(response, Mapping):
            usage = response.get("usage")
        await self._settle(call, usage, data)
        extra = self._headers(call)
        hidden = getattr(response, "_hidden_params", None)
        if isinstance(hidden, dict):
            headers = dict(hidden.get("additional_headers") or {})
            headers.update(extra)
            hidden["additional_headers"] = headers
        return response

    async def async_post_call_response_headers_hook(
        self, data: dict[str, Any], user_api_key_dict: Any, response: Any, *args: Any, **kw: Any
    ) -> dict[str, str] | None:
        call = self._calls.get(str(data.get("litellm_call_id")))
        if call is None:
            return None
        headers = self._headers(call)
        if call.settled:
            self._calls.pop(call.call_id, None)
        return headers or None

    @staticmethod
    def _headers(call: _Call) -> dict[str, str]:
        headers: dict[str, str] = {}
        if call.reservation_id:
            headers["x-tokenledger-reservation"] = call.reservation_id
        if call.max_tokens is not None:
            headers["x-tokenledger-max-tokens"] = str(call.max_tokens)
        if call.cost is not None:
            headers["x-tokenledger-cost"] = str(call.cost)
        return headers

    async def _settle(self, call: _Call, usage: Any, data: Mapping[str, Any]) -> None:
        """Charge a finished call once: capture its reservation by the real usage,
        or (unreserved, fail-open) hand the usage to the flusher."""
        if call.settled:
            return
        call.settled = True
        started = time.monotonic()
        if usage is None:
            log.warning("call %s returned no usage; charging the counted prompt", call.call_id)
            counts = UsageCounts(call.price_model, call.input_tokens, 0)
        else:
            counts = usage_counts(call.price_model, usage)
        if call.reservation_id is None:
            self.flusher.record(self._event(call, counts))
            return
        metadata = {"call_id": call.call_id, "max_tokens": call.max_tokens}
        try:
            result = await self.client.capture_usage(
                call.reservation_id, counts, metadata=metadata,
                idempotency_key=f"litellm-{call.call_id}-capture",
            )  # fmt: skip
            call.cost = result.cost
        except errors.InsufficientCredits:
            # The call used more than was held and the wallet cannot cover the
            # excess: usage that happened is never dropped; record it as an event.
            log.warning("capture of %s over the hold refused; recording usage", call.call_id)
            await self._release_quietly(call)
            self.flusher.record(self._event(call, counts))
        except errors.ReservationNotActive as exc:
            # The hold expired before the call ended (a call longer than the
            # TTL): charge the usage as an event instead, once by its call id.
            log.warning("reservation of %s is %s; recording usage", call.call_id,
                        exc.reservation_status)  # fmt: skip
            self.flusher.record(self._event(call, counts))
        except (errors.LedgerUnreachable, errors.RetryableError) as exc:
            log.warning("capture of %s got no answer (%r); retrying later", call.call_id, exc)
            self._spawn(self._capture_later(call, counts, metadata))
        except errors.TokenledgerError as exc:
            # The model has answered: never turn that into an error for the
            # user. A bug to look at; the hold expires at its TTL.
            log.error("capture of %s refused: %r", call.call_id, exc)
        finally:
            call.ledger_seconds += time.monotonic() - started
            self._record_overhead(call.ledger_seconds)

    async def _capture_later(self, call: _Call, counts: UsageCounts, metadata: Any) -> None:
        """Retry a capture with the same key until it is answered; if its
        reservation expired meanwhile, charge the usage as an event instead."""
        assert call.reservation_id is not None
        wait = 1.0
        while True:
            try:
                result = await self.client.capture_usage(
                    call.reservation_id, counts, metadata=metadata,
                    idempotency_key=f"litellm-{call.call_id}-capture",
                )  # fmt: skip
                call.cost = result.cost
                return
            except (errors.LedgerUnreachable, errors.RetryableError):
                await asyncio.sleep(wait)
                wait = min(wait * 2, 60.0)
            except (errors.ReservationNotActive, errors.InsufficientCredits):
                self.flusher.record(self._event(call, counts))
                return

    def _event(self, call: _Call, counts: UsageCounts) -> UsageEvent:
        return UsageEvent(
            source=self.config.source,
            event_id=call.call_id,
            account=call.account,
            model=counts.model,
            input_tokens=counts.input_tokens,
            cached_input_tokens=counts.cached_input_tokens,
            output_tokens=counts.output_tokens,
        )

    # --- failure and streams ------------------------------------------------------------

    async def async_post_call_failure_hook(
        self, request_data: dict[str, Any], original_exception: Exception,
        user_api_key_dict: Any, traceback_str: str | None = None,
    ) -> None:  # fmt: skip
        call = self._calls.pop(str(request_data.get("litellm_call_id")), None)
        if call is None or call.settled:
            return None
        call.settled = True
        await self._release_quietly(call)
        return None

    async def _release_quietly(self, call: _Call) -> None:
        if call.reservation_id is None:
            return
        try:
            await self.client.release(
                call.reservation_id, idempotency_key=f"litellm-{call.call_id}-release"
            )
        except errors.ReservationNotActive:
            pass  # captured, released or expired already: nothing is held
        except Exception as exc:  # noqa: BLE001  # why: the hold expires at its TTL anyway
            log.warning(
                "release of %s failed (%r); it expires at its TTL", call.reservation_id, exc
            )

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        call = self._calls.get(str(request_data.get("litellm_call_id")))
        if call is None:
            async for item in response:
                yield item
            return
        usage = None
        text: list[str] = []
        finished = False
        try:
            async for chunk in response:
                chunk_usage = getattr(chunk, "usage", None)
                if chunk_usage is not None:
                    usage = chunk_usage
                for choice in getattr(chunk, "choices", None) or ():
                    content = getattr(getattr(choice, "delta", None), "content", None)
                    if content:
                        text.append(content)
                yield chunk
            finished = True
        finally:
            self._calls.pop(call.call_id, None)
            if finished:
                if usage is None:
                    # No usage chunk came through: charge the counted prompt
                    # and the streamed text, counted with LiteLLM's tokenizer.
                    usage = {
                        "prompt_tokens": call.input_tokens,
                        "completion_tokens": self.count_output_tokens(request_data, text),
                    }
                await self._settle(call, usage, request_data)
            elif not call.settled:
                # The client went away (or the stream broke): free the hold. Run
                # it apart, since this generator may be being cancelled.
                call.settled = True
                self._spawn(self._release_quietly(call))

    @staticmethod
    def count_output_tokens(data: Mapping[str, Any], text: list[str]) -> int:
        import litellm

        return int(litellm.token_counter(model=str(data.get("model", "")), text="".join(text)))


def __getattr__(name: str) -> Any:
    """`proxy_handler_instance`, made from the environment on first access,
    which is when the proxy loads its callbacks."""
    if name == "proxy_handler_instance":
        instance = TokenledgerHook()
        globals()[name] = instance
        return instance
    raise AttributeError(name)
