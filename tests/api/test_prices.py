"""Model prices over HTTP: versions, their selection in time, and the SQL cost."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from service import db
from service.api.resources import Price, PricesPage
from service.pricing import MAX_RATE_PER_MTOK, MAX_TOKENS, PriceRates
from tests.api.conftest import key, problem
from tests.api.test_auth import service_key

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 2, 1, 12, 30, tzinfo=UTC)


def body(model: str = "gpt-4o", at: datetime = T0, **rates: Any) -> dict[str, Any]:
    return {
        "model": model,
        "effective_from": at.isoformat(),
        "input_per_mtok": 2_500_000,
        "cached_input_per_mtok": 1_250_000,
        "output_per_mtok": 10_000_000,
        **rates,
    }


async def add(client: Any, **kwargs: Any) -> dict[str, Any]:
    r = await client.post("/v1/prices", json=body(**kwargs), headers=key())
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_post_creates_a_version(client: Any) -> None:
    """POST /v1/prices answers 201 with the new version in the Price shape."""
    r = await client.post("/v1/prices", json=body(tier="premium"), headers=key())
    assert r.status_code == 201, r.text
    price = msgspec.convert(r.json(), Price)
    assert price.id.startswith("prc_") and len(price.id) == 36
    assert msgspec.to_builtins(price) == {
        "id": price.id,
        "model": "gpt-4o",
        "tier": "premium",
        "effective_from": "2026-01-01T00:00:00.000000Z",
        "input_per_mtok": 2_500_000,
        "cached_input_per_mtok": 1_250_000,
        "output_per_mtok": 10_000_000,
        "source": "api",
        "created_at": price.created_at,
    }


async def test_replay_returns_the_stored_version(client: Any) -> None:
    """The same Idempotency-Key and body again answers the same version, marked replayed."""
    headers = key()
    first = await client.post("/v1/prices", json=body(), headers=headers)
    again = await client.post("/v1/prices", json=body(), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = await client.post("/v1/prices", json=body(output_per_mtok=1), headers=headers)
    problem(other, 422, "idempotency_key_reused")


async def test_same_version_again_is_a_no_op(client: Any) -> None:
    """The same model, effective_from and rates under a new key answer the existing version."""
    first = await add(client)
    second = await add(client)
    assert second == first
    listed = (await client.get("/v1/prices?model=gpt-4o")).json()["items"]
    assert [p["id"] for p in listed] == [first["id"]]


async def test_conflicting_version_is_refused(client: Any) -> None:
    """Other rates at an existing (model, effective_from) answer 400: a version is never edited."""
    first = await add(client)
    r = await client.post("/v1/prices", json=body(output_per_mtok=9), headers=key())
    err = problem(r, 400, "invalid_request")
    assert err["detail"] == (
        "gpt-4o already has a different price version effective from "
        f"2026-01-01T00:00:00.000000Z ({first['id']}); prices are never edited: "
        "add a version with a later effective_from"
    )
    assert err["price_id"] == first["id"]
    r = await client.post("/v1/prices", json=body(tier="premium"), headers=key())
    problem(r, 400, "invalid_request")


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"input_per_mtok": -1}, "$.input_per_mtok"),
        ({"output_per_mtok": MAX_RATE_PER_MTOK + 1}, "$.output_per_mtok"),
        ({"cached_input_per_mtok": 1.5}, "$.cached_input_per_mtok"),
        ({"model": "-starts-with-dash"}, "$.model"),
        ({"model": "has space"}, "$.model"),
        ({"model": "m" * 129}, "$.model"),
        ({"effective_from": "2026-01-01T00:00:00"}, "$.effective_from"),
        ({"tier": "gold"}, "$.tier"),
        ({"currency": "usd"}, "$"),
        ({"output_per_mtok": None}, "$.output_per_mtok"),
    ],
)
async def test_invalid_bodies_answer_400(client: Any, change: dict[str, Any], path: str) -> None:
    """Bad rates, model names, naive times, tiers and unknown fields answer 400 with the path."""
    r = await client.post("/v1/prices", json={**body(), **change}, headers=key())
    err = problem(r, 400, "invalid_request")
    assert err["errors"][0]["path"] == path
    assert (await client.get("/v1/prices")).json()["items"] == []


async def test_missing_field_answers_400(client: Any) -> None:
    """A body without output_per_mtok names the missing field."""
    incomplete = body()
    del incomplete["output_per_mtok"]
    r = await client.post("/v1/prices", json=incomplete, headers=key())
    err = problem(r, 400, "invalid_request")
    assert "output_per_mtok" in err["detail"]


async def test_post_needs_an_idempotency_key(client: Any) -> None:
    """POST /v1/prices without an Idempotency-Key answers 400 idempotency_key_required."""
    problem(await client.post("/v1/prices", json=body()), 400, "idempotency_key_required")


async def test_roles(client: Any, database_url: str) -> None:
    """finance adds prices; meter and hr may read them but not add them."""
    tokens = {role: await service_key(database_url, role) for role in ("finance", "meter", "hr")}

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[role]}", **key()}

    r = await client.post("/v1/prices", json=body(), headers=auth("finance"))
    assert r.status_code == 201, r.text
    for role in ("meter", "hr"):
        problem(await client.post("/v1/prices", json=body(), headers=auth(role)), 403, "forbidden")
        listed = await client.get("/v1/prices", headers=auth(role))
        assert listed.status_code == 200
        assert [p["id"] for p in listed.json()["items"]] == [r.json()["id"]]


async def test_versions_are_listed_newest_first(client: Any) -> None:
    """GET /v1/prices lists every version, newest effective_from first, by model on request."""
    a0 = await add(client, at=T0)
    a1 = await add(client, at=T1, output_per_mtok=8_000_000)
    b0 = await add(client, model="claude-3-5-haiku-20241022", at=T0 + timedelta(days=1))
    page = msgspec.convert((await client.get("/v1/prices")).json(), PricesPage)
    assert [p.id for p in page.items] == [a1["id"], b0["id"], a0["id"]]
    assert page.next_cursor is None
    only = (await client.get("/v1/prices?model=gpt-4o")).json()["items"]
    assert [p["id"] for p in only] == [a1["id"], a0["id"]]
    assert (await client.get("/v1/prices?model=unknown")).json() == {
        "items": [],
        "next_cursor": None,
    }


async def test_versions_paginate(client: Any) -> None:
    """limit and cursor walk the versions without repeats or gaps."""
    added = [await add(client, at=T0 + timedelta(hours=i)) for i in range(5)]
    seen: list[str] = []
    url = "/v1/prices?limit=2"
    while True:
        r = (await client.get(url)).json()
        seen += [p["id"] for p in r["items"]]
        if r["next_cursor"] is None:
            break
        url = f"/v1/prices?limit=2&cursor={r['next_cursor']}"
    assert seen == [p["id"] for p in reversed(added)]
    problem(await client.get("/v1/prices?cursor=bm9wZQ"), 400, "invalid_request")


async def test_version_in_effect_at_an_instant(client: Any) -> None:
    """At effective_from the new version is in effect; 1 µs before it, the previous one."""
    old = await add(client, at=T0)
    new = await add(client, at=T1, output_per_mtok=8_000_000)
    other = await add(client, model="claude-3-5-haiku-20241022", at=T1)

    async def at(when: datetime, model: str | None = "gpt-4o") -> list[str]:
        params: dict[str, str] = {"at": when.isoformat()}
        if model:
            params["model"] = model
        r = await client.get("/v1/prices", params=params)
        assert r.status_code == 200, r.text
        return [p["id"] for p in r.json()["items"]]

    assert await at(T0 - timedelta(microseconds=1)) == []
    assert await at(T0) == [old["id"]]
    assert await at(T1 - timedelta(microseconds=1)) == [old["id"]]
    assert await at(T1) == [new["id"]]
    assert await at(T1 + timedelta(microseconds=1)) == [new["id"]]
    # Without a model: one version per model, by model name.
    assert await at(T1, None) == [other["id"], new["id"]]
    assert await at(T1 - timedelta(microseconds=1), None) == [old["id"]]
    naive = await client.get("/v1/prices?at=2026-01-01T00:00:00")
    problem(naive, 400, "invalid_request")


async def test_prices_are_append_only(client: Any, database_url: str) -> None:
    """UPDATE and DELETE of a price version are refused by the database itself."""
    await add(client)
    conn = await asyncpg.connect(database_url)
    try:
        for statement in (
            "UPDATE prices SET output_per_mtok = 1",
            "DELETE FROM prices",
            "TRUNCATE prices CASCADE",  # usage_events refers to prices
        ):
            with pytest.raises(asyncpg.PostgresError, match="is not allowed") as exc:
                await conn.execute(statement)
            assert exc.value.sqlstate == "TLE01"
        assert await conn.fetchval("SELECT count(*) FROM prices WHERE output_per_mtok = 1") == 0
        assert await conn.fetchval("SELECT count(*) FROM prices") == 1
        with pytest.raises(asyncpg.CheckViolationError, match="prices_input_rate_range"):
            await conn.execute(
                "INSERT INTO prices (id, model, effective_from, input_per_mtok,"
                " cached_input_per_mtok, output_per_mtok, source)"
                " VALUES (gen_random_uuid(), 'm', now(), -1, 0, 0, 'test')"
            )
    finally:
        await conn.close()


# tl_usage_cost at the version in effect at an instant (NULL when there is none).
COST_AT = "SELECT tl_usage_cost(tl_price_at($1, $2), $3, $4, $5)"


def formula(input_tokens: int, cached: int, output: int, rates: PriceRates) -> int:
    """README, Prices: the exact cost of an event in millionths, rounded up once."""
    millionths = (
        (input_tokens - cached) * rates.input_per_mtok
        + cached * rates.cached_input_per_mtok
        + output * rates.output_per_mtok
    )
    return -(-millionths // 10**6)


async def test_sql_cost_is_the_formula_on_many_events(client: Any, database_url: str) -> None:
    """tl_usage_cost at a model's version gives README's formula's credits on many events."""
    rng = random.Random(20260101)  # noqa: S311  # why: a seeded, repeatable test sample
    rate_choices = [0, 1, 3, 75, 150, 999_999, 1_000_000, 1_000_001, MAX_RATE_PER_MTOK]
    token_choices = [0, 1, 2, 999, 999_999, 1_000_000, 1_000_001, MAX_TOKENS - 1, MAX_TOKENS]
    models = []
    for i in range(12):
        rates = {
            "input_per_mtok": rng.choice(rate_choices + [rng.randrange(MAX_RATE_PER_MTOK)]),
            "cached_input_per_mtok": rng.choice(rate_choices + [rng.randrange(10_000)]),
            "output_per_mtok": rng.choice(rate_choices + [rng.randrange(MAX_RATE_PER_MTOK)]),
        }
        await add(client, model=f"m-{i}", **rates)
        models.append((f"m-{i}", PriceRates(**rates)))
    conn = await db.connect(database_url)
    query = COST_AT
    try:
        checked = 0
        for model, rates in models:
            for _ in range(40):
                input_tokens = rng.choice(token_choices + [rng.randrange(MAX_TOKENS)])
                cached = rng.choice([0, input_tokens, rng.randint(0, input_tokens)])
                output = rng.choice(token_choices + [rng.randrange(MAX_TOKENS)])
                expected = formula(input_tokens, cached, output, rates)
                got = await conn.fetchval(query, model, T1, input_tokens, cached, output)
                assert got == expected, (model, rates, input_tokens, cached, output)
                checked += 1
        assert checked == 480
        assert await conn.fetchval(query, "no-such-model", T1, 1, 0, 1) is None
        assert await conn.fetchval(query, "m-0", T0 - timedelta(seconds=1), 1, 0, 1) is None
        with pytest.raises(asyncpg.PostgresError, match="invalid_request"):
            await conn.fetchval(query, "m-0", T1, 1, 2, 0)
    finally:
        await conn.close()
