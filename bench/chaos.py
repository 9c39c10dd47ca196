"""Load while the service's database connections are killed; then count.

    python -m bench.chaos [--seconds 30] [--workers 16] [--kill-every 2]
                          [--json PATH] [--database-url DSN] [--seed N]

The service runs as in the benchmark (bench/process.py). For --seconds,
--workers workers send debits, transfers, grants and reservations (reserve,
then capture -- now and then more than held -- or release) against
well-funded wallets while, every --kill-every seconds, a separate connection
runs `pg_terminate_backend` on every connection the service holds
(application_name = 'tokenledger', in the chaos database only).

Rules checked (any violation exits 1):

* every answer is 2xx, 409 or 503, and a 503 carries Retry-After;
* no `insufficient_credits`: the wallets hold far more than the run can spend,
  so one would be a retryable failure reported as a business rejection;
* no 409 at all on a reserve, capture or release (each reservation gets
  exactly one capture or release, so `reservation_not_active` would mean a
  retry was not recognised as one);
* a request answered 503, `idempotency_key_in_progress`, a transport error or
  (after recording the violation) another 5xx is sent again with the SAME
  Idempotency-Key and body until it gets a final answer (bounded); after the
  load stops, the ones still open are settled the same way, and none may stay
  unknown; a reservation is captured or released only once its reserve has a
  final answer (from which it takes the reservation id), and the reservations
  that got theirs only while settling are captured or released then;
* effects equal balances: what system:usage gained equals the successful
  debits plus captures, the wallets' sum moved by grants minus debits minus
  captures, and system:issuance by minus the grants;
* after settling, `reserved` is 0 on every wallet, and every reservation reads
  `captured` (with the amount captured) or `released`, as its answer said;
* the audit passes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import RESULTS_DIR
from bench.api import SETUP_CONCURRENCY, Api, bounded_gather, make_client, problem_code
from bench.driver import run_async
from bench.postgres import provision, redact
from bench.process import Service, run_audit
from bench.report import git_commit, machine_facts, write_json

DEFAULT_JSON = RESULTS_DIR / "chaos.json"
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
READY_AGAIN_SECONDS = 30.0

KILL_SQL = """
SELECT count(*) FROM (
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE application_name = 'tokenledger' AND datname = current_database()
      AND pid <> pg_backend_pid()
) AS killed
"""


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


async def killer(dsn: str, every: float, stop: asyncio.Event, tally: Tally) -> None:
    """Every `every` seconds, terminate the service's database connections."""
    conn: asyncpg.Connection | None = None
    try:
        conn = await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": "tokenledger-chaos"}
        )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
                return
            except TimeoutError:
                pass
            try:
                killed = await conn.fetchval(KILL_SQL, timeout=10)
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                tally.kill_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            tally.kills += 1
            tally.connections_killed += int(killed or 0)
    finally:
        if conn is not None:
            await conn.close(timeout=10)


async def balances(api: Api, wallets: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Posted balances (system accounts, the wallets' sum), and the wallets
    whose `reserved` is not 0."""
    out = {
        "system:usage": await api.posted("system:usage"),
        "system:issuance": await api.posted("system:issuance"),
    }
    accounts = {w: await api.account(f"employee:{w}") for w in wallets}
    out["wallets"] = sum(int(a["posted"]) for a in accounts.values())
    reserved = {w: int(a["reserved"]) for w, a in accounts.items() if int(a["reserved"]) != 0}
    return out, reserved


async def wait_ready_again(service: Service, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=service.base_url, timeout=2.0, trust_env=False) as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    return False


@dataclass
class ChaosOptions:
    seconds: float = 30.0
    workers: int = 16
    kill_every: float = 2.0
    json_path: Path = DEFAULT_JSON
    database_url: str | None = None
    seed: int = 1


async def run_chaos(opts: ChaosOptions) -> dict[str, Any]:
    run_id = f"c{os.getpid()}-{int(time.time())}"
    tally = Tally()
    result: dict[str, Any] = {
        "tool": "tokenledger chaos",
        "started_at": datetime.now(UTC).isoformat(),
        "git_commit": git_commit(),
        "options": {
            "seconds": opts.seconds,
            "workers": opts.workers,
            "kill_every": opts.kill_every,
            "seed": opts.seed,
        },
        "checks": {},
    }
    db = await provision(opts.database_url, f"tokenledger_chaos_{os.getpid()}")
    result["database"] = {"source": db.source, "dsn": redact(db.dsn)}
    log_path = opts.json_path.with_suffix(".service.log")
    service = Service(db.dsn, log_path)
    result["service_log"] = str(log_path)
    wallets = [f"chaos-{k}" for k in range(2 * opts.workers)]
    try:
        service.start()
        await service.wait_ready()
        async with make_client(service.base_url, opts.workers, service.admin_key) as client:
            api = Api(client, run_id)
            await api.department()
            await api.employees(wallets)
            await api.grants({w: WALLET_FUNDING for w in wallets})
            before, reserved_before = await balances(api, wallets)
            chaos = Chaos(client, wallets, tally, run_id)

            started = time.monotonic()
            deadline = started + opts.seconds
            stop = asyncio.Event()
            kill_task = asyncio.create_task(killer(db.dsn, opts.kill_every, stop, tally))
            try:
                await asyncio.gather(
                    *(chaos.worker(w, deadline, opts.seed) for w in range(opts.workers))
                )
            finally:
                stop.set()
                await kill_task
            result["load_seconds"] = round(time.monotonic() - started, 2)

            open_ops = [op for op in tally.ops if op.final is None]
            result["open_after_load"] = len(open_ops)
            settle_deadline = time.monotonic() + SETTLE_SECONDS
            for op in open_ops:
                left = settle_deadline - time.monotonic()
                if left <= 0:
                    break
                await chaos.settle(op, op.attempts + SETTLE_ATTEMPTS, left)
            # Reservations whose reserve got its final answer only while
            # settling are captured or released now, the same way.
            follow_deadline = time.monotonic() + SETTLE_SECONDS
            for op in [op for op in tally.ops if op.kind == "reserve"]:
                left = follow_deadline - time.monotonic()
                if left <= 0:
                    break
                child = chaos.follow_up(op)
                if child is not None:
                    await chaos.settle(child, SETTLE_ATTEMPTS, left)
            unknown = [op for op in tally.ops if op.final is None]
            unfollowed = [
                op for op in tally.ops if op.kind == "reserve" and op.succeeded and op.child is None
            ]
            for op in unfollowed[:10]:
                tally.violate(f"reserve {op.key}: succeeded, but was never captured or released")
            for op in unknown[:10]:
                tally.violate(f"{op.kind} {op.key}: no final answer after {op.attempts} attempts")
            if len(unknown) > 10:
                tally.violate(f"... {len(unknown)} operations in all without a final answer")

            ready = await wait_ready_again(service, READY_AGAIN_SECONDS)
            result["checks"]["ready_after_chaos"] = {"passed": ready}
            if not ready:
                tally.violate(f"GET /readyz not 200 within {READY_AGAIN_SECONDS:.0f}s after")
            after, reserved_after = await balances(api, wallets)
            reservations = await chaos.check_reservations(tally.ops)

        ok = {kind: [op for op in tally.ops if op.kind == kind and op.succeeded] for kind in KINDS}
        debited = sum(op.amount for op in ok["debit"])
        granted = sum(op.amount for op in ok["grant"])
        captured = sum(op.amount for op in ok["capture"])
        gains = {k: after[k] - before[k] for k in after}
        effects: dict[str, dict[str, Any]] = {
            "system_usage": {"expected_gain": debited + captured, "gain": gains["system:usage"]},
            "system_issuance": {"expected_gain": -granted, "gain": gains["system:issuance"]},
            "wallets": {
                "expected_gain": granted - debited - captured,
                "gain": gains["wallets"],
            },
        }
        for name, check in effects.items():
            check["passed"] = check["gain"] == check["expected_gain"] and not unknown
            if unknown:
                check["note"] = "some operations have no final answer: effects unknown"
            elif not check["passed"]:
                tally.violate(
                    f"effects != balances: {name} gained {check['gain']}, "
                    f"successful operations say {check['expected_gain']}"
                )
            result["checks"][name] = check
        # Holds: none before the load, none left after settling.
        reserved_check: dict[str, Any] = {
            "nonzero_before": dict(list(reserved_before.items())[:10]),
            "nonzero_after": dict(list(reserved_after.items())[:10]),
            "reserved_after": sum(reserved_after.values()),
            "passed": not reserved_before and not reserved_after and not unknown,
        }
        if unknown:
            reserved_check["note"] = "some operations have no final answer: holds unknown"
        elif reserved_before or reserved_after:
            tally.violate(
                f"reserved not 0 on {len(reserved_before)} wallet(s) before the load and "
                f"{len(reserved_after)} after settling: {dict(list(reserved_after.items())[:5])}"
            )
        result["checks"]["wallets_reserved"] = reserved_check
        if unknown:
            reservations["passed"] = False
            reservations["note"] = "some operations have no final answer"
        elif not reservations["passed"]:
            for line in reservations["wrong"]:
                tally.violate(f"reservation {line}")
            if reservations["without_final_capture_or_release"]:
                tally.violate(
                    f"{reservations['without_final_capture_or_release']} reservation(s) "
                    "without a successful capture or release"
                )
        result["checks"]["reservations"] = reservations

        result["operations"] = {
            kind: {
                "sent": sum(1 for op in tally.ops if op.kind == kind),
                "succeeded": len(ok[kind]),
                "succeeded_on_retry": sum(1 for op in ok[kind] if op.attempts > 1),
                "succeeded_by_replay": sum(1 for op in ok[kind] if op.replayed),
                "succeeded_after_5xx": sum(1 for op in ok[kind] if op.server_errors),
                # The effect had happened although the service answered 5xx:
                # the retry got the stored answer back.
                "committed_despite_5xx": sum(
                    1 for op in ok[kind] if op.server_errors and op.replayed
                ),
                "rejected_409": sum(1 for op in tally.ops if op.kind == kind and op.final == 409),
                "unknown": sum(1 for op in unknown if op.kind == kind),
                "credits": sum(op.amount for op in ok[kind]),
            }
            for kind in KINDS
        }
    finally:
        result["service_stop"] = await asyncio.to_thread(service.stop)
        result["service_log_events"] = dict(service.log_events())
        result["service_unhandled_exceptions"] = dict(service.unhandled_exceptions())
        try:
            audit = await asyncio.to_thread(run_audit, db.dsn)
            result["checks"]["audit"] = audit
            if not audit["passed"]:
                tally.violate("audit failed: " + audit["output"][-500:])
            result["machine"] = machine_facts(db)
        finally:
            await db.drop()

    attempts = sum(op.attempts for op in tally.ops)
    result.update(
        {
            "answers": {str(k): v for k, v in sorted(tally.answers.items())},
            "answer_codes": dict(tally.codes),
            "transport_errors": dict(tally.transport),
            "requests": attempts,
            "retries": attempts - len(tally.ops),
            "kills": tally.kills,
            "connections_killed": tally.connections_killed,
            "kill_errors": tally.kill_errors[:10],
            "violations": tally.violations,
            "finished_at": datetime.now(UTC).isoformat(),
        }
    )
    if tally.kills == 0 and opts.seconds >= opts.kill_every:
        tally.violate("the killer never ran: the run proves nothing")
    result["passed"] = not tally.violations
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"chaos: {result['options']['workers']} workers for {result.get('load_seconds', '?')}s, "
        f"connections killed every {result['options']['kill_every']}s",
        f"kills: {result['kills']} rounds, {result['connections_killed']} connections terminated",
        f"requests: {result['requests']} ({result['retries']} retries with the same key)",
        "answers: " + ", ".join(f"{k}={v}" for k, v in result["answers"].items()),
    ]
    if result["answer_codes"]:
        lines.append("codes: " + ", ".join(f"{k}={v}" for k, v in result["answer_codes"].items()))
    if result["transport_errors"]:
        lines.append(
            "transport errors: "
            + ", ".join(f"{k}={v}" for k, v in result["transport_errors"].items())
        )
    lines.append(
        f"{'operation':<10}{'sent':>7}{'ok':>7}{'ok/retry':>9}{'replayed':>9}"
        f"{'ok/5xx':>7}{'5xx+done':>9}{'409':>6}{'unknown':>8}{'credits':>9}"
    )
    for kind, o in result.get("operations", {}).items():
        lines.append(
            f"{kind:<10}{o['sent']:>7}{o['succeeded']:>7}{o['succeeded_on_retry']:>9}"
            f"{o['succeeded_by_replay']:>9}{o['succeeded_after_5xx']:>7}"
            f"{o['committed_despite_5xx']:>9}"
            f"{o['rejected_409']:>6}{o['unknown']:>8}{o['credits']:>9}"
        )
    for name, check in result["checks"].items():
        verdict = "pass" if check.get("passed") else "FAIL"
        detail = ""
        if "gain" in check:
            detail = f" (gain {check['gain']}, expected {check['expected_gain']})"
        elif "reserved_after" in check:
            detail = f" (reserved after settling {check['reserved_after']}, expected 0)"
        elif "reservations" in check:
            detail = (
                f" ({check['reservations']} reservations: {check['captured']} captured, "
                f"{check['released']} released, {len(check['wrong'])} wrong, "
                f"{check['without_final_capture_or_release']} without a final capture/release)"
            )
        lines.append(f"check {name}: {verdict}{detail}")
    events = result.get("service_log_events", {})
    if events:
        lines.append(
            "service log events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items()))
        )
    for exc, n in result.get("service_unhandled_exceptions", {}).items():
        lines.append(f"  500 x{n}: {exc}")
    lines.append(f"service stop: {result.get('service_stop')}")
    shown = 15
    for v in result["violations"][:shown]:
        lines.append(f"VIOLATION {v}")
    if len(result["violations"]) > shown:
        lines.append(f"... {len(result['violations']) - shown} more violations in the JSON")
    lines.append("result: " + ("PASS" if result["passed"] else "FAIL"))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> ChaosOptions:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="load time (default 30)")
    parser.add_argument("--workers", type=int, default=16, help="workers (default 16)")
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="seconds between connection kills (default 2)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        dest="json_path",
        help="write the JSON result here (default bench/results/chaos.json)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL server to create the chaos database on "
        "(default DATABASE_URL; unset: a throwaway server)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if not 2 <= args.workers <= 256:
        parser.error("--workers must be 2..256")
    if not 0.1 <= args.kill_every <= 600:
        parser.error("--kill-every must be 0.1..600")
    return ChaosOptions(
        seconds=args.seconds,
        workers=args.workers,
        kill_every=args.kill_every,
        json_path=args.json_path.resolve(),
        database_url=args.database_url,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    result = run_async(run_chaos(opts))
    write_json(result, opts.json_path)
    print(summary(result))
    print(f"chaos: wrote {opts.json_path}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
