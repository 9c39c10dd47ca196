"""Metering (API.md, Metering and prices; Reservations): usage events priced at
the version in effect when they occurred, charged exactly once per (source,
event_id), in batches, and reservations sized and captured by token counts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service.pricing import PriceRates
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, posted, problem, ts
from tests.api.test_auth import service_key
from tests.costs import usage_costs

P1 = datetime(2030, 1, 1, tzinfo=UTC)  # first price version of MODEL
P2 = datetime(2030, 2, 1, 12, 0, tzinfo=UTC)  # second price version of MODEL
NOW = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)  # the service's clock in every test
US = timedelta(microseconds=1)
MODEL = "gpt-test"
V1 = PriceRates(
    input_per_mtok=2_500_000, cached_input_per_mtok=1_250_000, output_per_mtok=10_000_000
)
V2 = PriceRates(input_per_mtok=3_000_000, cached_input_per_mtok=300_000, output_per_mtok=12_000_000)
WALLET = "employee:e-1"
OTHER = "employee:e-2"


# Helpers -----------------------------------------------------------------------


async def add_price(
    client: Any, at: datetime, rates: PriceRates = V1, model: str = MODEL
) -> dict[str, Any]:
    body = {
        "model": model,
        "effective_from": at.isoformat(),
        "input_per_mtok": rates.input_per_mtok,
        "cached_input_per_mtok": rates.cached_input_per_mtok,
        "output_per_mtok": rates.output_per_mtok,
    }
    r = await client.post("/v1/prices", json=body, headers=key())
    assert r.status_code == 201, r.text
    return r.json()


def event(
    event_id: str,
    input_tokens: int = 1000,
    output_tokens: int = 200,
    *,
    cached: int | None = 400,
    account: str = WALLET,
    model: str = MODEL,
    source: str = "gateway-eu",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": source,
        "event_id": event_id,
        "account": account,
        "model": model,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        **extra,
    }
    if cached is not None:
        body["cached_input_tokens"] = cached
    return body


async def record(client: Any, body: dict[str, Any], **headers: str) -> Any:
    """POST /v1/usage: no Idempotency-Key, (source, event_id) is the key."""
    return await client.post("/v1/usage", json=body, headers=headers or None)


async def recorded(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    r = await record(client, body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    assert out["status"] == "recorded", out
    return out


async def batch(client: Any, events: list[Any]) -> list[dict[str, Any]]:
    r = await client.post("/v1/usage:batch", json={"events": events})
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["results"]
    assert len(results) == len(events)
    return results


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The contract's part of a batch result: event_id, status, code and cost."""
    return {k: result.get(k) for k in ("event_id", "status", "code", "cost")}


async def reserve_estimate(client: Any, account: str = WALLET, **estimate: Any) -> Any:
    return await client.post(
        "/v1/reservations", json={"account": account, "estimate": estimate}, headers=key()
    )


async def setup(client: Any, api: Api, clock: FakeClock, grants: dict[str, int]) -> None:
    """Pin the clock at NOW, add MODEL's first price version and fund the wallets."""
    clock.set(NOW)
    for emp, amount in grants.items():
        await api.employee(emp)
        await api.grant(emp, amount)


async def usage_total(api: Api) -> int:
    return await posted(api, "system:usage")


# Price version selection -------------------------------------------------------


async def test_event_is_priced_at_the_version_in_effect_when_it_occurred(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """occurred_at picks the price version in effect at that instant, to the microsecond."""
    await setup(client, api, clock, {"e-1": 100_000})
    v1 = await add_price(client, P1, V1)
    v2 = await add_price(client, P2, V2)
    (old,) = await usage_costs(database_url, V1, [(1000, 400, 200)])
    (new,) = await usage_costs(database_url, V2, [(1000, 400, 200)])
    assert (old, new) == (4000, 4320)

    before_any = await record(client, event("at-p1-minus", occurred_at=(P1 - US).isoformat()))
    err = problem(before_any, 404, "unknown_model")
    assert err["model"] == MODEL
    cases = [
        ("at-p1", P1, v1, old),
        ("at-p2-minus", P2 - US, v1, old),
        ("at-p2", P2, v2, new),
        ("at-p2-plus", P2 + US, v2, new),
    ]
    for event_id, when, price, cost in cases:
        out = await recorded(client, event(event_id, occurred_at=when.isoformat()))
        assert (out["price_id"], out["cost"], out["occurred_at"]) == (
            price["id"],
            cost,
            ts(when),
        ), event_id
    # Without occurred_at the event occurred now (NOW, after P2).
    now = await recorded(client, event("now"))
    assert (now["price_id"], now["cost"], now["occurred_at"]) == (v2["id"], new, ts(NOW))
    assert await posted(api, WALLET) == 100_000 - 2 * old - 3 * new
    assert await usage_total(api) == 2 * old + 3 * new
    await assert_audit_clean(database_url)


async def test_recorded_event_shape_and_usage_transaction(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """A recorded event answers 201 with its id, cost and price, in a `usage` transaction."""
    await setup(client, api, clock, {"e-1": 10_000})
    price = await add_price(client, P1)
    body = event("shape-1", project="search", tags={"team": "core", "env": "prod"})
    r = await record(client, body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["id"].startswith("evt_")
    assert out["transaction_id"].startswith("txn_")
    assert out == {
        "id": out["id"],
        "source": "gateway-eu",
        "event_id": "shape-1",
        "account": WALLET,
        "model": MODEL,
        "input_tokens": 1000,
        "cached_input_tokens": 400,
        "output_tokens": 200,
        "cost": 4000,
        "price_id": price["id"],
        "transaction_id": out["transaction_id"],
        "reservation_id": None,
        "project": "search",
        "tags": {"team": "core", "env": "prod"},
        "occurred_at": ts(NOW),
        "status": "recorded",
    }
    txn = await client.get(f"/v1/transactions/{out['transaction_id']}")
    assert txn.status_code == 200, txn.text
    txn_body = txn.json()
    assert txn_body["kind"] == "usage"
    legs = sorted((e["account"], e["amount"]) for e in txn_body["entries"])
    assert legs == [(WALLET, -4000), ("system:usage", 4000)]
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (6000, 0, 6000)


# Golden charges ----------------------------------------------------------------


async def test_golden_charges(client: Any, api: Api, clock: FakeClock, database_url: str) -> None:
    """Cached tokens, zero output and single tokens cost the contract's rounded-once credits."""
    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1, V1)
    golden = [
        # (input, cached, output, credits)
        (1000, 400, 200, 4000),  # 600*2.5 + 400*1.25 + 200*10
        (1000, 1000, 0, 1250),  # all cached, zero output
        (1001, 0, 0, 2503),  # zero output: 2502.5 rounds up
        (0, 0, 1, 10),  # one output token
        (1, 0, 0, 3),  # one input token: 2.5 rounds up
        (1, 1, 0, 2),  # one cached token: 1.25 rounds up
        (2, 1, 0, 4),  # 2.5 + 1.25 = 3.75 -> 4, rounded once (per class it would be 3 + 2)
        (0, 0, 0, 0),  # nothing at all costs nothing
    ]
    total = 0
    for i, (inp, cached, out, credits) in enumerate(golden):
        body = event(f"golden-{i}", inp, out, cached=cached)
        result = await recorded(client, body)
        assert result["cost"] == credits, (inp, cached, out)
        total += credits
    # cached_input_tokens defaults to 0.
    default = await recorded(client, event("golden-default", 1000, 0, cached=None))
    assert (default["cached_input_tokens"], default["cost"]) == (0, 2500)
    total += 2500
    assert total == 4000 + 1250 + 2503 + 10 + 3 + 2 + 4 + 0 + 2500
    assert await posted(api, WALLET) == 100_000 - total
    assert await usage_total(api) == total
    await assert_audit_clean(database_url)


async def test_more_cached_than_input_is_refused(client: Any, api: Api, clock: FakeClock) -> None:
    """cached_input_tokens above input_tokens answers 400 invalid_request and records nothing."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    r = await record(client, event("too-cached", 10, 0, cached=11))
    problem(r, 400, "invalid_request")
    assert await posted(api, WALLET) == 10_000
    # Nothing was stored under the key: a corrected event records.
    fixed = await recorded(client, event("too-cached", 10, 0, cached=10))
    assert fixed["cost"] == 13  # 10 * 1.25 rounded up


async def test_usage_beyond_the_balance_is_recorded_with_its_shortfall(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An event the wallet cannot pay in full is recorded (it already happened): the wallet
    pays what it holds, the rest goes to system:overage and is answered as `shortfall`
    (issue 12; it answered 409 and vanished from every report)."""
    await setup(client, api, clock, {"e-1": 3999})
    await add_price(client, P1)
    out = await recorded(client, event("pricey"))
    assert (out["cost"], out["shortfall"], out["status"]) == (4000, 1, "recorded")
    assert await posted(api, WALLET) == 0
    assert await usage_total(api) == 4000
    assert await posted(api, "system:overage") == -1
    again = await record(client, event("pricey"))
    assert again.status_code == 200, again.text
    assert (again.json()["status"], again.json()["shortfall"]) == ("duplicate", 1)
    await assert_audit_clean(database_url)


# Duplicates --------------------------------------------------------------------


async def test_duplicate_event_is_charged_once(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """The same (source, event_id) again answers 200 duplicate and charges nothing; with
    another body it is 422 idempotency_key_reused (API.md) and charges nothing either."""
    await setup(client, api, clock, {"e-1": 10_000, "e-2": 10_000})
    await add_price(client, P1)
    first = await recorded(client, event("dup-1"))
    again = await record(client, event("dup-1"))
    assert again.status_code == 200, again.text
    assert again.json() == {**first, "status": "duplicate"}
    # Another body (other counts, other account) under the same key: a reused key.
    other = await record(client, event("dup-1", 5, 5, cached=0, account=OTHER, project="x"))
    problem(other, 422, "idempotency_key_reused")
    assert await posted(api, WALLET) == 10_000 - 4000
    assert await posted(api, OTHER) == 10_000
    assert await usage_total(api) == 4000
    # The same event_id from another source is another event.
    elsewhere = await recorded(client, event("dup-1", source="gateway-us"))
    assert elsewhere["id"] != first["id"]
    assert await posted(api, WALLET) == 10_000 - 8000
    await assert_audit_clean(database_url)


async def test_concurrent_duplicates_are_charged_once(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """20 concurrent posts of one event: exactly one 201, nineteen 200 duplicates, one charge."""
    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1)
    body = event("race-1")
    answers = await asyncio.gather(*(record(client, body) for _ in range(20)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 19 + [201], [r.text for r in answers if r.status_code >= 300]
    firsts = [r.json() for r in answers if r.status_code == 201]
    first = firsts[0]
    assert first["status"] == "recorded" and first["cost"] == 4000
    for r in answers:
        if r.status_code == 200:
            assert r.json() == {**first, "status": "duplicate"}
    assert await posted(api, WALLET) == 100_000 - 4000
    assert await usage_total(api) == 4000
    usage_txns = await client.get("/v1/transactions", params={"kind": "usage"})
    assert usage_txns.status_code == 200, usage_txns.text
    assert [t["id"] for t in usage_txns.json()["items"]] == [first["transaction_id"]]
    await assert_audit_clean(database_url)


async def test_recorded_events_keep_no_copy_of_their_answer(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A recorded event's row holds its answer as its own columns (`result` is `{}`, not a
    copy of the answer: building and writing that copy was a fifth of a usage batch's
    PostgreSQL CPU). A replay rebuilds the same answer from the row, whichever path recorded
    it: a single event, one with a shortfall, a batch's plain, free, reservation-settling and
    uncovered events. A row stored before (its full answer in `result`) answers by it."""
    await setup(client, api, clock, {"e-1": 10_000, "e-2": 5000})
    price = await add_price(client, P1)
    single = await recorded(client, event("k-single", project="p", tags={"team": "core"}))
    short = await recorded(client, event("k-short", 2000, 300, cached=0, account=OTHER))
    assert (short["cost"], short["shortfall"]) == (8000, 3000)
    hold = await client.post(
        "/v1/reservations", json={"account": WALLET, "amount": 1000}, headers=key()
    )
    assert hold.status_code == 201, hold.text
    rsv = hold.json()["id"]
    events = [
        event("k-plain", project="q", tags={"env": "prod"}),
        event("k-free", 0, 0, cached=0),
        event("k-capture", 0, 100, cached=0, reservation=rsv),
        event("k-uncovered", account=OTHER),  # e-2 is overdrawn: recorded alone, all overage
        event("k-plain", project="q", tags={"env": "prod"}),  # a repeat within the batch
    ]
    results = await batch(client, events)
    assert [(r["status"], r.get("cost")) for r in results] == [
        ("recorded", 4000),
        ("recorded", 0),
        ("recorded", 1000),
        ("recorded", 4000),
        ("duplicate", 4000),
    ]
    assert results[4]["id"] == results[0]["id"]
    assert results[3]["shortfall"] == 4000
    conn = await asyncpg.connect(database_url)
    try:
        stored = dict(await conn.fetch("SELECT event_id, result::text FROM usage_events"))
    finally:
        await conn.close()
    assert stored == dict.fromkeys(
        ["k-single", "k-short", "k-plain", "k-free", "k-capture", "k-uncovered"], "{}"
    )
    # Replays answer the whole event, rebuilt from its row.
    for first in (single, short):
        again = await record(client, event(first["event_id"], **_sent(first)))
        assert again.status_code == 200, again.text
        assert again.json() == {**first, "status": "duplicate"}
    for sent, result in zip(events[:4], results[:4], strict=True):
        again = await record(client, sent)
        assert again.status_code == 200, again.text
        want = {
            **{k: sent.get(k) for k in ("source", "event_id", "account", "model")},
            "input_tokens": sent["input_tokens"],
            "cached_input_tokens": sent.get("cached_input_tokens", 0),
            "output_tokens": sent["output_tokens"],
            "cost": result["cost"],
            "id": result["id"],
            "transaction_id": result.get("transaction_id"),
            "price_id": price["id"],
            "reservation_id": sent.get("reservation"),
            "project": sent.get("project"),
            "tags": sent.get("tags", {}),
            "occurred_at": ts(NOW),
            "status": "duplicate",
            **({"shortfall": result["shortfall"]} if "shortfall" in result else {}),
        }
        assert again.json() == want
    replayed = await batch(client, events)
    assert replayed == [{**r, "status": "duplicate"} for r in results]
    # A row recorded before this change holds its whole answer, and answers by it.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE usage_events SET result = $1::jsonb WHERE event_id = 'k-free'",
            '{"legacy": true}',
        )
    finally:
        await conn.close()
    legacy = await record(client, events[1])
    assert legacy.json() == {"legacy": True, "status": "duplicate"}
    assert await usage_total(api) == 4000 + 8000 + 4000 + 1000 + 4000
    await assert_audit_clean(database_url)


def _sent(first: dict[str, Any]) -> dict[str, Any]:
    """The body fields of an answered event, to post it again."""
    return {
        "input_tokens": first["input_tokens"],
        "output_tokens": first["output_tokens"],
        "cached": first["cached_input_tokens"],
        "account": first["account"],
        **({"project": first["project"]} if first["project"] else {}),
        **({"tags": first["tags"]} if first["tags"] else {}),
    }


# Unknown models ----------------------------------------------------------------


async def test_unknown_model_records_nothing_until_priced(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An unpriced model answers 404 and records nothing; once priced, the same event records."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    body = event(
        "new-model-1", model="brand-new-model", occurred_at=(NOW - timedelta(hours=1)).isoformat()
    )
    err = problem(await record(client, body), 404, "unknown_model")
    assert err["model"] == "brand-new-model"
    assert await posted(api, WALLET) == 10_000
    assert await usage_total(api) == 0
    price = await add_price(client, P1, V2, model="brand-new-model")
    out = await recorded(client, body)
    assert (out["price_id"], out["cost"]) == (price["id"], 4320)  # 600*3 + 400*0.3 + 200*12
    assert await posted(api, WALLET) == 10_000 - 4320
    await assert_audit_clean(database_url)


# Batches -----------------------------------------------------------------------


async def test_batch_mixes_outcomes_per_event(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Good, duplicate, unknown-model, malformed and unaffordable events each answer alone."""
    await setup(client, api, clock, {"e-1": 10_000, "e-2": 10_000})
    await add_price(client, P1)
    earlier = await recorded(client, event("single-1"))  # 4000: e-1 has 6000 left
    assert await usage_total(api) == 4000
    malformed = event("bad-neg", -1, 0, cached=0)
    unknown_field = {**event("bad-field"), "colour": "red"}
    events: list[Any] = [
        event("b-good-1", 1000, 100, cached=0),  # 2500 + 1000 = 3500 -> 2500 left
        event("single-1"),  # recorded earlier
        event("b-good-1", 1000, 100, cached=0),  # repeated within the batch
        event("b-unknown", model="no-such-model"),
        malformed,
        event("b-too-cached", 5, 0, cached=6),
        unknown_field,
        event("b-big", 1000, 0, cached=0),  # 2500 > ... fits exactly: 0 left
        event("b-broke", 0, 1, cached=0),  # 10 > 0 left
        event("b-other", 0, 100, cached=0, account=OTHER),  # 1000 from e-2
        event("b-free", 0, 0, cached=0),  # costs nothing
    ]
    results = await batch(client, events)
    assert [brief(r) for r in results] == [
        {"event_id": "b-good-1", "status": "recorded", "code": None, "cost": 3500},
        {"event_id": "single-1", "status": "duplicate", "code": None, "cost": 4000},
        {"event_id": "b-good-1", "status": "duplicate", "code": None, "cost": 3500},
        {"event_id": "b-unknown", "status": "rejected", "code": "unknown_model", "cost": None},
        {"event_id": "bad-neg", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "b-too-cached", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "bad-field", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "b-big", "status": "recorded", "code": None, "cost": 2500},
        {"event_id": "b-broke", "status": "recorded", "code": None, "cost": 10},  # shortfall 10
        {"event_id": "b-other", "status": "recorded", "code": None, "cost": 1000},
        {"event_id": "b-free", "status": "recorded", "code": None, "cost": 0},
    ]
    assert results[1]["id"] == earlier["id"]
    assert results[2]["id"] == results[0]["id"]
    assert await posted(api, WALLET) == 10_000 - 4000 - 3500 - 2500 == 0
    assert await posted(api, OTHER) == 10_000 - 1000
    assert await usage_total(api) == 4000 + 3500 + 2500 + 10 + 1000
    assert await posted(api, "system:overage") == -10

    # Recorded events answer as single events too, with the cost the batch charged.
    single = await record(client, event("b-good-1", 1000, 100, cached=0))
    assert single.status_code == 200, single.text
    assert (single.json()["status"], single.json()["cost"]) == ("duplicate", 3500)
    # The rejected events were not stored; the batch again answers duplicates for
    # what it recorded, the one beyond the balance included.
    await api.grant("e-1", 10)
    again = await batch(client, events)
    assert [brief(r) for r in again] == [
        {"event_id": "b-good-1", "status": "duplicate", "code": None, "cost": 3500},
        {"event_id": "single-1", "status": "duplicate", "code": None, "cost": 4000},
        {"event_id": "b-good-1", "status": "duplicate", "code": None, "cost": 3500},
        {"event_id": "b-unknown", "status": "rejected", "code": "unknown_model", "cost": None},
        {"event_id": "bad-neg", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "b-too-cached", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "bad-field", "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "b-big", "status": "duplicate", "code": None, "cost": 2500},
        {"event_id": "b-broke", "status": "duplicate", "code": None, "cost": 10},
        {"event_id": "b-other", "status": "duplicate", "code": None, "cost": 1000},
        {"event_id": "b-free", "status": "duplicate", "code": None, "cost": 0},
    ]
    assert await posted(api, WALLET) == 10
    assert await usage_total(api) == 4000 + 3500 + 2500 + 1000 + 10
    await assert_audit_clean(database_url)


async def test_batch_insufficient_credits_in_batch_order(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Events that fit an account's credits in batch order are charged together; one that
    does not is still recorded, its shortfall charged to system:overage (issue 12)."""
    await setup(client, api, clock, {"e-1": 100})
    await add_price(client, P1)
    # Each costs 10 per output token: 60, 50, 40 against 100 credits.
    events = [event(f"o-{i}", 0, n, cached=0) for i, n in enumerate((6, 5, 4))]
    results = await batch(client, events)
    assert [brief(r) for r in results] == [
        {"event_id": "o-0", "status": "recorded", "code": None, "cost": 60},
        {"event_id": "o-1", "status": "recorded", "code": None, "cost": 50},
        {"event_id": "o-2", "status": "recorded", "code": None, "cost": 40},
    ]
    assert await posted(api, WALLET) == 0
    assert await usage_total(api) == 150
    assert await posted(api, "system:overage") == -50
    await assert_audit_clean(database_url)


async def test_batch_closed_account_and_insufficient_credits_together(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A closed account's events are rejected (account_closed) in a batch where another
    account cannot cover its event (recorded with a shortfall); the other events record as usual."""
    await setup(client, api, clock, {"e-1": 100, "e-2": 100, "e-3": 100})
    await add_price(client, P1)
    r = await client.post("/v1/employees/e-3/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    closed = "employee:e-3"
    events = [
        event("k-0", 0, 6, cached=0),
        event("k-1", 0, 5, cached=0, account=closed),
        event("k-2", 0, 20, cached=0, account=OTHER),
        event("k-3", 0, 4, cached=0),
        event("k-1", 0, 5, cached=0, account=closed),  # repeated within the batch
    ]
    results = await batch(client, events)
    assert [brief(r) for r in results] == [
        {"event_id": "k-0", "status": "recorded", "code": None, "cost": 60},
        {"event_id": "k-1", "status": "rejected", "code": "account_closed", "cost": None},
        {"event_id": "k-2", "status": "recorded", "code": None, "cost": 200},
        {"event_id": "k-3", "status": "recorded", "code": None, "cost": 40},
        {"event_id": "k-1", "status": "rejected", "code": "account_closed", "cost": None},
    ]
    assert await posted(api, WALLET) == 0
    assert await posted(api, OTHER) == 0  # paid 100 of 200; 100 is overage
    assert await usage_total(api) == 300
    assert await posted(api, "system:overage") == -100
    await assert_audit_clean(database_url)


async def test_batch_of_1000_events(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A full batch of 1000 events records every one and charges their sum."""
    await setup(client, api, clock, {"e-1": 1_000_000, "e-2": 1_000_000})
    await add_price(client, P1)
    events = [
        event(f"k-{i}", i, i % 7, cached=i // 3, account=WALLET if i % 2 else OTHER)
        for i in range(1000)
    ]
    results = await batch(client, events)
    assert [r["status"] for r in results] == ["recorded"] * 1000
    costs = await usage_costs(database_url, V1, [(i, i // 3, i % 7) for i in range(1000)])
    assert [r["cost"] for r in results] == costs
    assert [r["event_id"] for r in results] == [f"k-{i}" for i in range(1000)]
    odd = sum(costs[1::2])
    even = sum(costs[0::2])
    assert (odd, even) == (536_250, 535_136)
    assert await posted(api, WALLET) == 1_000_000 - odd
    assert await posted(api, OTHER) == 1_000_000 - even
    assert await usage_total(api) == odd + even
    await assert_audit_clean(database_url)


async def test_batch_size_limits(client: Any, api: Api, clock: FakeClock) -> None:
    """A batch of 0 or 1001 events answers 400 invalid_request and records nothing."""
    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1)
    empty = await client.post("/v1/usage:batch", json={"events": []})
    problem(empty, 400, "invalid_request")
    too_many = [event(f"t-{i}", 1, 0, cached=0) for i in range(1001)]
    problem(await client.post("/v1/usage:batch", json={"events": too_many}), 400, "invalid_request")
    assert await posted(api, WALLET) == 100_000
    assert await usage_total(api) == 0


# Reservations by estimate ------------------------------------------------------


async def test_estimate_reserves_the_worst_case(client: Any, api: Api, clock: FakeClock) -> None:
    """An estimate reserves all input uncached plus max_output_tokens at the current price."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1, V1)
    await add_price(client, P2, V2)  # current at NOW
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rsv = r.json()
    cost = 3000 + 6000  # 1000 * 3 + 500 * 12 at V2
    assert (rsv["amount"], rsv["max_output_tokens_allowed"], rsv["available_after"]) == (
        cost,
        500,
        10_000 - cost,
    )
    assert rsv["status"] == "active"
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (10_000, cost, 1000)


async def test_estimate_all_or_nothing_refused(client: Any, api: Api, clock: FakeClock) -> None:
    """Without min_output_tokens an estimate the wallet cannot fully cover answers 409."""
    await setup(client, api, clock, {"e-1": 7499})
    await add_price(client, P1, V1)
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    err = problem(r, 409, "insufficient_credits")
    assert (
        (err["available"], err["requested"]) == (7499, 2500 + 5000)  # 1000 * 2.5 + 500 * 10
    )
    account = await api.account(WALLET)
    assert (account["reserved"], account["available"]) == (0, 7499)


async def test_estimate_partial_down_to_min_output_tokens(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Short of the worst case, an estimate reserves the most output tokens covered, down to min."""
    await setup(client, api, clock, {"e-1": 4999})
    await add_price(client, P1, V1)
    # 1000 input tokens cost 2500; 2499 credits cover 249 output tokens at 10 each.
    allowed, amount = 249, 2500 + 2490
    r = await reserve_estimate(
        client, model=MODEL, input_tokens=1000, max_output_tokens=500, min_output_tokens=100
    )
    assert r.status_code == 201, r.text
    rsv = r.json()
    assert (rsv["amount"], rsv["max_output_tokens_allowed"], rsv["available_after"]) == (
        amount,
        allowed,
        4999 - amount,
    )
    account = await api.account(WALLET)
    assert (account["reserved"], account["available"]) == (4990, 9)
    # Exactly at the minimum is still enough.
    r = await client.post(f"/v1/reservations/{rsv['id']}/release", headers=key())
    assert r.status_code == 200, r.text
    exact = await reserve_estimate(
        client, model=MODEL, input_tokens=1000, max_output_tokens=500, min_output_tokens=249
    )
    assert exact.status_code == 201, exact.text
    assert (exact.json()["amount"], exact.json()["max_output_tokens_allowed"]) == (4990, 249)
    await assert_audit_clean(database_url)


async def test_estimate_below_min_output_tokens_is_refused(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """When the wallet cannot cover min_output_tokens the estimate answers 409 and holds nothing."""
    await setup(client, api, clock, {"e-1": 4999})
    await add_price(client, P1, V1)
    r = await reserve_estimate(
        client, model=MODEL, input_tokens=1000, max_output_tokens=500, min_output_tokens=250
    )
    err = problem(r, 409, "insufficient_credits")
    assert (
        (err["available"], err["requested"]) == (4999, 2500 + 2500)  # 1000 * 2.5 + 250 * 10
    )
    account = await api.account(WALLET)
    assert (account["reserved"], account["available"]) == (0, 4999)


async def test_estimate_request_validation(client: Any, api: Api, clock: FakeClock) -> None:
    """Both amount and estimate, or neither, answer 400; an unpriced model answers 404."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1, V1)
    estimate = {"model": MODEL, "input_tokens": 10, "max_output_tokens": 10}
    both = await client.post(
        "/v1/reservations",
        json={"account": WALLET, "amount": 5, "estimate": estimate},
        headers=key(),
    )
    problem(both, 400, "invalid_request")
    neither = await client.post("/v1/reservations", json={"account": WALLET}, headers=key())
    problem(neither, 400, "invalid_request")
    unknown = await reserve_estimate(client, model="nope", input_tokens=10, max_output_tokens=10)
    problem(unknown, 404, "unknown_model")
    account = await api.account(WALLET)
    assert (account["reserved"], account["available"]) == (0, 10_000)


async def test_capture_by_usage_uses_the_reservations_price(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Capture by usage prices the counts at the reservation's price even after a new version."""
    clock.set(P2 - timedelta(minutes=1))
    await api.employee("e-1")
    await api.grant("e-1", 20_000)
    v1 = await add_price(client, P1, V1)
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rsv = r.json()
    assert rsv["amount"] == 2500 + 5000  # 1000 * 2.5 + 500 * 10 at V1
    # A new price version takes effect before the capture.
    await add_price(client, P2, V2)
    clock.set(P2 + timedelta(minutes=1))
    usage = {"model": MODEL, "input_tokens": 800, "cached_input_tokens": 200, "output_tokens": 300}
    # 600 * 2.5 + 200 * 1.25 + 300 * 10 at V1; V2 would be 600 * 3 + 200 * 0.3 + 300 * 12 = 5460.
    cost = 4750
    r = await client.post(
        f"/v1/reservations/{rsv['id']}/capture", json={"usage": usage}, headers=key()
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"reservation", "transaction", "usage"}
    assert (out["reservation"]["status"], out["reservation"]["captured"]) == ("captured", cost)
    assert out["usage"]["cost"] == cost
    assert out["usage"]["price_id"] == v1["id"]
    assert out["usage"]["status"] == "recorded"
    assert out["usage"]["reservation_id"] == rsv["id"]
    assert out["usage"]["transaction_id"] == out["transaction"]["id"]
    legs = sorted((e["account"], e["amount"]) for e in out["transaction"]["entries"])
    assert legs == [(WALLET, -cost), ("system:usage", cost)]
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (
        20_000 - cost,
        0,
        20_000 - cost,
    )
    assert await usage_total(api) == cost
    # A plain event now is priced at the new version.
    now = await recorded(client, event("after-capture", 800, 300, cached=200))
    assert now["cost"] == 5460
    await assert_audit_clean(database_url)


# Usage events that settle a reservation ----------------------------------------


async def test_usage_with_reservation_captures_it(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An event naming a reservation captures it with the priced cost and releases the rest."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    r = await client.post(
        "/v1/reservations", json={"account": WALLET, "amount": 6000}, headers=key()
    )
    assert r.status_code == 201, r.text
    rsv = r.json()
    out = await recorded(client, event("with-rsv", reservation=rsv["id"]))
    assert (out["cost"], out["reservation_id"]) == (4000, rsv["id"])
    got = (await client.get(f"/v1/reservations/{rsv['id']}")).json()
    assert (got["status"], got["captured"], got["capture_transaction_id"]) == (
        "captured",
        4000,
        out["transaction_id"],
    )
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (6000, 0, 6000)
    assert await usage_total(api) == 4000
    # The same event again is a duplicate and captures nothing more.
    dup = await record(client, event("with-rsv", reservation=rsv["id"]))
    assert dup.status_code == 200, dup.text
    assert dup.json() == {**out, "status": "duplicate"}
    assert await posted(api, WALLET) == 6000
    await assert_audit_clean(database_url)


async def test_usage_with_reservation_over_the_hold(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """An event over its reservation debits the excess, or answers 409 and keeps it active."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    r = await client.post(
        "/v1/reservations", json={"account": WALLET, "amount": 1000}, headers=key()
    )
    assert r.status_code == 201, r.text
    rsv = r.json()
    assert (await api.debit(WALLET, 8500)).status_code == 201  # 500 available besides the hold
    # 2000 credits: 1000 over the hold, more than the 500 available.
    too_much = await record(client, event("over-1", 0, 200, cached=0, reservation=rsv["id"]))
    problem(too_much, 409, "insufficient_credits")
    got = (await client.get(f"/v1/reservations/{rsv['id']}")).json()
    assert (got["status"], got["captured"]) == ("active", None)
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (1500, 1000, 500)
    # 1200 credits: 200 over the hold, which the available credits cover.
    out = await recorded(client, event("over-2", 0, 120, cached=0, reservation=rsv["id"]))
    assert out["cost"] == 1200
    got = (await client.get(f"/v1/reservations/{rsv['id']}")).json()
    assert (got["status"], got["captured"]) == ("captured", 1200)
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (300, 0, 300)
    assert await usage_total(api) == 1200 + 8500  # the debit and the capture
    await assert_audit_clean(database_url)


# Roles -------------------------------------------------------------------------


async def test_roles(client: Any, api: Api, clock: FakeClock, database_url: str) -> None:
    """meter records usage; hr gets 403 forbidden on single and batch usage, charging nothing."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    hr = {"Authorization": f"Bearer {await service_key(database_url, 'hr')}"}
    meter = {"Authorization": f"Bearer {await service_key(database_url, 'meter')}"}
    problem(await record(client, event("role-1"), **hr), 403, "forbidden")
    denied = await client.post("/v1/usage:batch", json={"events": [event("role-2")]}, headers=hr)
    problem(denied, 403, "forbidden")
    assert await posted(api, WALLET) == 10_000
    ok = await record(client, event("role-1"), **meter)
    assert ok.status_code == 201, ok.text
    results = await client.post(
        "/v1/usage:batch", json={"events": [event("role-2")]}, headers=meter
    )
    assert results.status_code == 200, results.text
    assert [brief(r) for r in results.json()["results"]] == [
        {"event_id": "role-2", "status": "recorded", "code": None, "cost": 4000}
    ]
    assert await posted(api, WALLET) == 2000


# More edges --------------------------------------------------------------------


async def test_batch_item_that_is_not_an_object_is_rejected_alone(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """A batch item that is not a JSON object is a malformed event, rejected alone."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    results = await batch(client, [event("ok-1"), "not an event", 42, event("ok-2")])
    assert [brief(r) for r in results] == [
        {"event_id": "ok-1", "status": "recorded", "code": None, "cost": 4000},
        {"event_id": None, "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": None, "status": "rejected", "code": "invalid_request", "cost": None},
        {"event_id": "ok-2", "status": "recorded", "code": None, "cost": 4000},
    ]
    assert await posted(api, WALLET) == 2000


async def test_batch_prices_each_event_at_its_occurred_at(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """In a batch too, each event is priced at the version in effect at its own occurred_at."""
    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1, V1)
    await add_price(client, P2, V2)
    at = [P1 - US, P1, P2 - US, P2, P2 + US, None]
    events = [
        event(f"when-{i}", occurred_at=when.isoformat()) if when else event(f"when-{i}")
        for i, when in enumerate(at)
    ]
    results = await batch(client, events)
    assert [brief(r) for r in results] == [
        {"event_id": "when-0", "status": "rejected", "code": "unknown_model", "cost": None},
        {"event_id": "when-1", "status": "recorded", "code": None, "cost": 4000},
        {"event_id": "when-2", "status": "recorded", "code": None, "cost": 4000},
        {"event_id": "when-3", "status": "recorded", "code": None, "cost": 4320},
        {"event_id": "when-4", "status": "recorded", "code": None, "cost": 4320},
        {"event_id": "when-5", "status": "recorded", "code": None, "cost": 4320},
    ]
    assert await posted(api, WALLET) == 100_000 - 2 * 4000 - 3 * 4320
    assert await usage_total(api) == 2 * 4000 + 3 * 4320
    await assert_audit_clean(database_url)


async def test_batch_respects_held_credits(client: Any, api: Api, clock: FakeClock) -> None:
    """A batch spends only available credits: a reservation's hold is not spent (what the
    rest cannot cover is a shortfall)."""
    await setup(client, api, clock, {"e-1": 100})
    await add_price(client, P1)
    r = await client.post("/v1/reservations", json={"account": WALLET, "amount": 50}, headers=key())
    assert r.status_code == 201, r.text
    results = await batch(client, [event("h-0", 0, 4, cached=0), event("h-1", 0, 2, cached=0)])
    assert [brief(x) for x in results] == [
        {"event_id": "h-0", "status": "recorded", "code": None, "cost": 40},
        {"event_id": "h-1", "status": "recorded", "code": None, "cost": 20},
    ]
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"], account["available"]) == (50, 50, 0)
    assert await posted(api, "system:overage") == -10


async def test_concurrent_events_never_overdraw(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """20 concurrent distinct events of 1000 credits against 10 000 all record: ten paid by
    the wallet, ten as shortfall on system:overage, and the wallet never below zero."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    answers = await asyncio.gather(
        *(record(client, event(f"c-{i}", 0, 100, cached=0)) for i in range(20))
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 20, [r.text for r in answers if r.status_code != 201]
    assert sum(r.json().get("shortfall", 0) for r in answers) == 10_000
    assert await posted(api, WALLET) == 0
    assert await usage_total(api) == 20_000
    assert await posted(api, "system:overage") == -10_000
    await assert_audit_clean(database_url)


async def test_concurrent_batches_and_singles_charge_each_event_once(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """Overlapping batches (one reversed) and singles of the same events charge each once."""
    await setup(client, api, clock, {"e-1": 1_000_000, "e-2": 1_000_000})
    await add_price(client, P1)
    events = [
        event(f"ov-{i}", 10 * i, i, cached=i, account=WALLET if i % 2 else OTHER) for i in range(40)
    ]
    counts = [(e["input_tokens"], e["cached_input_tokens"], e["output_tokens"]) for e in events]
    costs = dict(
        zip(
            [e["event_id"] for e in events],
            await usage_costs(database_url, V1, counts),
            strict=True,
        )
    )

    async def post_batch(items: list[dict[str, Any]]) -> Any:
        return await client.post("/v1/usage:batch", json={"events": items})

    answers = await asyncio.gather(
        post_batch(events),
        post_batch(list(reversed(events))),
        post_batch(events[10:30]),
        *(record(client, e) for e in events[::5]),
    )
    recorded_by: dict[str, int] = {}
    for r in answers[:3]:
        assert r.status_code == 200, r.text
        for res in r.json()["results"]:
            assert res["status"] in ("recorded", "duplicate"), res
            assert res["cost"] == costs[res["event_id"]], res
            if res["status"] == "recorded":
                recorded_by[res["event_id"]] = recorded_by.get(res["event_id"], 0) + 1
    for r in answers[3:]:
        assert r.status_code in (200, 201), r.text
        body = r.json()
        assert body["cost"] == costs[body["event_id"]]
        if r.status_code == 201:
            recorded_by[body["event_id"]] = recorded_by.get(body["event_id"], 0) + 1
    assert recorded_by == {e["event_id"]: 1 for e in events}
    odd = sum(c for i, c in enumerate(costs.values()) if i % 2)
    even = sum(c for i, c in enumerate(costs.values()) if not i % 2)
    assert await posted(api, WALLET) == 1_000_000 - odd
    assert await posted(api, OTHER) == 1_000_000 - even
    assert await usage_total(api) == odd + even
    await assert_audit_clean(database_url)


async def test_second_capture_by_usage_is_not_active(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A second capture by usage under a new key answers 409 reservation_not_active."""
    await setup(client, api, clock, {"e-1": 20_000})
    await add_price(client, P1)
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    usage = {"model": MODEL, "input_tokens": 800, "cached_input_tokens": 200, "output_tokens": 300}
    first = await client.post(
        f"/v1/reservations/{rid}/capture", json={"usage": usage}, headers=key()
    )
    assert first.status_code == 200, first.text
    second = await client.post(
        f"/v1/reservations/{rid}/capture", json={"usage": usage}, headers=key()
    )
    err = problem(second, 409, "reservation_not_active")
    assert err["reservation_status"] == "captured"
    assert await posted(api, WALLET) == 20_000 - 4750
    await assert_audit_clean(database_url)


async def test_capture_by_usage_of_a_released_reservation(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """Capture by usage of a released reservation answers 409 and records nothing."""
    await setup(client, api, clock, {"e-1": 20_000})
    await add_price(client, P1)
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    released = await client.post(f"/v1/reservations/{rid}/release", headers=key())
    assert released.status_code == 200, released.text
    usage = {"model": MODEL, "input_tokens": 800, "output_tokens": 300}
    late = await client.post(
        f"/v1/reservations/{rid}/capture", json={"usage": usage}, headers=key()
    )
    err = problem(late, 409, "reservation_not_active")
    assert err["reservation_status"] == "released"
    assert await posted(api, WALLET) == 20_000
    assert await usage_total(api) == 0


async def test_usage_request_validation(client: Any, api: Api, clock: FakeClock) -> None:
    """Naive times, unknown fields, negative or missing counts answer 400, recording nothing."""
    await setup(client, api, clock, {"e-1": 10_000})
    await add_price(client, P1)
    bad = [
        event("v-1", occurred_at="2030-03-01T00:00:00"),
        {**event("v-2"), "colour": "red"},
        event("v-3", -1, 0, cached=0),
        {k: v for k, v in event("v-4").items() if k != "output_tokens"},
        event("v-5", tags={"team": 1}),
    ]
    for body in bad:
        problem(await record(client, body), 400, "invalid_request")
    assert await posted(api, WALLET) == 10_000
    assert await usage_total(api) == 0


async def test_batch_settles_reservations_per_event(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """In a batch, an event naming a reservation captures it (or, costing nothing, releases it);
    one naming an unknown reservation, another wallet's, or one already settled is rejected
    alone and recorded nowhere; the batch's other events charge as usual."""
    await setup(client, api, clock, {"e-1": 10_000, "e-2": 10_000})
    await add_price(client, P1)

    async def reserve(account: str, amount: int) -> str:
        r = await client.post(
            "/v1/reservations", json={"account": account, "amount": amount}, headers=key()
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    capture, release, other, settled = (
        await reserve(WALLET, 6000),
        await reserve(WALLET, 500),
        await reserve(OTHER, 100),
        await reserve(WALLET, 300),
    )
    assert (
        await client.post(f"/v1/reservations/{settled}/release", headers=key())
    ).status_code == 200
    missing = "rsv_" + "0" * 32
    events = [
        event("r-plain", 0, 100, cached=0),  # 1000 from e-1's free 3500
        event("r-capture", reservation=capture),  # 4000 of the 6000 held
        event("r-free", 0, 0, cached=0, reservation=release),  # costs nothing: releases
        event("r-missing", reservation=missing),
        event("r-other", reservation=other),  # e-2's reservation, charged to e-1
        event("r-settled", reservation=settled),
        event("r-plain-2", 0, 100, cached=0, account=OTHER),
    ]
    results = await batch(client, events)
    assert [brief(r) for r in results] == [
        {"event_id": "r-plain", "status": "recorded", "code": None, "cost": 1000},
        {"event_id": "r-capture", "status": "recorded", "code": None, "cost": 4000},
        {"event_id": "r-free", "status": "recorded", "code": None, "cost": 0},
        {
            "event_id": "r-missing",
            "status": "rejected",
            "code": "reservation_not_found",
            "cost": None,
        },
        {"event_id": "r-other", "status": "rejected", "code": "invalid_request", "cost": None},
        {
            "event_id": "r-settled",
            "status": "rejected",
            "code": "reservation_not_active",
            "cost": None,
        },
        {"event_id": "r-plain-2", "status": "recorded", "code": None, "cost": 1000},
    ]
    got = (await client.get(f"/v1/reservations/{capture}")).json()
    assert (got["status"], got["captured"], got["capture_transaction_id"]) == (
        "captured",
        4000,
        results[1]["transaction_id"],
    )
    assert (await client.get(f"/v1/reservations/{release}")).json()["status"] == "released"
    account = await api.account(WALLET)
    assert (account["posted"], account["reserved"]) == (10_000 - 1000 - 4000, 0)
    assert await posted(api, OTHER) == 10_000 - 1000
    assert await usage_total(api) == 6000
    # Recorded events answer as single events too; rejected ones were not stored.
    single = await record(client, event("r-capture", reservation=capture))
    assert (single.status_code, single.json()["transaction_id"]) == (
        200,
        results[1]["transaction_id"],
    )
    again = await batch(client, events)
    assert [r["status"] for r in again] == ["duplicate"] * 3 + ["rejected"] * 3 + ["duplicate"]
    assert await usage_total(api) == 6000
    await assert_audit_clean(database_url)


def db_retries(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("tokenledger_db_retries_total "):
            return float(line.split()[1])
    return 0.0


async def test_concurrent_batches_over_shared_accounts_never_deadlock(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """16 batches at once over 8 shared wallets, each charging three of them (in its own
    order) and settling a reservation on a fourth that other batches charge, all record,
    charge exactly, and retry no transaction: every account a batch touches is locked in
    one ordered statement after its events are claimed in key order, and roll-up rows are
    written in key order, so no two batches deadlock."""
    wallets = [f"w-{i}" for i in range(8)]
    await setup(client, api, clock, dict.fromkeys(wallets, 1_000_000))
    await add_price(client, P1)
    reservations = []
    for b in range(16):
        r = await client.post(
            "/v1/reservations",
            json={"account": f"employee:{wallets[(b + 4) % 8]}", "amount": 5000},
            headers=key(),
        )
        assert r.status_code == 201, r.text
        reservations.append(r.json()["id"])
    batches = []
    for b in range(16):
        items = [
            event(
                f"c-{b}-{i}",
                100 + i,
                i % 9,
                cached=i % 5,
                account=f"employee:{wallets[(b + (i * (b + 1)) % 3) % 8]}",
                project=("search", "chat", None)[(b + i) % 3],
            )
            for i in range(40)
        ]
        items.insert(
            b % 40,
            event(
                f"c-{b}-rsv",
                account=f"employee:{wallets[(b + 4) % 8]}",
                reservation=reservations[b],
            ),
        )
        batches.append(items)
    before = db_retries((await client.get("/metrics")).text)

    answers = await asyncio.gather(*(batch(client, items) for items in batches))
    assert all(r["status"] == "recorded" for results in answers for r in results)
    assert db_retries((await client.get("/metrics")).text) == before
    charged = {w: 0 for w in wallets}
    sent = [e for items in batches for e in items]
    counts = [(e["input_tokens"], e["cached_input_tokens"], e["output_tokens"]) for e in sent]
    for e, credits in zip(sent, await usage_costs(database_url, V1, counts), strict=True):
        charged[e["account"].removeprefix("employee:")] += credits
    for w in wallets:
        assert await posted(api, f"employee:{w}") == 1_000_000 - charged[w], w
    assert await usage_total(api) == sum(charged.values())
    await assert_audit_clean(database_url)


async def test_the_reservation_source_is_the_services_own(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A meter cannot post usage under source "reservation" (single: 400; in a
    batch: that event rejected), so it cannot pre-empt a reservation's capture
    by usage: the capture charges."""
    clock.set(P2 - timedelta(minutes=1))
    await api.employee("e-1")
    await api.grant("e-1", 20_000)
    await add_price(client, P1, V1)
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rsv = r.json()
    forged = event(rsv["id"], source="reservation", account=WALLET, reservation=rsv["id"])
    problem(await record(client, forged), 400, "invalid_request")
    (answer,) = await batch(client, [forged])
    assert (answer["status"], answer["code"]) == ("rejected", "invalid_request")
    usage = {"model": MODEL, "input_tokens": 800, "output_tokens": 300}
    r = await client.post(
        f"/v1/reservations/{rsv['id']}/capture", json={"usage": usage}, headers=key()
    )
    assert r.status_code == 200, r.text
    assert r.json()["reservation"]["status"] == "captured"
    assert r.json()["usage"]["status"] == "recorded"
    assert await usage_total(api) == 2000 + 3000  # 800 * 2.5 + 300 * 10
    await assert_audit_clean(database_url)


async def test_occurred_at_must_be_recent(
    config: Any, clock: FakeClock, admin_key: str, database_url: str
) -> None:
    """occurred_at is accepted from TOKENLEDGER_USAGE_MAX_AGE_SECONDS back (7
    days) to TOKENLEDGER_USAGE_MAX_AHEAD_SECONDS ahead (5 minutes) of now:
    outside, 400 (in a batch, that event rejected), so a meter cannot pick an
    old price version or write into closed months."""
    import httpx
    import msgspec

    from service.app import create_app
    from tests.api.conftest import running

    strict = msgspec.structs.replace(
        config, usage_max_age_seconds=7 * 86400, usage_max_ahead_seconds=300
    )
    app = create_app(strict, clock=clock)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {admin_key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t.local", headers=headers
        ) as c:
            api = Api(c)
            await setup(c, api, clock, {"e-1": 100_000})
            await add_price(c, P1, V1)
            old = NOW - timedelta(days=7, seconds=1)
            ahead = NOW + timedelta(minutes=5, seconds=1)
            for i, when in enumerate((old, ahead)):
                body = event(f"bad-{i}", occurred_at=when.isoformat())
                err = problem(await record(c, body), 400, "invalid_request")
                assert err["errors"][0]["path"] == "$.occurred_at", err
            ok = [NOW - timedelta(days=7), NOW + timedelta(minutes=5), NOW]
            results = await batch(
                c,
                [event(f"edge-{i}", occurred_at=w.isoformat()) for i, w in enumerate(ok)]
                + [event("late", occurred_at=old.isoformat())],
            )
            assert [r["status"] for r in results] == ["recorded"] * 3 + ["rejected"]
            assert results[3]["code"] == "invalid_request"


async def test_same_event_id_with_another_body_is_422(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """(source, event_id) is an idempotency key: the same body again is a
    duplicate (200), another body under it is 422 idempotency_key_reused (in
    a batch: that event rejected with that code, a repeat within the batch
    too) and nothing changes."""
    await setup(client, api, clock, {"e-1": 1_000_000})
    await add_price(client, P1, V1)
    first = event("evt-k", output_tokens=200)
    recorded_once = await recorded(client, first)
    again = await record(client, first)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    total = await usage_total(api)
    for change in ({"output_tokens": 201}, {"project": "other"}, {"cached_input_tokens": 0}):
        problem(await record(client, {**first, **change}), 422, "idempotency_key_reused")
    results = await batch(
        client,
        [
            {**first, "output_tokens": 999},
            first,
            event("evt-new"),
            {**event("evt-new"), "output_tokens": 7},
        ],
    )
    assert [(r["status"], r.get("code")) for r in results] == [
        ("rejected", "idempotency_key_reused"),
        ("duplicate", None),
        ("recorded", None),
        ("rejected", "idempotency_key_reused"),
    ]
    assert results[1]["id"] == recorded_once["id"]
    assert await usage_total(api) == total + results[2]["cost"]
    await assert_audit_clean(database_url)


async def test_usage_settles_only_a_reservation_its_caller_made(
    client: Any, api: Api, clock: FakeClock, database_url: str
) -> None:
    """A usage event naming a reservation another meter key made answers 404
    reservation_not_found (in a batch: rejected with that code), and the
    reservation stays active."""
    from tests.api.test_auth import service_key

    await setup(client, api, clock, {"e-1": 100_000})
    await add_price(client, P1, V1)
    other = {"Authorization": f"Bearer {await service_key(database_url, 'meter')}"}
    r = await reserve_estimate(client, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    body = event("settle-1", reservation=rid)
    problem(await client.post("/v1/usage", json=body, headers=other), 404, "reservation_not_found")
    r = await client.post("/v1/usage:batch", json={"events": [body]}, headers=other)
    assert r.status_code == 200, r.text
    (answer,) = r.json()["results"]
    assert (answer["status"], answer.get("code")) == ("rejected", "reservation_not_found")
    reservation = (await client.get(f"/v1/reservations/{rid}")).json()
    assert reservation["status"] == "active"
    await recorded(client, body)  # the key that made it settles it
    assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "captured"
