"""The chaos run's load: the operations its workers send (debits, transfers,
grants, reservations), each retried under its key until it gets a final
answer, and the tally of what they saw.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.api import SETUP_CONCURRENCY, bounded_gather, problem_code

WALLET_FUNDING = 10_000_000
MAX_AMOUNT = 10
# The worker mix: shares of debits, transfers and grants; the rest are
# reservations, of which CAPTURE_SHARE are captured and the others released.
# A capture asks for 1..held+OVER_CAPTURE credits, so some capture more than held.
DEBIT_SHARE = 0.40
TRANSFER_SHARE = 0.25
GRANT_SHARE = 0.15
CAPTURE_SHARE = 0.7
OVER_CAPTURE = 2
KINDS = ("debit", "transfer", "grant", "reserve", "capture", "release")
RESERVATION_KINDS = frozenset({"reserve", "capture", "release"})
MAX_OPS_PER_WORKER = 100_000
# A request is retried with its key this many times, within this many
# seconds, while the chaos runs; the rest are settled after it stops.
RETRY_ATTEMPTS = 10
RETRY_SECONDS = 20.0
SETTLE_SECONDS = 30.0
SETTLE_ATTEMPTS = 20


@dataclass
class Op:
    """One logical request: retried under its key until it gets a final answer."""

    kind: str
    key: str
    path: str
    body: dict[str, Any]
    amount: int
    attempts: int = 0
    final: int | None = None
    code: str | None = None
    replayed: bool = False
    server_errors: int = 0
    # A reserve: what follows it once it succeeded ("capture" with then_amount,
    # or "release"), its answer (for the reservation id) and that follow-up.
    then: str | None = None
    then_amount: int = 0
    result: dict[str, Any] | None = None
    child: Op | None = None
    # A capture or release: the reservation it settles.
    reservation: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.final is not None and 200 <= self.final < 300


@dataclass
class Tally:
    """What a chaos run saw: answers, codes, transport errors, rule
    violations, every operation sent, and the killer's count."""

    answers: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    transport: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    kills: int = 0
    connections_killed: int = 0
    kill_errors: list[str] = field(default_factory=list)

    def violate(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(message)
        elif len(self.violations) == 50:
            self.violations.append("... (more violations not listed)")


class Chaos:
    def __init__(
        self, client: httpx.AsyncClient, wallets: list[str], tally: Tally, run_id: str
    ) -> None:
        self.client = client
        self.wallets = wallets
        self.tally = tally
        self.run_id = run_id

    def make_op(self, rng: random.Random, w: int, i: int) -> Op:
        key = f"{self.run_id}-w{w}-{i}"
        amount = rng.randint(1, MAX_AMOUNT)
        roll = rng.random()
        if roll < DEBIT_SHARE:
            wallet = rng.choice(self.wallets)
            return Op(
                "debit",
                key,
                "/v1/debits",
                {"account": f"employee:{wallet}", "amount": amount},
                amount,
            )
        if roll < DEBIT_SHARE + TRANSFER_SHARE:
            a, b = rng.sample(self.wallets, 2)
            return Op(
                "transfer",
                key,
                "/v1/transfers",
                {"from": f"employee:{a}", "to": f"employee:{b}", "amount": amount},
                amount,
            )
        if roll < DEBIT_SHARE + TRANSFER_SHARE + GRANT_SHARE:
            wallet = rng.choice(self.wallets)
            return Op(
                "grant",
                key,
                "/v1/grants",
                {"employee": wallet, "amount": amount, "reason": "spot_bonus"},
                amount,
            )
        wallet = rng.choice(self.wallets)
        capture = rng.random() < CAPTURE_SHARE
        return Op(
            "reserve",
            key,
            "/v1/reservations",
            {"account": f"employee:{wallet}", "amount": amount},
            amount,
            then="capture" if capture else "release",
            then_amount=rng.randint(1, amount + OVER_CAPTURE) if capture else amount,
        )

    def follow_up(self, op: Op) -> Op | None:
        """The capture or release of a reserve that succeeded, once (None if
        there is nothing, or nothing more, to follow it with)."""
        if op.kind != "reserve" or not op.succeeded or op.child is not None or op.then is None:
            return None
        rid = (op.result or {}).get("id")
        if not isinstance(rid, str):
            self.tally.violate(f"reserve {op.key}: {op.final} answer without a reservation id")
            return None
        if op.then == "capture":
            child = Op(
                "capture",
                f"{op.key}-capture",
                f"/v1/reservations/{rid}/capture",
                {"amount": op.then_amount},
                op.then_amount,
                reservation=rid,
            )
        else:
            child = Op(
                "release",
                f"{op.key}-release",
                f"/v1/reservations/{rid}/release",
                {},
                op.amount,
                reservation=rid,
            )
        op.child = child
        self.tally.ops.append(child)
        return child

    async def send(self, op: Op) -> float | None:
        """One attempt. None when the answer is final, else seconds to wait
        before sending it again."""
        op.attempts += 1
        try:
            r = await self.client.post(op.path, json=op.body, headers={"Idempotency-Key": op.key})
        except httpx.TransportError as exc:
            self.tally.transport[type(exc).__name__] += 1
            return 0.2
        status = r.status_code
        self.tally.answers[status] += 1
        if status == 503:
            self.tally.codes[f"503 {problem_code(r)}"] += 1
            retry_after = r.headers.get("Retry-After")
            if retry_after is None:
                self.tally.violate(f"{op.kind} {op.key}: 503 without Retry-After: {r.text[:200]}")
                return 0.5
            try:
                return min(1.0, max(0.05, float(retry_after)))
            except ValueError:
                self.tally.violate(f"{op.kind} {op.key}: 503 Retry-After {retry_after!r}")
                return 0.5
        if status == 409:
            code = problem_code(r)
            self.tally.codes[f"409 {code}"] += 1
            if code == "idempotency_key_in_progress":
                return 0.1
            op.final, op.code = status, code
            op.replayed = r.headers.get("Idempotent-Replayed") == "true"
            if code == "insufficient_credits":
                self.tally.violate(
                    f"{op.kind} {op.key}: 409 insufficient_credits on a wallet funded with "
                    f"{WALLET_FUNDING} (a retryable failure reported as a rejection?): "
                    f"{r.text[:300]}"
                )
            elif op.kind in RESERVATION_KINDS:
                self.tally.violate(
                    f"{op.kind} {op.key}: 409 {code} (each reservation is captured or "
                    f"released once, retries with the same key): {r.text[:300]}"
                )
            return None
        if 200 <= status < 300:
            op.final = status
            op.replayed = r.headers.get("Idempotent-Replayed") == "true"
            if op.kind == "reserve":
                try:
                    body = r.json()
                except ValueError:
                    body = None
                op.result = body if isinstance(body, dict) else None
            return None
        code = problem_code(r)
        self.tally.codes[f"{status} {code}"] += 1
        detail = f"request {r.headers.get('X-Request-Id')}" if status >= 500 else r.text[:300]
        self.tally.violate(
            f"{op.kind} {op.key}: answered {status} {code} (only 2xx, 409, 503 allowed): {detail}"
        )
        if status >= 500:
            # 5xx are not stored (API.md): the same key again tells whether
            # the effect happened, so the balances can still be checked.
            op.server_errors += 1
            return 0.2
        op.final, op.code = status, problem_code(r)
        return None

    async def settle(self, op: Op, attempts: int, seconds: float) -> None:
        """Send op again (same key, same body) until final or a bound."""
        deadline = time.monotonic() + seconds
        while op.final is None and op.attempts < attempts and time.monotonic() < deadline:
            wait = await self.send(op)
            if wait is not None and op.final is None:
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))  # noqa: S311  # why: jitter

    async def worker(self, w: int, deadline: float, seed: int) -> None:
        rng = random.Random(seed * 1000 + w)  # noqa: S311  # why: load shape, not security
        for i in range(MAX_OPS_PER_WORKER):
            if time.monotonic() >= deadline:
                return
            op = self.make_op(rng, w, i)
            self.tally.ops.append(op)
            await self.settle(op, RETRY_ATTEMPTS, RETRY_SECONDS)
            # A reservation is captured or released even past the deadline:
            # the run leaves no hold behind.
            child = self.follow_up(op)
            if child is not None:
                await self.settle(child, RETRY_ATTEMPTS, RETRY_SECONDS)

    async def check_reservations(self, ops: Sequence[Op]) -> dict[str, Any]:
        """Every reservation that succeeded reads as its capture or release said."""
        reserves = [op for op in ops if op.kind == "reserve" and op.succeeded]
        wrong: list[str] = []
        unsettled = 0

        async def one(op: Op) -> None:
            nonlocal unsettled
            child = op.child
            if child is None or not child.succeeded:
                unsettled += 1
                return
            r = await self.client.get(f"/v1/reservations/{child.reservation}")
            body = r.json() if r.status_code == 200 else {}
            want = ("captured", child.amount) if child.kind == "capture" else ("released", None)
            got = (body.get("status"), body.get("captured"))
            if r.status_code != 200 or got != want:
                wrong.append(
                    f"{child.reservation} ({op.key}): {r.status_code} {got}, expected {want}"
                )

        def job(op: Op) -> Callable[[], Awaitable[None]]:
            return lambda: one(op)

        await bounded_gather(SETUP_CONCURRENCY, [job(op) for op in reserves])
        return {
            "reservations": len(reserves),
            "captured": sum(1 for op in reserves if op.child and op.child.kind == "capture"),
            "released": sum(1 for op in reserves if op.child and op.child.kind == "release"),
            "without_final_capture_or_release": unsettled,
            "wrong": wrong[:10],
            "passed": not wrong and unsettled == 0,
        }
