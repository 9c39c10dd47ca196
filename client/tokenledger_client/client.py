"""Sync and async clients of the tokenledger API.

Both share one request plan and one retry decision (`_Plan`, `_decide`), so
they cannot drift apart:

* A state-changing call gets one `Idempotency-Key` when it is made, and every
  retry of it sends the same key: a request whose answer was lost (the
  connection dropped after the service committed) is answered from the
  stored result, never applied twice. Usage events need no key: `(source,
  event_id)` is theirs.
* Retried: transport errors (connect, read, write, timeouts, a dropped
  connection), 429 and 503, waiting `Retry-After` when the service sends one
  and a jittered exponential backoff otherwise, within `RetryPolicy.total_seconds`
  for the whole call. A wait that would pass that budget is not started.
* Never retried: 409 (a business rejection, stored with the key), 422, any
  other 4xx, and 500 (a bug in the service).
* Every request has connect, read, write and pool timeouts, and one
  connection pool per client object is reused for every call: make one
  client per process and share it.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import msgspec

from tokenledger_client import errors
from tokenledger_client.models import (
    Account,
    CaptureRequest,
    CaptureResult,
    DebitRequest,
    Estimate,
    ExtendRequest,
    MetadataValue,
    Reservation,
    ReserveRequest,
    Transaction,
    UsageBatchRequest,
    UsageBatchResponse,
    UsageCounts,
    UsageEvent,
    UsageRecorded,
)
from tokenledger_client.usage import usage_counts

__all__ = ["Client", "AsyncClient", "RetryPolicy", "Timeouts", "MAX_BATCH_EVENTS"]

T = TypeVar("T")

# The service takes at most this many events per POST /v1/usage:batch.
MAX_BATCH_EVENTS = 1000
USER_AGENT = "tokenledger-client/0.1"
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call may take, retries included, and how it waits."""

    # The whole call, every attempt and wait included, ends within this.
    total_seconds: float = 10.0
    max_attempts: int = 8
    backoff_initial_seconds: float = 0.05
    backoff_max_seconds: float = 2.0
    # A Retry-After longer than this is not waited for (the call fails instead).
    retry_after_max_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.total_seconds <= 0 or self.max_attempts < 1:
            raise ValueError("total_seconds must be positive and max_attempts at least 1")


@dataclass(frozen=True)
class Timeouts:
    """Per-attempt timeouts, in seconds, passed to httpx."""

    connect_seconds: float = 2.0
    read_seconds: float = 5.0
    write_seconds: float = 5.0
    pool_seconds: float = 2.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_seconds,
            read=self.read_seconds,
            write=self.write_seconds,
            pool=self.pool_seconds,
        )


@dataclass
class _Plan:
    """One logical call: what every attempt of it sends."""

    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    params: dict[str, Any] | None = None
    attempts: int = 0
    started: float = field(default_factory=time.monotonic)
    last_error: BaseException | None = None


def new_idempotency_key() -> str:
    return f"tlc-{uuid.uuid4().hex}"


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_of(response: httpx.Response) -> errors.TokenledgerError:
    try:
        problem = msgspec.json.decode(response.content)
        if not isinstance(problem, dict):
            raise ValueError
    except (msgspec.DecodeError, ValueError):
        problem = {"code": "unknown", "detail": response.text[:500]}
    return errors.error_from_problem(
        response.status_code,
        problem,
        request_id=response.headers.get("x-request-id"),
        retry_after_seconds=_retry_after_seconds(response.headers.get("retry-after")),
    )


class _Sleep:
    """Answer of `_decide`: wait this long, then try again."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


def _decide(
    plan: _Plan, policy: RetryPolicy, outcome: httpx.Response | BaseException
) -> httpx.Response | BaseException | _Sleep:
    """What to do after an attempt: return this response, raise this error, or sleep."""
    retry_after: float | None = None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code < 400:
            return outcome
        error = _error_of(outcome)
        if outcome.status_code not in (429, 503):
            return error
        retry_after = error.retry_after_seconds
        plan.last_error = error
    elif isinstance(outcome, httpx.TransportError):
        plan.last_error = outcome
    else:
        return outcome  # anything else is not ours to retry

    elapsed = time.monotonic() - plan.started
    backoff = min(
        policy.backoff_max_seconds, policy.backoff_initial_seconds * 2 ** (plan.attempts - 1)
    )
    wait = backoff * (0.5 + random.random() / 2)  # noqa: S311  # why: jitter, not a secret
    if retry_after is not None:
        if retry_after > policy.retry_after_max_seconds:
            return _exhausted(plan, f"Retry-After {retry_after:.0f}s is over the limit")
        wait = max(wait, retry_after)
    if plan.attempts >= policy.max_attempts:
        return _exhausted(plan, f"{plan.attempts} attempts")
    if elapsed + wait >= policy.total_seconds:
        return _exhausted(plan, f"the {policy.total_seconds:.1f}s budget")
    return _Sleep(wait)


def _exhausted(plan: _Plan, why: str) -> BaseException:
    last = plan.last_error
    if isinstance(last, errors.TokenledgerError):
        # A 429 or 503 answer is an answer: raise it as itself, so that the
        # caller sees rate_limited or unavailable with its extras.
        return last
    return errors.LedgerUnreachable(
        f"{plan.method} {plan.path}: no answer within {why}: {last!r}", last_error=last
    )


def _decode(response: httpx.Response, type_: type[T]) -> T:
    return msgspec.json.decode(response.content, type=type_)


def _metadata(metadata: Mapping[str, MetadataValue] | None) -> dict[str, MetadataValue] | None:
    return dict(metadata) if metadata else None


class _Base:
    """Configuration and request building shared by both clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required (e.g. TOKENLEDGER_URL)")
        if not api_key:
            raise ValueError("api_key is required (e.g. TOKENLEDGER_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )

    @staticmethod
    def _plan(
        method: str,
        path: str,
        body: msgspec.Struct | None = None,
        *,
        idempotent_by_key: bool,
        idempotency_key: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> _Plan:
        headers: dict[str, str] = {}
        encoded = None
        if body is not None:
            encoded = _encoder.encode(body)
            headers["Content-Type"] = "application/json"
        if idempotent_by_key:
            # Made once here: every attempt of this call sends the same key.
            headers["Idempotency-Key"] = idempotency_key or new_idempotency_key()
        return _Plan(method, path, encoded, headers, params)

    # --- request shapes (shared) ----------------------------------------------

    @staticmethod
    def _reserve_body(
        account: str,
        amount: int | None,
        estimate: Estimate | None,
        ttl_seconds: int,
        metadata: Mapping[str, MetadataValue] | None,
    ) -> ReserveRequest:
        if (amount is None) == (estimate is None):
            raise ValueError("give exactly one of amount and estimate")
        return ReserveRequest(
            account=account,
            amount=amount,
            estimate=estimate,
            ttl_seconds=ttl_seconds,
            metadata=_metadata(metadata),
        )

    @staticmethod
    def _capture_usage_body(
        usage: Any, model: str | None, metadata: Mapping[str, MetadataValue] | None
    ) -> CaptureRequest:
        if isinstance(usage, UsageCounts):
            counts = usage
        else:
            if model is None:
                raise ValueError("model (the price model) is required to map a provider usage")
            counts = usage_counts(model, usage)
        return CaptureRequest(usage=counts, metadata=_metadata(metadata))

    @staticmethod
    def _rid(reservation: Reservation | str) -> str:
        return reservation.id if isinstance(reservation, Reservation) else reservation

    @staticmethod
    def _chunks(events: Iterable[UsageEvent]) -> list[list[UsageEvent]]:
        items = list(events)
        return [items[i : i + MAX_BATCH_EVENTS] for i in range(0, len(items), MAX_BATCH_EVENTS)]


class Client(_Base):
    """Blocking client. Thread-safe; share one per process. Use as a context
    manager or call `close()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, retry=retry, timeouts=timeouts, max_connections=max_connections
        )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeouts.httpx(),
            limits=self._limits,
            transport=transport,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, plan: _Plan, type_: type[T]) -> T:
        while True:
            plan.attempts += 1
            outcome: httpx.Response | BaseException
            try:
                outcome = self._http.request(
                    plan.method,
                    plan.path,
                    content=plan.body,
                    headers=plan.headers,
                    params=plan.params,
                )
            except httpx.TransportError as exc:
                outcome = exc
            decision = _decide(plan, self.retry, outcome)
            if isinstance(decision, _Sleep):
                time.sleep(decision.seconds)
                continue
            if isinstance(decision, BaseException):
                raise decision
            return _decode(decision, type_)

    # --- reservations ---------------------------------------------------------

    def reserve(
        self,
        account: str,
        *,
        amount: int | None = None,
        estimate: Estimate | None = None,
        ttl_seconds: int = 600,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        body = self._reserve_body(account, amount, estimate, ttl_seconds, metadata)
        plan = self._plan(
            "POST", "/v1/reservations", body, idempotent_by_key=True,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._send(plan, Reservation)

    def reserve_for(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        min_output_tokens: int | None = None,
        *,
        account: str,
        ttl_seconds: int = 600,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Reserve by estimate: `max_output_tokens_allowed` of the answer is the
        cap to put on the call's max_tokens."""
        estimate = Estimate(model, input_tokens, max_output_tokens, min_output_tokens)
        return self.reserve(
            account, estimate=estimate, ttl_seconds=ttl_seconds, metadata=metadata,
            idempotency_key=idempotency_key,
        )  # fmt: skip

    def capture(
        self,
        reservation: Reservation | str,
        *,
        amount: int | None = None,
        usage: UsageCounts | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> CaptureResult:
        if (amount is None) == (usage is None):
            raise ValueError("give exactly one of amount and usage")
        body = CaptureRequest(amount=amount, usage=usage, metadata=_metadata(metadata))
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/capture", body,
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._send(plan, CaptureResult)

    def capture_usage(
        self,
        reservation: Reservation | str,
        usage: Any,
        *,
        model: str | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> CaptureResult:
        """Capture by real usage: `usage` is `UsageCounts`, or a provider's usage
        block (OpenAI, Anthropic, Gemini, LiteLLM's `Usage`) priced as `model`."""
        body = self._capture_usage_body(usage, model, metadata)
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/capture", body,
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._send(plan, CaptureResult)

    def release(
        self, reservation: Reservation | str, *, idempotency_key: str | None = None
    ) -> Reservation:
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/release",
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._send(plan, Reservation)

    def extend(
        self,
        reservation: Reservation | str,
        ttl_seconds: int,
        *,
        idempotency_key: str | None = None,
    ) -> Reservation:
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/extend",
            ExtendRequest(ttl_seconds), idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._send(plan, Reservation)

    def get_reservation(self, reservation_id: str) -> Reservation:
        return self._send(
            self._plan("GET", f"/v1/reservations/{reservation_id}", idempotent_by_key=False),
            Reservation,
        )

    # --- accounts, debits, usage -----------------------------------------------

    def account(self, address: str) -> Account:
        return self._send(
            self._plan("GET", f"/v1/accounts/{address}", idempotent_by_key=False), Account
        )

    def debit(
        self,
        account: str,
        amount: int,
        *,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Transaction:
        body = DebitRequest(account, amount, _metadata(metadata))
        plan = self._plan(
            "POST", "/v1/debits", body, idempotent_by_key=True, idempotency_key=idempotency_key
        )
        return self._send(plan, Transaction)

    def record_usage(self, event: UsageEvent) -> UsageRecorded:
        """One usage event; sending it again is answered `duplicate`, charged once."""
        return self._send(
            self._plan("POST", "/v1/usage", event, idempotent_by_key=False), UsageRecorded
        )

    def record_usage_batch(self, events: Iterable[UsageEvent]) -> UsageBatchResponse:
        """Events in calls of at most 1000; results in input order."""
        results = []
        for chunk in self._chunks(events):
            plan = self._plan(
                "POST", "/v1/usage:batch", UsageBatchRequest(chunk), idempotent_by_key=False
            )
            results.extend(self._send(plan, UsageBatchResponse).results)
        return UsageBatchResponse(results)


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, awaitable. Share one
    per event loop; `await aclose()` (or `async with`) at the end."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, retry=retry, timeouts=timeouts, max_connections=max_connections
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeouts.httpx(),
            limits=self._limits,
            transport=transport,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, plan: _Plan, type_: type[T]) -> T:
        while True:
            plan.attempts += 1
            outcome: httpx.Response | BaseException
            try:
                outcome = await self._http.request(
                    plan.method,
                    plan.path,
                    content=plan.body,
                    headers=plan.headers,
                    params=plan.params,
                )
            except httpx.TransportError as exc:
                outcome = exc
            decision = _decide(plan, self.retry, outcome)
            if isinstance(decision, _Sleep):
                await asyncio.sleep(decision.seconds)
                continue
            if isinstance(decision, BaseException):
                raise decision
            return _decode(decision, type_)

    async def reserve(
        self,
        account: str,
        *,
        amount: int | None = None,
        estimate: Estimate | None = None,
        ttl_seconds: int = 600,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        body = self._reserve_body(account, amount, estimate, ttl_seconds, metadata)
        plan = self._plan(
            "POST", "/v1/reservations", body, idempotent_by_key=True,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self._send(plan, Reservation)

    async def reserve_for(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        min_output_tokens: int | None = None,
        *,
        account: str,
        ttl_seconds: int = 600,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        estimate = Estimate(model, input_tokens, max_output_tokens, min_output_tokens)
        return await self.reserve(
            account, estimate=estimate, ttl_seconds=ttl_seconds, metadata=metadata,
            idempotency_key=idempotency_key,
        )  # fmt: skip

    async def capture(
        self,
        reservation: Reservation | str,
        *,
        amount: int | None = None,
        usage: UsageCounts | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> CaptureResult:
        if (amount is None) == (usage is None):
            raise ValueError("give exactly one of amount and usage")
        body = CaptureRequest(amount=amount, usage=usage, metadata=_metadata(metadata))
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/capture", body,
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self._send(plan, CaptureResult)

    async def capture_usage(
        self,
        reservation: Reservation | str,
        usage: Any,
        *,
        model: str | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> CaptureResult:
        body = self._capture_usage_body(usage, model, metadata)
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/capture", body,
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self._send(plan, CaptureResult)

    async def release(
        self, reservation: Reservation | str, *, idempotency_key: str | None = None
    ) -> Reservation:
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/release",
            idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self._send(plan, Reservation)

    async def extend(
        self,
        reservation: Reservation | str,
        ttl_seconds: int,
        *,
        idempotency_key: str | None = None,
    ) -> Reservation:
        plan = self._plan(
            "POST", f"/v1/reservations/{self._rid(reservation)}/extend",
            ExtendRequest(ttl_seconds), idempotent_by_key=True, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self._send(plan, Reservation)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return await self._send(
            self._plan("GET", f"/v1/reservations/{reservation_id}", idempotent_by_key=False),
            Reservation,
        )

    async def account(self, address: str) -> Account:
        return await self._send(
            self._plan("GET", f"/v1/accounts/{address}", idempotent_by_key=False), Account
        )

    async def debit(
        self,
        account: str,
        amount: int,
        *,
        metadata: Mapping[str, MetadataValue] | None = None,
        idempotency_key: str | None = None,
    ) -> Transaction:
        body = DebitRequest(account, amount, _metadata(metadata))
        plan = self._plan(
            "POST", "/v1/debits", body, idempotent_by_key=True, idempotency_key=idempotency_key
        )
        return await self._send(plan, Transaction)

    async def record_usage(self, event: UsageEvent) -> UsageRecorded:
        return await self._send(
            self._plan("POST", "/v1/usage", event, idempotent_by_key=False), UsageRecorded
        )

    async def record_usage_batch(self, events: Iterable[UsageEvent]) -> UsageBatchResponse:
        results = []
        for chunk in self._chunks(events):
            plan = self._plan(
                "POST", "/v1/usage:batch", UsageBatchRequest(chunk), idempotent_by_key=False
            )
            results.extend((await self._send(plan, UsageBatchResponse)).results)
        return UsageBatchResponse(results)
