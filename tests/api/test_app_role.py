"""Least privilege: the tokenledger_app role may write the journal but never rewrite it."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import Config
from tests.api.conftest import Api


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE transactions SET memo = 'x'",
        "DELETE FROM entries",
        "UPDATE entries SET amount = amount + 1",
        "DELETE FROM lot_movements",
        "TRUNCATE transactions CASCADE",
    ],
)
async def test_app_role_cannot_rewrite_the_journal(db: asyncpg.Connection, statement: str) -> None:
    """As tokenledger_app, UPDATE, DELETE and TRUNCATE on the journal are refused by
    privileges, before any trigger is consulted."""
    await db.execute("SET ROLE tokenledger_app")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute(statement)


async def test_app_role_cannot_disable_triggers(db: asyncpg.Connection) -> None:
    """tokenledger_app does not own the tables, so it cannot switch the append-only triggers off."""
    await db.execute("SET ROLE tokenledger_app")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("ALTER TABLE entries DISABLE TRIGGER USER")


async def test_service_runs_as_app_role(config: Config, admin_key: str) -> None:
    """With TOKENLEDGER_DB_ROLE=tokenledger_app every ledger operation still works."""
    cfg = msgspec.structs.replace(config, db_role="tokenledger_app")
    async with AsyncTestClient(app=create_app(cfg), timeout=30) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        api = Api(c)
        await api.employee("e-1")
        await api.employee("e-2")
        grant: dict[str, Any] = await api.grant("e-1", 100, expires_at="2099-01-01T00:00:00Z")
        assert (await api.debit("employee:e-1", 30)).status_code == 201
        assert (await api.transfer("employee:e-1", "employee:e-2", 20)).status_code == 201
        r = await c.post(
            f"/v1/transactions/{grant['transaction']['id']}/reverse",
            json={},
            headers={"Idempotency-Key": "rev-1"},
        )
        assert r.status_code == 409  # partly spent: the check runs under the app role too
        assert await api.available("employee:e-1") == 50
        r = await c.get("/v1/accounts/employee:e-1")
        assert r.status_code == 200
        # Reservations and metering write tables of their own.
        r = await c.post(
            "/v1/reservations",
            json={"account": "employee:e-1", "amount": 10},
            headers={"Idempotency-Key": "rsv-1"},
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            f"/v1/reservations/{r.json()['id']}/capture",
            json={"amount": 4},
            headers={"Idempotency-Key": "cap-1"},
        )
        assert r.status_code == 200, r.text
        price = {
            "model": "m1",
            "effective_from": "2020-01-01T00:00:00Z",
            "input_per_mtok": 1_000_000,
            "cached_input_per_mtok": 1_000_000,
            "output_per_mtok": 1_000_000,
        }
        r = await c.post("/v1/prices", json=price, headers={"Idempotency-Key": "prc-1"})
        assert r.status_code == 201, r.text
        event = {"source": "gw", "account": "employee:e-1", "model": "m1", "output_tokens": 0}
        r = await c.post("/v1/usage", json={**event, "event_id": "u1", "input_tokens": 3})
        assert r.status_code == 201, r.text
        r = await c.post(
            "/v1/usage:batch",
            json={
                "events": [
                    {**event, "event_id": "u2", "input_tokens": 2},
                    {**event, "event_id": "u3", "input_tokens": 10**9},
                ]
            },
        )
        # u3 does not fit: its claim is given back (DELETE) and it is recorded one by
        # one with its shortfall on system:overage (spend policy, issue 12).
        assert [x["status"] for x in r.json()["results"]] == ["recorded", "recorded"], r.text
        assert r.json()["results"][1]["shortfall"] == 10**9 - (50 - 4 - 3 - 2), r.text
        assert await api.available("employee:e-1") == 0
        # Grant programs: a definition, a run in batches, a re-run, and an
        # onboarding grant (which also removes its empty onboarding runs).
        c.app.state.ledger.config = msgspec.structs.replace(
            c.app.state.ledger.config, program_run_batch_size=1
        )
        program = {
            "amount": 5,
            "reason": "monthly_allotment",
            "cadence": {"every": "month", "day": 1},
            "audience": {"all": True},
            "expiry": None,
            "starts_on": "2026-01-01",
            "active": True,
        }
        r = await c.put("/v1/grant-programs/monthly", json=program)
        assert r.status_code == 201, r.text
        cycle = r.json()["current_cycle"]["cycle"]
        r = await c.post("/v1/grant-programs/monthly/runs", json={"cycle": cycle})
        assert r.status_code == 200 and r.json()["issued"] == 2, r.text
        r = await c.post("/v1/grant-programs/monthly/runs", json={"cycle": cycle})
        assert r.status_code == 200 and r.json()["issued"] == 0, r.text
        await api.employee("e-3")
        assert await api.available("employee:e-3") == 5
        await api.employee("e-3", "ops")
        await api.employee("e-3", "eng")
