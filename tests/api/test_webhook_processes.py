"""Webhook delivery across real service processes (issue 14): a service killed
with SIGKILL mid-send loses nothing, and three replicas on one database send
each of 500 events once. `python -m service` processes (bench/process.py),
a real HTTP receiver on loopback (tests/webhook_receiver.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench.process import Service
from tests.api.conftest import TEST_WEBHOOK_KEY, key
from tests.webhook_receiver import Receiver, receiving

pytestmark = pytest.mark.slow


def service(database_url: str, log: Path, **extra: str) -> Service:
    env = {
        "TOKENLEDGER_WORKERS": "1",
        "TOKENLEDGER_APPLY_SCHEMA": "false",
        "TOKENLEDGER_BACKGROUND_ENABLED": "false",
        "TOKENLEDGER_POOL_MIN_SIZE": "1",
        "TOKENLEDGER_WEBHOOK_SECRET_KEY": TEST_WEBHOOK_KEY,
        "TOKENLEDGER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TOKENLEDGER_WEBHOOK_POLL_INTERVAL_SECONDS": "0.05",
        "TOKENLEDGER_WEBHOOK_TIMEOUT_SECONDS": "1",
        "TOKENLEDGER_WEBHOOK_RETRY_BASE_SECONDS": "0.1",
        "TOKENLEDGER_WEBHOOK_RETRY_MAX_SECONDS": "0.5",
        **extra,
    }
    return Service(database_url, log, pool_max_size=5, extra_env=env)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


async def admin_post(svc: Service, path: str, body: Any) -> Any:
    async with httpx.AsyncClient(base_url=svc.base_url, timeout=30, trust_env=False) as c:
        r = await c.post(
            path, json=body, headers={"Authorization": f"Bearer {svc.admin_key}", **key()}
        )
        assert r.status_code in (200, 201), r.text
        return r.json()


async def admin_put(svc: Service, path: str, body: Any) -> None:
    async with httpx.AsyncClient(base_url=svc.base_url, timeout=30, trust_env=False) as c:
        r = await c.put(path, json=body, headers={"Authorization": f"Bearer {svc.admin_key}"})
        assert r.status_code in (200, 201), r.text


async def test_a_killed_service_loses_no_event(
    database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """SIGKILL while one event's send is in flight and another is committed but not
    sent: after a restart both are delivered (the first again, same webhook-id)."""
    first_seen = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hang_first(index: int) -> int:
        if index == 0:
            loop.call_soon_threadsafe(first_seen.set)
            time.sleep(3)  # the service is killed meanwhile
        return 200

    receiver.behaviours["/crash"] = hang_first
    # A's timeout outlasts the moment between the receiver's first request and the
    # kill, however loaded the machine (the kill, not a timeout, cuts the send off).
    a = service(
        database_url,
        tmp_path / "a.log",
        TOKENLEDGER_WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT="1",
        TOKENLEDGER_WEBHOOK_TIMEOUT_SECONDS="2",
    )
    b = service(database_url, tmp_path / "b.log")
    try:
        a.start()
        await a.wait_ready()
        await admin_post(
            a, "/v1/webhooks", {"url": receiver.url("/crash"), "events": ["grant.created"]}
        )
        await admin_put(a, "/v1/departments/eng", {"name": "Eng"})
        await admin_put(
            a, "/v1/employees/e1", {"name": "E", "email": "e@example.com", "department": "eng"}
        )
        # Both committed at once; the per-endpoint cap of 1 holds the second back
        # while the first is in flight.
        await admin_post(a, "/v1/grants", {"employee": "e1", "amount": 5, "reason": "spot_bonus"})
        await admin_post(a, "/v1/grants", {"employee": "e1", "amount": 7, "reason": "spot_bonus"})
        await asyncio.wait_for(first_seen.wait(), timeout=15)
        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no shutdown, no record of the send in flight
        a.proc.wait(timeout=10)
        b.start()
        await b.wait_ready()
        got = await receiver.wait_for("/crash", 3, within=30)
        ids = Counter(r.webhook_id for r in got)
        amounts = sorted({r.json()["data"]["amount"] for r in got})
        assert amounts == [5, 7]
        assert sorted(ids.values()) == [1, 2]  # the interrupted one was sent again
        conn = await asyncpg.connect(database_url)
        try:
            # The receiver has answered; the service records that a moment later.
            deadline = time.monotonic() + 15
            while True:
                rows = await conn.fetch("SELECT status FROM webhook_deliveries ORDER BY status")
                statuses = [r["status"] for r in rows]
                if statuses == ["delivered", "delivered"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert statuses == ["delivered", "delivered"]
            cut = await conn.fetchval(
                "SELECT count(*) FROM webhook_attempts WHERE finished_at IS NULL"
            )
            assert cut == 1  # the attempt the kill cut off stays in the log, without an outcome
        finally:
            await conn.close()
    finally:
        a.stop()
        b.stop()


async def test_three_replicas_send_each_event_once(
    database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """Three service processes on one database deliver each of 500 events exactly once."""
    replicas = [
        service(
            database_url,
            tmp_path / f"r{i}.log",
            TOKENLEDGER_WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT="8",
            # No attempt may time out on a loaded box and be sent twice: the
            # receiver answers at once, so this only bounds a stall.
            TOKENLEDGER_WEBHOOK_TIMEOUT_SECONDS="10",
        )
        for i in range(3)
    ]
    # One bootstrap admin key for all: each replica ensures it at start-up.
    for svc in replicas[1:]:
        svc.admin_key = replicas[0].admin_key
    try:
        for svc in replicas:
            svc.start()
        await asyncio.gather(*(svc.wait_ready() for svc in replicas))
        first = replicas[0]
        await admin_post(
            first, "/v1/webhooks", {"url": receiver.url("/r"), "events": ["grant.created"]}
        )
        await admin_put(first, "/v1/departments/eng", {"name": "Eng"})
        await admin_put(
            first, "/v1/employees/e1", {"name": "E", "email": "e@example.com", "department": "eng"}
        )
        grants = [
            {"key": f"g-{i}", "employee": "e1", "amount": i + 1, "reason": "spot_bonus"}
            for i in range(500)
        ]
        result = await admin_post(first, "/v1/grants:batch", {"grants": grants})
        assert {r["status"] for r in result["results"]} == {"created"}
        got = await receiver.wait_for("/r", 500, within=60)
        await asyncio.sleep(1.0)  # a duplicate would arrive within this
        got = receiver.on("/r")
        ids = Counter(r.webhook_id for r in got)
        assert len(ids) == 500 and set(ids.values()) == {1}, ids.most_common(3)
        assert len(got) == 500
        conn = await asyncpg.connect(database_url)
        try:
            # Every delivery was answered 200 once, and no attempt was a second send of
            # one that had already been delivered.
            answered = await conn.fetch(
                "SELECT delivery_id, count(*) AS n FROM webhook_attempts"
                " WHERE status_code = 200 GROUP BY delivery_id"
            )
            others = await conn.fetch(
                "SELECT error FROM webhook_attempts WHERE status_code IS DISTINCT FROM 200"
            )
            assert len(answered) == 500 and {r["n"] for r in answered} == {1}, others
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'"
                )
                == 500
            )
        finally:
            await conn.close()
        for svc in replicas:
            assert svc.alive(), svc.log_tail()
    finally:
        for svc in replicas:
            svc.stop()
