"""Three service processes on one database under a mixed load, one of them
killed midway: background work done once, idempotency across replicas, and
no acknowledged write lost."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench.process import Service, new_admin_key

REPO = Path(__file__).resolve().parent.parent
EMPLOYEES = [f"e-{i}" for i in range(10)]
# Wallets no request touches: only the sweeper expires their lots and reservations.
IDLE = [f"idle-{i}" for i in range(4)]
LOAD_SECONDS = 8.0
KILL_AFTER_SECONDS = 3.0
TXN = re.compile(r"txn_[0-9a-f]{32}")


@dataclass
class Ledger:
    """What the clients were told: every final answer, by idempotency key."""

    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    usage: int = 0  # credits acknowledged as spent (debits and captures)
    transport_errors: int = 0
    cross_replica_pairs: int = 0


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def _final(
    clients: list[httpx.AsyncClient],
    alive: list[bool],
    start: int,
    path: str,
    body: dict[str, Any],
    key: str,
    ledger: Ledger,
) -> tuple[int, dict[str, Any]]:
    """Send until a final answer, as a client does: on a transport error, a 503 or a key still
    in progress, the same key and body again, to the next live replica."""
    for attempt in range(40):
        live = [i for i in range(len(clients)) if alive[i]]
        replica = live[(start + attempt) % len(live)]
        try:
            r = await clients[replica].post(path, json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            ledger.transport_errors += 1
            await asyncio.sleep(0.05)
            continue
        if r.status_code == 503 or (
            r.status_code == 409 and r.json().get("code") == "idempotency_key_in_progress"
        ):
            await asyncio.sleep(0.05)
            continue
        return r.status_code, r.json()
    raise AssertionError(f"no final answer for {key}")


async def _worker(
    w: int, clients: list[httpx.AsyncClient], alive: list[bool], ledger: Ledger, stop: float
) -> None:
    rng = random.Random(w)  # noqa: S311  # why: test traffic, not secrets
    for n in itertools.count():
        if time.monotonic() > stop:
            return
        key = f"w{w}-{n}"
        emp = rng.choice(EMPLOYEES)
        kind = rng.choice(["debit", "debit", "transfer", "reserve_capture", "grant"])
        if kind == "debit":
            path, body = "/v1/debits", {"account": f"employee:{emp}", "amount": rng.randint(1, 9)}
        elif kind == "transfer":
            other = rng.choice([e for e in EMPLOYEES if e != emp])
            path, body = "/v1/transfers", {
                "from": f"employee:{emp}", "to": f"employee:{other}", "amount": 1
            }  # fmt: skip
        elif kind == "grant":
            path, body = "/v1/grants", {"employee": emp, "amount": 5, "reason": "spot_bonus"}
        else:
            path, body = "/v1/reservations", {"account": f"employee:{emp}", "amount": 20}
        if n % 4 == 0:
            # The same request to two replicas at once: one effect, the same answer twice.
            ledger.cross_replica_pairs += 1
            a, b = await asyncio.gather(
                _final(clients, alive, w, path, body, key, ledger),
                _final(clients, alive, w + 1, path, body, key, ledger),
            )
            assert a[0] == b[0] and a[1] == b[1], (key, a, b)
            status, answer = a
        else:
            status, answer = await _final(clients, alive, w, path, body, key, ledger)
        assert status in (200, 201) or answer.get("code") == "insufficient_credits", (key, answer)
        ledger.answers[key] = (status, answer)
        if status == 201 and kind == "debit":
            ledger.usage += body["amount"]
        if status == 201 and kind == "reserve_capture":
            capture_key = f"{key}-capture"
            status, captured = await _final(
                clients,
                alive,
                w + 2,
                f"/v1/reservations/{answer['id']}/capture",
                {"amount": 7},
                capture_key,
                ledger,
            )
            assert status == 200, captured
            ledger.answers[capture_key] = (status, captured)
            ledger.usage += 7


async def _setup(client: httpx.AsyncClient, now: datetime) -> None:
    async def ok(r: Any) -> None:
        response = await r
        assert response.status_code in (200, 201), response.text

    await ok(client.put("/v1/departments/eng", json={"name": "Engineering"}))
    for emp in EMPLOYEES + IDLE:
        body = {"name": emp, "email": f"{emp}@example.com", "department": "eng"}
        await ok(client.put(f"/v1/employees/{emp}", json=body))
    for emp in EMPLOYEES:
        body = {"employee": emp, "amount": 100_000, "reason": "adjustment"}
        await ok(client.post("/v1/grants", json=body, headers={"Idempotency-Key": f"g-{emp}"}))
    for emp in IDLE:
        # Expires during the load; nothing but the sweeper writes it down.
        expiring = {"employee": emp, "amount": 300, "reason": "adjustment",
                    "expires_at": _iso(now + timedelta(seconds=4))}  # fmt: skip
        await ok(client.post("/v1/grants", json=expiring, headers={"Idempotency-Key": f"x-{emp}"}))
        held = {"account": f"employee:{emp}", "amount": 50, "ttl_seconds": 2}
        await ok(
            client.post("/v1/reservations", json=held, headers={"Idempotency-Key": f"r-{emp}"})
        )
    # A program whose cycle of this month is due at once: every replica's scheduler runs it.
    program = {
        "amount": 10,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "starts_on": now.date().replace(day=1).isoformat(),
        "active": True,
    }
    await ok(client.put("/v1/grant-programs/monthly", json=program))


async def _eventually(db: asyncpg.Connection, query: str, *args: Any, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not await db.fetchval(query, *args):
        assert time.monotonic() < deadline, f"not within {within}s: {query}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_three_replicas_under_load_with_one_killed(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Three replicas on one database, a mixed load spread over them (a quarter of the requests
    sent to two replicas at once with one key), the third SIGKILLed after 3 s and its requests
    retried on the others: every acknowledged write is in the database and counted once, every
    key had one effect, and the sweeper, the reservation expiry, the scheduler and the chainer,
    running on all three, each did each piece of work exactly once."""
    admin_key = new_admin_key()
    env = {
        "TOKENLEDGER_WORKERS": "1",
        "TOKENLEDGER_SWEEPER_INTERVAL_SECONDS": "0.2",
        "TOKENLEDGER_STATEMENT_TIMEOUT_MS": "3000",
        "TOKENLEDGER_LOCK_TIMEOUT_MS": "2500",
        "TOKENLEDGER_CHAIN_SETTLE_SECONDS": "3.5",
        "TOKENLEDGER_LOG_LEVEL": "warning",
    }
    replicas = [
        Service(database_url, tmp_path / f"replica-{i}.log", pool_max_size=6, extra_env=env)
        for i in range(3)
    ]
    for replica in replicas:
        replica.admin_key = admin_key  # one bootstrap key: a new one would revoke the other's
        replica.start()
    clients: list[httpx.AsyncClient] = []
    try:
        await asyncio.gather(*(r.wait_ready() for r in replicas))
        clients = [
            httpx.AsyncClient(
                base_url=r.base_url,
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=15,
                trust_env=False,
            )
            for r in replicas
        ]
        now = datetime.now(UTC)
        await _setup(clients[0], now)
        alive = [True, True, True]
        ledger = Ledger()
        stop = time.monotonic() + LOAD_SECONDS

        async def kill_third() -> None:
            await asyncio.sleep(KILL_AFTER_SECONDS)
            proc = replicas[2].proc
            assert proc is not None
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            alive[2] = False

        await asyncio.gather(
            kill_third(), *(_worker(w, clients, alive, ledger, stop) for w in range(12))
        )
        assert ledger.transport_errors > 0, "the kill interrupted no request: nothing was tested"
        assert len(ledger.answers) > 100 and ledger.cross_replica_pairs > 20

        # Background work, from the two replicas left.
        await _eventually(
            db,
            "SELECT NOT EXISTS (SELECT 1 FROM lots WHERE expires_at <= now() AND live "
            "AND status = 'active' AND reserved = 0)",
        )
        await _eventually(
            db,
            "SELECT NOT EXISTS (SELECT 1 FROM reservations WHERE status = 'active' "
            "AND expires_at <= now())",
        )
        await _eventually(
            db, "SELECT count(*) = $1 FROM program_grants", len(EMPLOYEES) + len(IDLE)
        )
        await _eventually(
            db,
            "SELECT NOT EXISTS (SELECT 1 FROM transactions t WHERE t.created_at < now() - "
            "interval '4 s' AND NOT EXISTS (SELECT 1 FROM chain c WHERE c.transaction_id = t.id))",
        )
    finally:
        for client in clients:
            await client.aclose()
        for replica in replicas:
            replica.stop()

    # No acknowledged write lost: every transaction an answer named is in the journal.
    named = {t for _, body in ledger.answers.values() for t in TXN.findall(str(body))}
    stored = {
        "txn_" + r["id"].hex
        for r in await db.fetch(
            "SELECT id FROM transactions WHERE id = ANY ($1::uuid[])", [t[4:] for t in named]
        )  # fmt: skip
    }
    assert named and named == stored, sorted(named - stored)[:5]
    # Each key one effect: what system:usage received is exactly what was acknowledged.
    usage = await db.fetchval(
        "SELECT coalesce(sum(e.amount), 0) FROM entries e JOIN accounts a ON a.id = e.account_id "
        "JOIN transactions t ON t.id = e.transaction_id WHERE a.address = 'system:usage' "
        "AND t.kind IN ('debit', 'capture')"
    )
    assert usage == ledger.usage, (usage, ledger.usage)
    print(  # the figures of the run, for the record (-s shows them)
        f"replicas: {len(ledger.answers)} answers, {ledger.cross_replica_pairs} cross-replica "
        f"pairs, {ledger.transport_errors} transport errors retried, {usage} credits used"
    )
    # The sweeper expired each due credit once: the expiries took from each idle
    # lot exactly its grant, nothing from any other lot. A lot takes two expiry
    # transactions only when the hold on it outlived its expiry (a slow setup:
    # the lot is due 4 s after `now`, the 2 s reservation made after it), so its
    # unreserved part expired first and the held 50 when the reservation gave it
    # back; never two for one piece of work.
    expired = await db.fetch(
        "SELECT m.lot_id, count(*) AS n, -sum(m.amount) AS credits, min(l.amount) AS granted, "
        "bool_or(EXISTS (SELECT 1 FROM reservation_holds h WHERE h.lot_id = m.lot_id)) AS held "
        "FROM lot_movements m JOIN transactions t ON t.id = m.transaction_id "
        "JOIN lots l ON l.id = m.lot_id WHERE t.kind = 'expiry' GROUP BY m.lot_id"
    )
    assert len(expired) == len(IDLE), expired
    for lot in expired:
        assert lot["credits"] == lot["granted"] == 300, dict(lot)
        assert lot["n"] == 1 or (lot["n"] == 2 and lot["held"]), dict(lot)
    idle_expired = await db.fetchval(
        "SELECT count(*) FROM reservations WHERE status = 'expired' AND resolved_at IS NOT NULL"
    )
    assert idle_expired == len(IDLE)
    # The scheduler issued the cycle once: one grant per employee, whichever replica ran it.
    issued = await db.fetchval(
        "SELECT coalesce(sum(issued), 0) FROM program_runs WHERE program_id = 'monthly'"
    )
    assert issued == len(EMPLOYEES) + len(IDLE)
    # The chainer appended each transaction once, in one unbroken chain.
    gaps = await db.fetchrow("SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM chain")
    assert (gaps["lo"], gaps["hi"]) == (1, gaps["n"])
    audit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "audit", "--verify-chain", "--database-url",
        database_url, "--max-lag-seconds", "600",
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(audit.communicate(), 120)
    assert audit.returncode == 0, out.decode()
