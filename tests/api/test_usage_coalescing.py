"""Single usage events (POST /v1/usage) coalesced (service/coalesce.py, tl_execute_batch):
concurrent events share one database call, and each still answers exactly what it answers
alone, with its own status, body, headers and error."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from service import errors
from service.api.common import parse_public_id
from service.app import create_app
from service.config import Config
from service.journal import Database
from tests.api.conftest import (
    Api,
    FakeClock,
    assert_audit_clean,
    key,
    posted,
    problem,
    running,
)
from tests.api.test_coalescing import batch_totals, item, ledger_of
from tests.api.test_key_limits import PRICE as FLAT_PRICE
from tests.api.test_policy import put_policy
from tests.api.test_usage import (
    MODEL,
    NOW,
    P1,
    V1,
    WALLET,
    add_price,
    db_retries,
    event,
    record,
    setup,
    usage_total,
)
from tests.costs import usage_costs


def usage_item(body: dict[str, Any]) -> Any:
    """A usage event as UsageController.record hands it to the coalescer: no
    Idempotency-Key, (source, event_id) is the key."""
    args = dict(body)
    if args.get("reservation") is not None:
        args["reservation_id"] = str(
            parse_public_id(args["reservation"], "rsv_", errors.ReservationNotFound)
        )
    usage = item("usage", args, None)
    usage.ctx["now"] = NOW.isoformat()  # the tests' clock (setup)
    return usage


async def test_concurrent_single_usage_events_share_calls(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """32 concurrent single usage events over four wallets reach PostgreSQL in fewer than 32
    calls (some shared a coalesced batch), each answers 201 with its cost, and the wallets
    and system:usage move by exactly their costs."""
    wallets = [f"e-{k}" for k in range(4)]
    await setup(client, api, clock, dict.fromkeys(wallets, 1_000_000))
    await add_price(client, P1)
    ledger = ledger_of(client)
    bodies = [
        event(f"co-{i}", 100 + i, i, cached=i % 7, account=f"employee:{wallets[i % 4]}")
        for i in range(32)
    ]
    costs = await usage_costs(
        database_url,
        V1,
        [(b["input_tokens"], b["cached_input_tokens"], b["output_tokens"]) for b in bodies],
    )
    items_before, batches_before = batch_totals(ledger)
    answers = await asyncio.gather(*(record(client, b) for b in bodies))
    assert [r.status_code for r in answers] == [201] * 32, [r.text for r in answers]
    assert [r.json()["cost"] for r in answers] == costs
    items, batches = batch_totals(ledger)
    assert items - items_before == 32, "the usage events did not go through the coalescer"
    assert batches - batches_before < 32, "no two usage events shared a call"
    for k, w in enumerate(wallets):
        assert await posted(api, f"employee:{w}") == 1_000_000 - sum(costs[k::4]), w
    assert await usage_total(api) == sum(costs)
    await assert_audit_clean(database_url)


# One batch, each event as alone --------------------------------------------------


def _canon(value: Any, twin: str, names: dict[str, str]) -> Any:
    """An answer with the twin's name as TWIN and the ids it mints (events,
    transactions, reservations, lots) replaced by labels in order of appearance;
    the shared system accounts' running balances and the request ids dropped."""
    if isinstance(value, dict):
        shared = str(value.get("account", "")).startswith("system:")
        return {
            k: _canon(v, twin, names)
            for k, v in value.items()
            if k not in ("request_id", "instance")
            and not (shared and k in ("balance_after", "version"))
        }
    if isinstance(value, list):
        return [_canon(v, twin, names) for v in value]
    if isinstance(value, str):
        value = value.replace(twin, "TWIN")
        return re.sub(
            r"(evt|txn|rsv|lot)_[0-9a-f]{32}",
            lambda m: names.setdefault(m.group(0), f"{m.group(1)}#{len(names)}"),
            value,
        )
    return value


def _counters(ledger: Database) -> dict[tuple[str, ...], float]:
    """The ledger's counts of usage events and captures by (kind, outcome), whatever
    the outcome, and the overage credits (not the blocker's set-up and reservation)."""
    counts: dict[tuple[str, ...], float] = {}
    for name in ("operations", "overage_credits"):
        for metric in getattr(ledger.metrics, name).collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("kind") in (
                    None,
                    "usage",
                    "capture",
                ):
                    counts[(name, *sample.labels.values())] = float(sample.value)
    return counts


def _moved(after: dict[tuple[str, ...], float], before: dict[tuple[str, ...], float]) -> Any:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


Send = Callable[[], Awaitable[Any]]


async def _twin(client: Any, api: Api, twin: str) -> list[Send]:
    """Made a second before NOW: a wallet named `twin` with 20,000 credits, a
    reservation of 6,000 on it, an event recorded, and 500 credits more that expire at
    NOW exactly; a closed wallet; a wallet whose spend policy denies MODEL and has a soft
    limit; and the requests of the test, to send at NOW, in their order."""
    address = f"employee:{twin}"
    await api.employee(twin)
    await api.grant(twin, 20_000)
    await api.employee(f"{twin}-x")
    r = await client.post(f"/v1/employees/{twin}-x/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    await api.employee(f"{twin}-p")
    await api.grant(f"{twin}-p", 10_000)
    await put_policy(
        client,
        f"employee:{twin}-p",
        models={"deny": [MODEL]},
        limits=[{"window": "day", "amount": 5000, "mode": "soft"}],
    )
    r = await client.post(
        "/v1/reservations", json={"account": address, "amount": 6000}, headers=key()
    )
    assert r.status_code == 201, r.text
    rsv = r.json()["id"]
    assert (await record(client, event(f"{twin}-stored", account=address))).status_code == 201
    await api.grant(twin, 500, expires_at=NOW.isoformat())
    missing = "rsv_" + "0" * 32

    def usage(event_id: str, *counts: int, **extra: Any) -> Send:
        body = event(f"{twin}-{event_id}", *counts, **{"account": address, **extra})
        return lambda: record(client, body)

    def capture(amount: int) -> Send:
        return lambda: client.post(
            f"/v1/reservations/{rsv}/capture", json={"amount": amount}, headers=key()
        )

    return [
        usage("ok"),  # 4,000 recorded (first, the 500 expire)
        usage("ok"),  # the same event again in the same batch: a duplicate
        usage("stored"),  # recorded before: a duplicate
        usage("new-model", model="unpriced-model"),  # 404 unknown_model
        usage("ok", 5, 5, cached=0),  # another body under a recorded key: 422
        usage("big", 0, 1000, cached=0),  # 10,000 against 6,000 available: shortfall 4,000
        usage("rsv", reservation=rsv),  # settles the reservation: captures 4,000
        capture(100),  # the capture racing it: 409 reservation_not_active
        usage("rsv-2", reservation=rsv),  # settled already: 409, and recorded nowhere
        usage("lost", reservation=missing),  # 404 reservation_not_found
        usage("gone", account=f"employee:{twin}-x"),  # 409 account_closed
        usage("gone", account=f"employee:{twin}-x"),  # again, in the same batch: the same
        usage("late", 0, 300, cached=0),  # 3,000 against 2,000 left: shortfall 1,000
        usage("policy", account=f"employee:{twin}-p"),  # flagged model_not_allowed
    ]


async def _answers(twin: str, responses: list[Any]) -> list[Any]:
    """Each answer's status, headers (their content-length too: the twins' names have
    one length, as ids do) and body, canonical (_canon)."""
    names: dict[str, str] = {}
    out = []
    for r in responses:
        headers = {k: v for k, v in r.headers.items() if k not in ("date", "x-request-id")}
        out.append((r.status_code, _canon(headers, twin, names), _canon(r.json(), twin, names)))
    return out


async def _state(client: Any, api: Api, twin: str, database_url: str) -> Any:
    accounts = [await api.account(f"employee:{twin}{w}") for w in ("", "-p")]
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch(
            "SELECT event_id, cost, shortfall, result IS NOT NULL AS answered FROM usage_events"
            " WHERE event_id LIKE $1 ORDER BY event_id",
            f"{twin}-%",
        )
    finally:
        await conn.close()
    return (
        [{k: a[k] for k in ("posted", "reserved", "available", "version")} for a in accounts],
        [(r["event_id"].replace(twin, "TWIN"), *list(r.values())[1:]) for r in stored],
    )


async def test_single_usage_events_in_one_batch_answer_as_alone(
    client: Any,
    api: Api,
    clock: FakeClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thirteen single usage events and a capture in one coalesced batch (recorded, after
    credits expiring at that very instant; the same event again, and one recorded before:
    duplicates; unknown_model; a reused key; a shortfall; one settling a reservation and a
    capture of that reservation racing it; reservation_not_active and
    reservation_not_found; a closed wallet twice; a model the wallet's spend policy denies)
    answer with the status, headers and body (its length included) that the same requests
    get one at a time the way the service answered them before coalescing (each its own
    tl_record_usage), move the metrics alike, and leave the ledger in the same state, with
    exact totals."""
    await setup(client, api, clock, {})
    await add_price(client, P1)
    ledger = ledger_of(client)
    results: dict[str, Any] = {}
    for twin in ("e-alone", "e-batch"):
        clock.set(NOW - timedelta(seconds=1))
        sends = await _twin(client, api, twin)
        clock.set(NOW)
        usage_before = await usage_total(api)
        overage_before = await posted(api, "system:overage")
        expired_before = await posted(api, "system:expired")
        counters_before = _counters(ledger)
        if twin == "e-alone":
            # The service as it was: each request its own call, one after the other.
            with monkeypatch.context() as m:
                m.setattr(ledger.coalescer, "submit", ledger._execute_one)
                responses = [await send() for send in sends]
        else:
            responses = await _in_one_batch(client, api, ledger, sends)
        results[twin] = (
            await _answers(twin, responses),
            await _state(client, api, twin, database_url),
            await usage_total(api) - usage_before,
            await posted(api, "system:overage") - overage_before,
            await posted(api, "system:expired") - expired_before,
            _moved(_counters(ledger), counters_before),
        )
    alone, batched = results["e-alone"], results["e-batch"]
    assert [a[0] for a in batched[0]] == [
        201, 200, 200, 404, 422, 201, 201, 409, 409, 404, 409, 409, 201, 201,
    ]  # fmt: skip
    for k, (one, other) in enumerate(zip(alone[0], batched[0], strict=True)):
        assert one == other, (k, one, other)
    assert batched[1:] == alone[1:]
    state, usage_gain, overage, expired, counters = batched[1:]
    # The wallet paid what it held and the shortfalls (4,000 and 1,000) went to
    # system:overage: the 500 credits expired at NOW exactly, before the first
    # event, so none of them paid.
    assert [(a["posted"], a["reserved"], a["available"]) for a in state[0]] == [
        (0, 0, 0),
        (10_000 - 4000, 0, 6000),
    ]
    assert (usage_gain, overage, expired) == (4000 + 10_000 + 4000 + 3000 + 4000, -5000, 500)
    assert batched[0][-1][2]["violation"] == "model_not_allowed"
    assert counters == {
        ("operations", "usage", "ok"): 5,
        ("operations", "usage", "duplicate"): 2,
        ("operations", "capture", "reservation_not_active"): 1,
        ("overage_credits",): 5000,
    }
    await assert_audit_clean(database_url)


async def _in_one_batch(client: Any, api: Api, ledger: Database, sends: list[Send]) -> list[Any]:
    """The requests sent while the coalescer's one call in flight is held, each
    after the one before has queued, so that they all go, in this order, in the
    next call; that call must hold them all."""
    calls: list[list[str]] = []
    gate = asyncio.Event()
    real = ledger.coalescer._run

    async def gated(items: list[Any]) -> list[Any]:
        calls.append([i.op for i in items])
        if len(calls) == 1:
            await gate.wait()
        return await real(items)

    await api.employee("e-blocker")
    await api.grant("e-blocker", 10)
    ledger.coalescer._run = gated  # type: ignore[method-assign]  # why: holds the first call
    try:
        # A reservation: it moves no credits (system:usage is counted).
        blocker = asyncio.create_task(
            client.post(
                "/v1/reservations",
                json={"account": "employee:e-blocker", "amount": 1},
                headers=key(),
            )
        )
        tasks = []
        await _queued(ledger, calls, 0)
        for k, send in enumerate(sends):
            tasks.append(asyncio.create_task(send()))
            await _queued(ledger, calls, k + 1)
        gate.set()
        responses = await asyncio.gather(*tasks)
        assert (await blocker).status_code == 201
    finally:
        ledger.coalescer._run = real  # type: ignore[method-assign]
    assert calls[1] == ["usage"] * 7 + ["capture"] + ["usage"] * 6, calls
    return list(responses)


async def _queued(ledger: Database, calls: list[list[str]], n: int) -> None:
    """Wait until the held call has started and `n` requests wait in the queue."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not calls or len(ledger.coalescer._queue) < n:
        assert loop.time() < deadline, f"request {n} never queued for the coalescer"
        await asyncio.sleep(0.002)


# The batch function itself -------------------------------------------------------


async def test_usage_and_capture_of_one_reservation_in_one_batch(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A usage event settling a reservation and a capture of it in one batch: whichever
    comes first settles it, the other answers reservation_not_active (the usage event's
    claim given back, so it is recorded nowhere); the credits move once."""
    await setup(client, api, clock, {"e-1": 20_000})
    await add_price(client, P1)
    ledger = ledger_of(client)
    held = []
    for _ in range(2):
        r = await client.post(
            "/v1/reservations", json={"account": WALLET, "amount": 6000}, headers=key()
        )
        assert r.status_code == 201, r.text
        held.append(r.json()["id"])

    def capture(rsv: str, k: str) -> Any:
        rid = str(parse_public_id(rsv, "rsv_", errors.ReservationNotFound))
        taken = item(
            "capture", {"reservation": rsv, "reservation_id": rid, "amount": 100}, k, status=200
        )
        taken.ctx["now"] = NOW.isoformat()
        return taken

    usage_first, capture_late = await ledger._execute_batch(
        [usage_item(event("first", reservation=held[0])), capture(held[0], "k-late")]
    )
    assert usage_first["status"] == 201 and usage_first["body"]["cost"] == 4000
    assert capture_late["status"] == 409
    assert capture_late["body"]["code"] == "reservation_not_active"
    capture_first, usage_late = await ledger._execute_batch(
        [capture(held[1], "k-first"), usage_item(event("second", reservation=held[1]))]
    )
    assert capture_first["status"] == 200
    assert isinstance(usage_late, errors.ReservationNotActive), usage_late
    assert usage_late.extra["reservation_status"] == "captured"
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"]) == (20_000 - 4000 - 100, 0)
    assert await usage_total(api) == 4100
    # The event refused is not stored: sent again alone it answers as it did.
    again = await record(client, event("second", reservation=held[1]))
    problem(again, 409, "reservation_not_active")
    await assert_audit_clean(database_url)


async def test_whole_batch_failure_reruns_usage_events_one_by_one(
    client: Any, api: Api, clock: FakeClock, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the batch call fails as a whole, its usage events are run again one by one
    as they were before coalescing (tl_record_usage): each records once or fails alone."""
    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1)
    ledger = ledger_of(client)
    monkeypatch.setitem(
        ledger.queries,
        "execute_batch",
        "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7) WHERE 1 / (cardinality($1) - 3) > 0",
    )
    ok, unknown, dup = await ledger._execute_batch(
        [
            usage_item(event("fb-1")),
            usage_item(event("fb-2", model="unpriced-model")),
            usage_item(event("fb-1")),
        ]
    )
    assert ok["status"] == 201 and ok["body"]["cost"] == 4000
    assert isinstance(unknown, errors.UnknownModel)
    assert dup["status"] == 200 and dup["body"] == {**ok["body"], "status": "duplicate"}
    assert await posted(api, WALLET) == 100_000 - 4000
    await assert_audit_clean(database_url)


async def test_a_capped_key_in_a_coalesced_usage_batch(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Usage events of a key capped at 100 credits a minute in one coalesced batch, with a
    debit: the event that would pass the cap is refused alone (key_rate_limited, with
    Retry-After) and recorded nowhere, a later smaller one still fits, as alone."""
    from datetime import UTC, datetime

    now = datetime(2030, 3, 4, 12, 0, 30, tzinfo=UTC)
    clock.set(now)
    await api.employee("e-eng")
    await api.grant("e-eng", 10_000)
    r = await client.post("/v1/prices", json=FLAT_PRICE, headers=key())
    assert r.status_code == 201, r.text
    ledger = ledger_of(client)

    def flat(event_id: str, tokens: int) -> Any:
        body = {
            "source": "gw",
            "event_id": event_id,
            "account": "employee:e-eng",
            "model": "flat",
            "input_tokens": tokens,
            "output_tokens": 0,
        }
        return usage_item(body)

    items = [
        flat("u1", 60),
        item("debit", {"account": "employee:e-eng", "amount": 10}, "k-d"),
        flat("u2", 40),  # 110 > 100
        flat("u3", 30),
        flat("u4", 1),  # 101 > 100
    ]
    for i in items:
        i.ctx.update(actor="key:capped", rate_limit=100, now=now.isoformat())
    results = await ledger._execute_batch(items)
    assert results[0]["status"] == results[1]["status"] == results[3]["status"] == 201
    for refused in (results[2], results[4]):
        assert isinstance(refused, errors.KeyRateLimited), results
        assert refused.headers["Retry-After"] == "30"
    assert await api.available("employee:e-eng") == 10_000 - 100
    stored = await client.get("/v1/usage", params={"account": "employee:e-eng"})
    if stored.status_code == 200:
        assert sorted(x["event_id"] for x in stored.json()["items"]) == ["u1", "u3"]
    await assert_audit_clean(database_url)


# Concurrency ---------------------------------------------------------------------


async def test_concurrent_singles_and_batches_of_the_same_events_never_deadlock(
    client: Any, api: Api, clock: FakeClock, database_url: str, config: Config, admin_key: str
) -> None:
    """Single events coalesced four calls at a time, sent twice, beside two usage batches of
    the same events (one reversed), over four shared wallets, three models and three
    projects: each event is charged once, the totals are exact, and no transaction was
    retried: a coalesced batch claims its events in key order before it locks any
    account, and writes its roll-ups once, in key order."""
    wallets = [f"w-{k}" for k in range(4)]
    await setup(client, api, clock, dict.fromkeys(wallets, 1_000_000))
    for model in ("m-a", "m-b", "m-c"):
        await add_price(client, P1, model=model)
    bodies = [
        event(
            f"cc-{i}",
            100 + i,
            i % 11,
            cached=i % 5,
            account=f"employee:{wallets[(i * 7) % 4]}",
            model=("m-a", "m-b", "m-c")[i % 3],
            project=("search", "chat", None)[(i // 3) % 3],
        )
        for i in range(48)
    ]
    costs = await usage_costs(
        database_url,
        V1,
        [(b["input_tokens"], b["cached_input_tokens"], b["output_tokens"]) for b in bodies],
    )
    # Four coalesced calls in flight, so that batches of single events run
    # concurrently with each other as well as with the usage batches.
    app = create_app(msgspec.structs.replace(config, coalesce_max_in_flight=4), clock=clock)
    async with (
        running(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://four.local",
            timeout=30,
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c,
    ):
        before = db_retries((await c.get("/metrics")).text)
        answers = await asyncio.gather(
            c.post("/v1/usage:batch", json={"events": bodies}),
            *(record(c, b) for b in bodies),
            c.post("/v1/usage:batch", json={"events": bodies[::-1]}),
            *(record(c, b) for b in bodies[::-1]),
        )
        retries = db_retries((await c.get("/metrics")).text) - before
    recorded: dict[str, int] = {}
    for r in answers:
        assert r.status_code in (200, 201), r.text
        body = r.json()
        for res in body["results"] if "results" in body else [body]:
            assert res["status"] in ("recorded", "duplicate"), res
            if res["status"] == "recorded":
                recorded[res["event_id"]] = recorded.get(res["event_id"], 0) + 1
    assert recorded == {b["event_id"]: 1 for b in bodies}
    assert retries == 0
    for w in wallets:
        charged = sum(c for b, c in zip(bodies, costs, strict=True) if b["account"].endswith(w))
        assert await posted(api, f"employee:{w}") == 1_000_000 - charged, w
    assert await usage_total(api) == sum(costs)
    await assert_audit_clean(database_url)
