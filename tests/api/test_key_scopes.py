"""Key scopes (issue 11, defect 8): a meter key narrowed to some usage sources and account
types charges nothing outside them, and a changed scope reaches a replica's key cache."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec

from service import db
from service.app import create_app
from service.config import Config
from tests.api.conftest import Api, key, problem, running
from tests.api.test_auth import service_key

PRICE = {
    "model": "gpt-4o",
    "effective_from": "2026-01-01T00:00:00Z",
    "input_per_mtok": 2_500_000,
    "cached_input_per_mtok": 1_250_000,
    "output_per_mtok": 10_000_000,
}


async def scope(database_url: str, secret: str, sources: Any, account_types: Any) -> None:
    conn = await db.connect(database_url)
    try:
        row = await conn.fetchrow(
            db.load_queries()["set_key_scopes"], secret.split("_")[1], sources, account_types
        )
        assert row is not None
    finally:
        await conn.close()


async def world(api: Api) -> None:
    await api.department("eng")
    await api.employee("e1")
    await api.grant("e1", 1_000)
    r = await api.c.post(
        "/v1/transfers",
        json={"from": "system:issuance", "to": "department:eng", "amount": 1_000},
        headers=key(),
    )
    assert r.status_code == 201, r.text
    r = await api.c.post("/v1/prices", json=PRICE, headers=key())
    assert r.status_code == 201, r.text


def usage(event_id: str, account: str = "employee:e1", source: str = "gw") -> dict[str, Any]:
    return {
        "source": source,
        "event_id": event_id,
        "account": account,
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 10,
    }


async def test_a_key_charges_only_the_account_types_it_is_scoped_to(
    api: Api, database_url: str
) -> None:
    """A meter key scoped to employee wallets gets 403 on a department account for a debit, a
    reservation and a usage event, and nothing moves; employee wallets still work."""
    await world(api)
    secret = await service_key(database_url, "meter")
    await scope(database_url, secret, None, ["employee"])
    auth = {"Authorization": f"Bearer {secret}"}
    for path, body in (
        ("/v1/debits", {"account": "department:eng", "amount": 5}),
        ("/v1/reservations", {"account": "department:eng", "amount": 5}),
        ("/v1/usage", usage("u-dept", account="department:eng")),
    ):
        r = await api.c.post(path, json=body, headers={**auth, **key()})
        assert (
            problem(r, 403, "forbidden")["detail"] == "this key may not charge department accounts"
        )
    assert await api.available("department:eng") == 1_000
    r = await api.c.post(
        "/v1/debits", json={"account": "employee:e1", "amount": 5}, headers={**auth, **key()}
    )
    assert r.status_code == 201, r.text
    assert await api.available("employee:e1") == 995


async def test_a_key_records_usage_only_from_its_sources(api: Api, database_url: str) -> None:
    """A key scoped to source `gw` gets 403 for another source; in a batch only that event is
    rejected (`forbidden`) and the others are recorded."""
    await world(api)
    secret = await service_key(database_url, "meter")
    await scope(database_url, secret, ["gw"], None)
    auth = {"Authorization": f"Bearer {secret}"}
    r = await api.c.post("/v1/usage", json=usage("u-1", source="batch-job"), headers=auth)
    assert problem(r, 403, "forbidden")
    r = await api.c.post(
        "/v1/usage:batch",
        json={"events": [usage("u-2"), usage("u-3", source="batch-job"), usage("u-4")]},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["recorded", "rejected", "recorded"]
    assert results[1]["code"] == "forbidden"
    conn = await db.connect(database_url)
    try:
        events = await conn.fetch("SELECT source, event_id FROM usage_events ORDER BY event_id")
    finally:
        await conn.close()
    assert [(e["source"], e["event_id"]) for e in events] == [("gw", "u-2"), ("gw", "u-4")]


async def test_a_new_scope_reaches_a_replica_that_cached_the_key(
    config: Config, database_url: str, api: Api
) -> None:
    """A replica that has the key cached (TTL 60 s, so only the NOTIFY can drop it) refuses the
    newly out-of-scope charge at once."""
    await world(api)
    secret = await service_key(database_url, "meter")
    config = msgspec.structs.replace(config, key_cache_ttl_seconds=60.0)
    async with running(app := create_app(config)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://replica.local"
        ) as c:
            auth = {"Authorization": f"Bearer {secret}"}
            body = {"account": "department:eng", "amount": 1}
            r = await c.post("/v1/debits", json=body, headers={**auth, **key()})
            assert r.status_code == 201, r.text
            await scope(database_url, secret, None, ["employee"])
            statuses: list[int] = []

            async def refused() -> None:
                r = await c.post("/v1/debits", json=body, headers={**auth, **key()})
                statuses.append(r.status_code)

            for _ in range(100):
                await refused()
                if statuses[-1] == 403:
                    break
                await asyncio.sleep(0.01)
            assert statuses[-1] == 403, statuses
