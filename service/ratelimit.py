"""Per-caller rate limits: a token bucket per principal, sized by role.

Buckets live in each replica's memory: with N replicas a caller gets up to N
times its rate in the worst case, which is the usual trade for not putting a
shared counter on the hot path. Idle buckets are dropped so memory stays
bounded by the number of active callers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from service import errors
from service.auth import Principal

MAX_BUCKETS = 100_000


@dataclass
class Bucket:
    tokens: float
    updated: float

    def refill(self, now: float, per_second: float, capacity: float) -> None:
        self.tokens = min(capacity, self.tokens + (now - self.updated) * per_second)
        self.updated = now


def parse_limits(spec: str) -> dict[str, float]:
    """`"meter=2000,employee=20"` (requests per second per caller) to a dict."""
    limits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        role, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"rate limit {part!r} is not role=requests_per_second")
        limits[role.strip()] = float(value)
    return limits


class RateLimiter:
    def __init__(
        self,
        per_second: dict[str, float],
        burst_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst_seconds = burst_seconds
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}

    def rate_for(self, principal: Principal) -> float | None:
        rates = [self.per_second[r] for r in principal.roles if r in self.per_second]
        return max(rates) if rates else None

    async def check(self, principal: Principal) -> None:
        rate = self.rate_for(principal)
        if rate is None or rate <= 0:
            return
        capacity = max(1.0, rate * self.burst_seconds)
        now = self.clock()
        bucket = self.buckets.get(principal.id)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._prune(now, capacity)
            bucket = self.buckets[principal.id] = Bucket(capacity, now)
        bucket.refill(now, rate, capacity)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        wait = math.ceil((1 - bucket.tokens) / rate)
        exc = errors.RateLimited(
            f"rate limit of {rate:g} requests per second exceeded", retry_after=wait
        )
        exc.headers["Retry-After"] = str(max(1, wait))
        raise exc

    def _prune(self, now: float, capacity: float) -> None:
        # Buckets that have refilled completely carry no information.
        idle = [k for k, b in self.buckets.items() if now - b.updated > self.burst_seconds * 2]
        for k in idle:
            del self.buckets[k]


class FailureLimiter:
    """Failed authentications per client address: a token bucket each, of
    `burst` failures refilling at `per_second`. An address with an empty
    bucket is refused (429) before its next token is looked up or verified,
    except a token that authenticated lately (`vouch`): valid callers behind
    an address that floods failures are never limited by it."""

    VOUCHED_SECONDS = 600.0

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}
        self._vouched: dict[bytes, float] = {}

    def _bucket(self, address: str, now: float) -> Bucket:
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                full = self.burst / self.per_second
                for k in [k for k, b in self.buckets.items() if now - b.updated > full]:
                    del self.buckets[k]
            bucket = self.buckets[address] = Bucket(self.burst, now)
        bucket.refill(now, self.per_second, self.burst)
        return bucket

    def check(self, address: str, token_digest: bytes) -> None:
        now = self.clock()
        until = self._vouched.get(token_digest)
        if until is not None and now < until:
            return
        bucket = self._bucket(address, now)
        if bucket.tokens >= 1:
            return
        wait = max(1, math.ceil((1 - bucket.tokens) / self.per_second))
        exc = errors.RateLimited(
            f"too many failed authentications from {address}", retry_after=wait
        )
        exc.headers["Retry-After"] = str(wait)
        raise exc

    def failed(self, address: str) -> None:
        bucket = self._bucket(address, self.clock())
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def vouch(self, token_digest: bytes) -> None:
        if len(self._vouched) >= MAX_BUCKETS:
            self._vouched.clear()
        self._vouched[token_digest] = self.clock() + self.VOUCHED_SECONDS
