"""Alerts and webhooks (issue 14): events in the outbox, signed deliveries to a
real HTTP receiver on loopback, retries, the URL guard and alert settings.

The app runs in-process with its dispatcher polling every 50 ms; deliveries
go over real HTTP to tests/webhook_receiver.py. The tests with real service
processes (a crash, three replicas) are in test_webhook_processes.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from service.config import Config
from service.webhooks import AddressNotAllowed, check_url, resolve_allowed, sign
from tests.api.conftest import Api, FakeClock, key, problem, running
from tests.webhook_receiver import Receiver, receiving
from tokenledger_client import WebhookVerificationError, verify

WEBHOOK_KEY = base64.b64encode(b"k" * 32).decode()


def webhook_config(config: Config, **changes: Any) -> Config:
    """The suite's config with webhooks on: fast polling and retries, private
    addresses allowed (the receiver is on loopback)."""
    base: dict[str, Any] = {
        "webhook_secret_key": WEBHOOK_KEY,
        "webhook_allow_private": True,
        "webhook_dispatcher_enabled": True,
        "webhook_poll_interval_seconds": 0.05,
        "webhook_timeout_seconds": 2.0,
        "webhook_retry_base_seconds": 0.05,
        "webhook_retry_max_seconds": 0.2,
    }
    base.update(changes)
    return msgspec.structs.replace(config, **base)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture
async def hooks(
    config: Config, clock: FakeClock, admin_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """An admin client on an app whose dispatcher delivers to loopback."""
    app = create(webhook_config(config), clock)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver.local",
            timeout=30,
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            c.app = app  # type: ignore[attr-defined]  # why: tests reach the app's state
            yield c


def create(config: Config, clock: FakeClock) -> Any:
    from service.app import create_app

    return create_app(config, clock=clock)


async def subscribe(c: httpx.AsyncClient, url: str, events: list[str]) -> dict[str, Any]:
    r = await c.post("/v1/webhooks", json={"url": url, "events": events}, headers=key())
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def settled(database_url: str, within: float = 20.0) -> None:
    """Every event is fanned out and no delivery is pending."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + within
        while True:
            left = await conn.fetchval(
                "SELECT (SELECT count(*) FROM outbox WHERE fanned_out_at IS NULL)"
                " + (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending')"
            )
            if left == 0:
                return
            assert time.monotonic() < deadline, f"{left} events or deliveries still pending"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def outbox(db: asyncpg.Connection, type_: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT data FROM outbox WHERE type = $1 ORDER BY seq", type_)
    return [msgspec.json.decode(r["data"]) for r in rows]


# --- balance.low -------------------------------------------------------------


async def test_balance_low_fires_once_per_crossing_and_rearms(
    hooks: httpx.AsyncClient, receiver: Receiver, database_url: str, db: asyncpg.Connection
) -> None:
    """Debits crossing a threshold produce exactly one balance.low; 50 more debits below
    it produce none; a grant back above it and another crossing produce a second."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 1000)
    hook = await subscribe(hooks, receiver.url("/low"), ["balance.low"])
    r = await hooks.put("/v1/accounts/employee:e1/alerts", json={"low_balance": [100]})
    assert r.status_code == 200, r.text
    assert r.json()["low_balance"] == [100]
    for _ in range(9):  # 1000 -> 100: the ninth debit reaches the threshold
        assert (await api.debit("employee:e1", 100)).status_code == 201
    for _ in range(50):
        assert (await api.debit("employee:e1", 1)).status_code == 201
    await settled(database_url)
    first = receiver.events("/low")
    assert [e["data"]["threshold"] for e in first] == [100]
    assert first[0]["data"]["account"] == "employee:e1"
    assert first[0]["data"]["available"] == 100
    await api.grant("e1", 500)  # 550: above the threshold again, re-armed
    assert (await api.debit("employee:e1", 460)).status_code == 201  # 90: crossed again
    await settled(database_url)
    events = receiver.events("/low")
    assert [(e["data"]["threshold"], e["data"]["available"]) for e in events] == [
        (100, 100),
        (100, 90),
    ]
    assert len({r.webhook_id for r in receiver.on("/low")}) == 2
    deliveries = (await hooks.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert [d["status"] for d in deliveries] == ["delivered", "delivered"]


async def test_balance_low_in_coalesced_batches(
    hooks: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Concurrent debits, coalesced into batched database calls, crossing two thresholds
    emit exactly one balance.low per threshold, and nothing for the debits refused."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 1000)
    r = await hooks.put("/v1/accounts/employee:e1/alerts", json={"low_balance": [500, 200]})
    assert r.status_code == 200, r.text
    answers = await asyncio.gather(*(api.debit("employee:e1", 10) for _ in range(120)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) == 100 and statuses.count(409) == 20
    events = await outbox(db, "balance.low")
    assert sorted(e["threshold"] for e in events) == [200, 500]
    assert await api.available("employee:e1") == 0


async def test_rolled_back_operation_emits_nothing(
    hooks: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A debit refused for insufficient credits would have crossed the threshold: it
    rolls back, and so does its event."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 100)
    r = await hooks.put("/v1/accounts/employee:e1/alerts", json={"low_balance": [50]})
    assert r.status_code == 200
    before = await db.fetchval("SELECT count(*) FROM outbox")
    problem(await api.debit("employee:e1", 101), 409, "insufficient_credits")
    assert await db.fetchval("SELECT count(*) FROM outbox") == before
    assert await outbox(db, "balance.low") == []


# --- the other events ---------------------------------------------------------


async def test_grant_reservation_and_program_events(
    hooks: httpx.AsyncClient, clock: FakeClock, db: asyncpg.Connection
) -> None:
    """grant.created per grant lot, reservation.expired when the sweeper writes an
    expiry, program.run.completed with its skipped counts: each in the outbox."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    clock.set(datetime(2026, 3, 1, 12, tzinfo=UTC))
    await api.employee("e1")
    await api.employee("e2")
    grant = await api.grant("e1", 300)
    created = await outbox(db, "grant.created")
    assert created[-1]["lot_id"] == grant["lot"]["id"]
    assert created[-1]["amount"] == 300 and created[-1]["reason"] == "spot_bonus"
    r = await hooks.post(
        "/v1/reservations",
        json={"account": "employee:e1", "amount": 50, "ttl_seconds": 60},
        headers=key(),
    )
    assert r.status_code == 201, r.text
    clock.advance(seconds=61)
    from service.background import Background

    await Background(hooks.app.state.ledger).sweep_expired()  # type: ignore[attr-defined]  # why: the app's ledger
    expired = await outbox(db, "reservation.expired")
    assert [e["reservation_id"] for e in expired] == [r.json()["id"]]
    r = await hooks.post("/v1/employees/e2/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    r = await hooks.put(
        "/v1/grant-programs/monthly",
        json={
            "amount": 10,
            "reason": "monthly_allotment",
            "cadence": {"every": "month", "day": 1},
            "audience": {"all": True},
            "starts_on": "2026-03-01",
            "active": True,
        },
    )
    assert r.status_code in (200, 201), r.text
    r = await hooks.post(
        "/v1/grant-programs/monthly/runs", json={"cycle": "2026-03"}, headers=key()
    )
    assert r.status_code == 200, r.text
    runs = await outbox(db, "program.run.completed")
    assert len(runs) == 1
    assert runs[0]["issued"] == 1 and runs[0]["skipped"] == {"offboarded": 1}


async def test_credits_expiring_once_per_lot_at_the_window(
    hooks: httpx.AsyncClient, clock: FakeClock, db: asyncpg.Connection
) -> None:
    """credits.expiring fires once per lot when the injected clock reaches
    expiring_within_days before its expires_at, and not again."""
    from service.background import Background

    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    start = datetime(2026, 5, 1, tzinfo=UTC)
    clock.set(start)
    await api.employee("e1")
    soon = await api.grant("e1", 70, expires_at=(start + timedelta(days=10)).isoformat())
    later = await api.grant("e1", 30, expires_at=(start + timedelta(days=20)).isoformat())
    await api.grant("e1", 5)  # never expires
    r = await hooks.put("/v1/accounts/employee:e1/alerts", json={"expiring_within_days": 7})
    assert r.status_code == 200
    background = Background(hooks.app.state.ledger)  # type: ignore[attr-defined]  # why: the app's ledger
    clock.set(start + timedelta(days=3) - timedelta(seconds=1))
    assert await background.emit_expiring() == 0
    clock.set(start + timedelta(days=3))
    assert await background.emit_expiring() == 1
    clock.set(start + timedelta(days=4))
    assert await background.emit_expiring() == 0
    clock.set(start + timedelta(days=13))
    assert await background.emit_expiring() == 1
    clock.set(start + timedelta(days=14))
    assert await background.emit_expiring() == 0
    events = await outbox(db, "credits.expiring")
    assert [(e["lot_id"], e["amount"]) for e in events] == [
        (soon["lot"]["id"], 70),
        (later["lot"]["id"], 30),
    ]


# --- deliveries ----------------------------------------------------------------


async def test_signatures_verify_and_tampering_fails(
    hooks: httpx.AsyncClient, receiver: Receiver, database_url: str
) -> None:
    """A delivery verifies with the client's verify() and with the Standard Webhooks
    HMAC computed by hand; a tampered body or an old timestamp fails verify()."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    hook = await subscribe(hooks, receiver.url("/signed"), ["grant.created"])
    secret = hook["secret"]
    assert secret.startswith("whsec_")
    await api.employee("e1")
    await api.grant("e1", 10)
    (got,) = await receiver.wait_for("/signed", 1)
    event = verify(got.body, got.headers, secret)
    assert event["type"] == "grant.created" and event["id"] == got.webhook_id
    assert event["id"].startswith("evt_")
    key_bytes = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{got.webhook_id}.{got.headers['webhook-timestamp']}.".encode() + got.body
    expected = base64.b64encode(hmac.new(key_bytes, signed, hashlib.sha256).digest()).decode()
    assert got.headers["webhook-signature"] == f"v1,{expected}"
    with pytest.raises(WebhookVerificationError):
        verify(got.body.replace(b"10", b"99"), got.headers, secret)
    old = int(time.time()) - 600
    stale = dict(
        got.headers,
        **{
            "webhook-timestamp": str(old),
            "webhook-signature": sign(secret, got.webhook_id, old, got.body),
        },
    )
    with pytest.raises(WebhookVerificationError):
        verify(got.body, stale, secret)
    other = (await subscribe(hooks, receiver.url("/other"), ["grant.created"]))["secret"]
    with pytest.raises(WebhookVerificationError):
        verify(got.body, got.headers, other)


async def test_failing_receiver_gets_the_same_id_and_delays_nobody(
    hooks: httpx.AsyncClient, receiver: Receiver, database_url: str
) -> None:
    """A receiver that fails 3 times then succeeds gets the event 4 times with the same
    webhook-id; a healthy receiver gets it at once, and a hanging one delays neither."""
    receiver.behaviours["/flaky"] = lambda i: 500 if i < 3 else 200

    def hang(i: int) -> int:
        time.sleep(3)
        return 200

    receiver.behaviours["/hang"] = hang
    flaky = await subscribe(hooks, receiver.url("/flaky"), ["grant.created"])
    await subscribe(hooks, receiver.url("/hang"), ["grant.created"])
    await subscribe(hooks, receiver.url("/ok"), ["grant.created"])
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    started = time.monotonic()
    await api.grant("e1", 10)
    (ok,) = await receiver.wait_for("/ok", 1, within=5)
    (hung,) = await receiver.wait_for("/hang", 1, within=5)
    # Sent one after the other, the healthy one would wait out the hanging one's
    # 2-second timeout.
    assert ok.at - hung.at < 1.5, "a hanging receiver delayed a healthy one"
    assert ok.at - started < 5
    attempts = await receiver.wait_for("/flaky", 4, within=10)
    assert len({a.webhook_id for a in attempts}) == 1
    assert attempts[0].webhook_id == ok.webhook_id
    await asyncio.sleep(0.3)
    assert len(receiver.on("/flaky")) == 4
    items = (await hooks.get(f"/v1/webhooks/{flaky['id']}/deliveries")).json()["items"]
    assert len(items) == 1 and items[0]["status"] == "delivered" and items[0]["attempts"] == 4
    assert [a["status_code"] for a in items[0]["attempt_log"]] == [500, 500, 500, 200]
    assert all(a["latency_seconds"] is not None for a in items[0]["attempt_log"])


async def test_redirects_are_not_followed(
    hooks: httpx.AsyncClient, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """A 302 answer is a failed attempt: the redirect target is never called."""
    receiver.behaviours["/moved"] = 302
    hook = await subscribe(hooks, receiver.url("/moved"), ["grant.created"])
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 10)
    await receiver.wait_for("/moved", 2)
    assert receiver.on("/redirected") == []
    items = (await hooks.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert items[0]["attempt_log"][0]["status_code"] == 302


async def test_delivery_fails_after_its_retry_window_and_can_be_retried_by_hand(
    hooks: httpx.AsyncClient, receiver: Receiver, db: asyncpg.Connection, database_url: str
) -> None:
    """Past its retry window (24 h; moved into the past here) a failing delivery is
    marked failed; a manual retry sends it once more, and is idempotent by its key."""
    receiver.behaviours["/down"] = 503
    hook = await subscribe(hooks, receiver.url("/down"), ["grant.created"])
    await db.execute("UPDATE webhook_deliveries SET retry_until = now() - interval '1 second'")
    await db.execute("ALTER TABLE webhook_deliveries ALTER COLUMN retry_until SET DEFAULT now()")
    await db.execute(
        "CREATE FUNCTION test_expire_now() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN NEW.retry_until := now(); RETURN NEW; END $$"
    )
    await db.execute(
        "CREATE TRIGGER test_expire_now BEFORE INSERT ON webhook_deliveries"
        " FOR EACH ROW EXECUTE FUNCTION test_expire_now()"
    )
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 10)
    await settled(database_url)
    items = (await hooks.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert items[0]["status"] == "failed" and items[0]["last_status_code"] == 503
    assert len(receiver.on("/down")) == 1
    receiver.behaviours["/down"] = 200
    url = f"/v1/webhooks/{hook['id']}/deliveries/{items[0]['id']}/retry"
    k = key()
    r = await hooks.post(url, headers=k)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    await settled(database_url)
    again = await hooks.post(url, headers=k)
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    await settled(database_url)
    assert len(receiver.on("/down")) == 2
    items = (await hooks.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert items[0]["status"] == "delivered"
    problem(
        await hooks.post(
            f"/v1/webhooks/{hook['id']}/deliveries/dlv_{'0' * 32}/retry", headers=key()
        ),
        404,
        "webhook_not_found",
    )


# --- subscriptions ---------------------------------------------------------------


async def test_webhook_lifecycle_and_secret_at_rest(
    hooks: httpx.AsyncClient, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """POST shows the secret once (and again on an idempotent replay), GET never; the
    database holds it encrypted; DELETE stops deliveries and answers 404 after."""
    body = {"url": receiver.url("/x"), "events": ["grant.created", "balance.low"]}
    k = key()
    r = await hooks.post("/v1/webhooks", json=body, headers=k)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["events"] == ["balance.low", "grant.created"]
    replay = await hooks.post("/v1/webhooks", json=body, headers=k)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == created
    got = (await hooks.get(f"/v1/webhooks/{created['id']}")).json()
    assert "secret" not in got and got["url"] == body["url"]
    listed = (await hooks.get("/v1/webhooks")).json()["items"]
    assert [w["id"] for w in listed] == [created["id"]]
    stored = await db.fetchval("SELECT secret_encrypted FROM webhooks")
    raw = base64.b64decode(created["secret"].removeprefix("whsec_"))
    assert created["secret"].encode() not in stored and raw not in stored
    assert (
        await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE body::text LIKE '%whsec_%'")
        == 0
    )
    assert (await hooks.delete(f"/v1/webhooks/{created['id']}")).status_code == 204
    problem(await hooks.get(f"/v1/webhooks/{created['id']}"), 404, "webhook_not_found")
    problem(await hooks.delete(f"/v1/webhooks/{created['id']}"), 404, "webhook_not_found")
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 10)
    await asyncio.sleep(0.3)
    assert receiver.on("/x") == []


async def test_webhook_requests_are_checked(hooks: httpx.AsyncClient) -> None:
    """Unknown event types, unknown fields and a missing Idempotency-Key answer 400."""
    ok = {"url": "http://127.0.0.1:9/x", "events": ["grant.created"]}
    problem(
        await hooks.post("/v1/webhooks", json={**ok, "events": ["balance.high"]}, headers=key()),
        400,
        "invalid_request",
    )
    problem(
        await hooks.post("/v1/webhooks", json={**ok, "secret": "x"}, headers=key()),
        400,
        "invalid_request",
    )
    problem(await hooks.post("/v1/webhooks", json=ok), 400, "idempotency_key_required")
    problem(await hooks.get("/v1/webhooks/wh_nope"), 404, "webhook_not_found")


async def test_webhooks_need_the_secret_key(
    config: Config, clock: FakeClock, admin_key: str
) -> None:
    """Without TOKENLEDGER_WEBHOOK_SECRET_KEY no webhook can be made: 503."""
    app = create(msgspec.structs.replace(config, webhook_secret_key=None), clock)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            r = await c.post(
                "/v1/webhooks",
                json={"url": "http://127.0.0.1:9/x", "events": ["grant.created"]},
                headers=key(),
            )
            problem(r, 503, "unavailable")


# --- the URL guard -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "https://127.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "https://169.254.169.254/latest/meta-data",
        "https://10.1.2.3/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",  # a name that resolves to a loopback address
        "http://example.com/hook",  # https only
        "https://user:pw@example.com/hook",
    ],
)
async def test_url_guard_refuses(url: str) -> None:
    """Private, loopback and link-local addresses, literal or resolved, and plain
    http are refused when private addresses are not allowed."""
    from service.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        await check_url(url, allow_private=False)


async def test_url_guard_allows_private_when_configured() -> None:
    """TOKENLEDGER_WEBHOOK_ALLOW_PRIVATE lifts both rules: http to loopback passes."""
    await check_url("http://127.0.0.1:8080/hook", allow_private=True)
    await check_url("http://localhost/hook", allow_private=True)
    with pytest.raises(AddressNotAllowed):
        await resolve_allowed("localhost", 80, False, 5.0)


async def test_api_refuses_private_urls(config: Config, clock: FakeClock, admin_key: str) -> None:
    """POST /v1/webhooks with private addresses allowed off answers 400 at $.url."""
    app = create(webhook_config(config, webhook_allow_private=False), clock)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            for url in ("http://127.0.0.1/x", "https://169.254.169.254/x", "https://localhost/x"):
                r = await c.post(
                    "/v1/webhooks", json={"url": url, "events": ["grant.created"]}, headers=key()
                )
                body = problem(r, 400, "invalid_request")
                assert body["errors"][0]["path"] == "$.url"


async def test_dns_is_checked_at_send_time(
    config: Config,
    clock: FakeClock,
    admin_key: str,
    receiver: Receiver,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """A webhook whose name resolves to a private address at send time (here made
    directly in the database, as if DNS had changed since) gets no request: the
    attempt is refused and logged."""
    app = create(webhook_config(config, webhook_allow_private=False), clock)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            import uuid as uuid_mod

            from service.webhooks import SecretBox

            box = SecretBox(base64.b64decode(WEBHOOK_KEY))
            hook_id = uuid_mod.uuid4()
            await db.execute(
                "INSERT INTO webhooks (id, url, events, secret_encrypted, created_at)"
                " VALUES ($1, $2, ARRAY['grant.created'], $3, now() - interval '1 minute')",
                hook_id,
                f"http://localhost:{receiver.port}/private",
                box.seal(hook_id, "whsec_" + base64.b64encode(b"s" * 32).decode()),
            )
            api = Api(c)  # type: ignore[arg-type]  # why: the same httpx client type
            await api.employee("e1")
            await api.grant("e1", 10)
            deadline = time.monotonic() + 10
            while True:
                error = await db.fetchval("SELECT error FROM webhook_attempts LIMIT 1")
                if error:
                    break
                assert time.monotonic() < deadline, "no attempt was recorded"
                await asyncio.sleep(0.05)
            assert error.startswith("refused")
            assert receiver.on("/private") == []


# --- alert settings ------------------------------------------------------------------


async def test_alert_settings_roles(api: Api, client: httpx.AsyncClient) -> None:
    """hr sets any wallet's alerts, an employee their own (others' are not found);
    a system account or a bad window answers 400; PUT replaces."""
    from tests.api.test_auth import employee_token

    await api.employee("e1")
    await api.employee("e2")
    r = await client.put(
        "/v1/accounts/employee:e1/alerts",
        json={"low_balance": [50, 10, 50], "expiring_within_days": 3},
    )
    assert r.status_code == 200, r.text
    assert r.json()["low_balance"] == [10, 50] and r.json()["expiring_within_days"] == 3
    token = {"Authorization": f"Bearer {employee_token('e1')}"}
    r = await client.put(
        "/v1/accounts/employee:e1/alerts", json={"low_balance": [5]}, headers=token
    )
    assert r.status_code == 200, r.text
    assert r.json()["expiring_within_days"] is None
    r = await client.get("/v1/accounts/employee:e1/alerts", headers=token)
    assert r.json()["low_balance"] == [5]
    r = await client.put(
        "/v1/accounts/employee:e2/alerts", json={"low_balance": [5]}, headers=token
    )
    assert r.status_code == 404
    problem(
        await client.put("/v1/accounts/system:usage/alerts", json={"low_balance": [5]}),
        400,
        "invalid_request",
    )
    problem(
        await client.put("/v1/accounts/employee:e1/alerts", json={"expiring_within_days": 91}),
        400,
        "invalid_request",
    )
    problem(
        await client.put("/v1/accounts/employee:nobody/alerts", json={}), 404, "employee_not_found"
    )


async def test_metrics_report_deliveries_and_lag(
    hooks: httpx.AsyncClient, receiver: Receiver, database_url: str
) -> None:
    """/metrics counts deliveries by outcome and retries, and reports the outbox lag."""
    receiver.behaviours["/m"] = lambda i: 500 if i == 0 else 200
    await subscribe(hooks, receiver.url("/m"), ["grant.created"])
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 10)
    await receiver.wait_for("/m", 2)
    await settled(database_url)
    await asyncio.sleep(1.1)  # /metrics asks the database at most once a second
    text = (await hooks.get("/metrics")).text
    assert 'tokenledger_webhook_deliveries_total{outcome="delivered"} 1.0' in text
    assert 'tokenledger_webhook_deliveries_total{outcome="retry"} 1.0' in text
    assert "tokenledger_webhook_retries_total 1.0" in text
    assert "tokenledger_outbox_lag_seconds 0.0" in text
    assert "tokenledger_webhook_deliveries_pending 0.0" in text


async def test_balance_low_in_a_usage_batch(
    client: httpx.AsyncClient, api: Api, clock: FakeClock, db: asyncpg.Connection
) -> None:
    """A usage batch (one database call for 20 events) that crosses two thresholds
    emits one balance.low for each."""
    from tests.api.test_usage import NOW, add_price, batch, event

    clock.set(NOW)
    await add_price(client, NOW - timedelta(days=1))
    await api.employee("e-1")
    await api.grant("e-1", 100_000)
    r = await client.put(
        "/v1/accounts/employee:e-1/alerts", json={"low_balance": [50_000, 30_000, 1_000]}
    )
    assert r.status_code == 200
    results = await batch(client, [event(f"u-{i}") for i in range(20)])  # 4000 credits each
    assert {x["status"] for x in results} == {"recorded"}
    assert await api.available("employee:e-1") == 20_000
    events = await outbox(db, "balance.low")
    assert [(e["threshold"], e["available"]) for e in events] == [
        (50_000, 20_000),
        (30_000, 20_000),
    ]


async def test_limit_reached_is_delivered(
    hooks: httpx.AsyncClient, receiver: Receiver, database_url: str
) -> None:
    """A soft spend limit's limit.reached (spend policy) reaches a subscriber, signed like
    every event: once at 80 % and once at 100 % of the window."""
    api = Api(hooks)  # type: ignore[arg-type]  # why: the same httpx client type
    await api.employee("e1")
    await api.grant("e1", 1_000)
    await subscribe(hooks, receiver.url("/limit"), ["limit.reached"])
    r = await hooks.put(
        "/v1/accounts/employee:e1/policy",
        json={"limits": [{"window": "day", "amount": 100, "mode": "soft"}]},
    )
    assert r.status_code == 200, r.text
    for amount in (50, 35, 10, 30):  # 85 passes 80 %, 125 passes 100 %
        assert (await api.debit("employee:e1", amount)).status_code == 201
    await settled(database_url)
    # Deliveries to one endpoint go out concurrently, so they may arrive in either order.
    events = sorted(receiver.events("/limit"), key=lambda e: e["data"]["threshold_percent"])
    assert [e["type"] for e in events] == ["limit.reached", "limit.reached"]
    assert [e["data"]["threshold_percent"] for e in events] == [80, 100]
    assert all(e["data"]["account"] == "employee:e1" for e in events)
    assert len({got.webhook_id for got in receiver.on("/limit")}) == 2
