"""Four-eyes approvals (issue 16, API.md "Approvals")."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.config import Config
from tests.api.conftest import Api, key, problem
from tests.api.test_auth import service_key

THRESHOLD = 1000


@pytest.fixture
def config(config: Config) -> Config:
    return msgspec.structs.replace(config, approval_threshold=THRESHOLD)


@pytest.fixture
async def hr(database_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """Two different hr callers' Authorization headers."""
    first = await service_key(database_url, "hr")
    second = await service_key(database_url, "hr")
    return {"Authorization": f"Bearer {first}"}, {"Authorization": f"Bearer {second}"}


def grant_body(emp: str, amount: int) -> dict[str, Any]:
    return {"employee": emp, "amount": amount, "reason": "spot_bonus"}


async def grant_count(client: AsyncTestClient[Any]) -> int:
    r = await client.get("/v1/transactions?kind=grant&limit=500")
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


async def test_threshold_below_at_above(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]]
) -> None:
    """A grant at or below the threshold posts at once (201); above it answers 202 with a pending
    approval and posts nothing."""
    await api.employee("e-1")
    requester, _ = hr
    for amount in (THRESHOLD - 1, THRESHOLD):
        r = await client.post(
            "/v1/grants", json=grant_body("e-1", amount), headers={**requester, **key()}
        )
        assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", THRESHOLD + 1), headers={**requester, **key()}
    )
    assert r.status_code == 202, r.text
    approval = r.json()["approval"]
    assert approval["id"].startswith("apr_") and approval["status"] == "pending"
    assert approval["kind"] == "grant" and approval["request"]["amount"] == THRESHOLD + 1
    assert approval["requested_by"] and approval["decided_by"] is None
    assert (await api.account("employee:e-1"))["posted"] == 2 * THRESHOLD - 1
    r = await client.get("/v1/approvals?status=pending")
    assert [a["id"] for a in r.json()["items"]] == [approval["id"]]


async def test_approve_posts_once_and_records_both_callers(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]]
) -> None:
    """Approval by another hr caller posts the grant once; the approval names requester and
    approver; the original request and the approval replay idempotently."""
    await api.employee("e-1")
    requester, approver = hr
    grant_key = key()
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", 5000), headers={**requester, **grant_key}
    )
    assert r.status_code == 202, r.text
    apr = r.json()["approval"]

    approve_key = key()
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **approve_key})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "approved" and done["decided_by"] != done["requested_by"]
    assert done["requested_by"] == apr["requested_by"] and done["decided_at"]
    txn = done["result"]["transaction"]
    assert (await api.account("employee:e-1"))["posted"] == 5000
    # The posting names the requester as its actor.
    r = await client.get(f"/v1/transactions/{txn['id']}")
    assert r.json()["actor"] == apr["requested_by"]

    # Replays: the approval with its key, and the original grant request with its key.
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **approve_key})
    assert r.status_code == 200 and r.headers.get("idempotent-replayed") == "true"
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", 5000), headers={**requester, **grant_key}
    )
    assert r.status_code == 202 and r.json()["approval"]["id"] == apr["id"]
    # A fresh approve of a decided approval posts nothing.
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **key()})
    assert problem(r, 409, "not_approvable")["approval_status"] == "approved"
    assert (await api.account("employee:e-1"))["posted"] == 5000
    assert await grant_count(client) == 1


async def test_self_approval_refused(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]]
) -> None:
    """The requester cannot approve their own request: 409 not_approvable, nothing posted."""
    await api.employee("e-1")
    requester, _ = hr
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", 5000), headers={**requester, **key()}
    )
    apr = r.json()["approval"]
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**requester, **key()})
    problem(r, 409, "not_approvable")
    assert (await api.account("employee:e-1"))["posted"] == 0
    r = await client.get(f"/v1/approvals/{apr['id']}")
    assert r.json()["status"] == "pending"


async def test_concurrent_approvals_post_once(
    api: Api,
    client: AsyncTestClient[Any],
    hr: tuple[dict[str, str], dict[str, str]],
    database_url: str,
) -> None:
    """Several callers approving the same request at once post it exactly once: one 200, the rest
    409 not_approvable."""
    await api.employee("e-1")
    requester, approver = hr
    others = [approver] + [
        {"Authorization": f"Bearer {await service_key(database_url, 'hr')}"} for _ in range(3)
    ]
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", 5000), headers={**requester, **key()}
    )
    apr = r.json()["approval"]
    answers = await asyncio.gather(
        *(client.post(f"/v1/approvals/{apr['id']}/approve", headers={**h, **key()}) for h in others)
    )
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409], [a.text for a in answers]
    assert (await api.account("employee:e-1"))["posted"] == 5000
    assert await grant_count(client) == 1


async def test_reject_is_final(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]]
) -> None:
    """A rejected approval can never be approved afterwards, and nothing is posted."""
    await api.employee("e-1")
    requester, approver = hr
    r = await client.post(
        "/v1/grants", json=grant_body("e-1", 5000), headers={**requester, **key()}
    )
    apr = r.json()["approval"]
    r = await client.post(
        f"/v1/approvals/{apr['id']}/reject",
        json={"memo": "too much"},
        headers={**approver, **key()},
    )
    assert (
        r.status_code == 200 and r.json()["status"] == "rejected" and r.json()["memo"] == "too much"
    )
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**key()})
    assert problem(r, 409, "not_approvable")["approval_status"] == "rejected"
    assert (await api.account("employee:e-1"))["posted"] == 0
    problem(await client.get("/v1/approvals/apr_nope"), 404, "approval_not_found")
    problem(
        await client.post(
            "/v1/approvals/apr_00000000000000000000000000000000/approve", headers=key()
        ),
        404,
        "approval_not_found",
    )


async def test_batch_above_threshold_needs_approval(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]]
) -> None:
    """A batch with one item above the threshold posts nothing and answers 202; sending it again
    answers the same approval; approving posts every item once under its key."""
    await api.employee("e-1")
    await api.employee("e-2")
    requester, approver = hr
    batch = {
        "grants": [
            {"key": "k1", **grant_body("e-1", 10)},
            {"key": "k2", **grant_body("e-2", THRESHOLD + 5)},
        ]
    }
    r = await client.post("/v1/grants:batch", json=batch, headers=requester)
    assert r.status_code == 202, r.text
    apr = r.json()["approval"]
    assert apr["kind"] == "grant_batch"
    r = await client.post("/v1/grants:batch", json=batch, headers=requester)
    assert r.status_code == 202 and r.json()["approval"]["id"] == apr["id"]
    assert await grant_count(client) == 0
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **key()})
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["result"]["results"]] == ["created", "created"]
    assert (await api.account("employee:e-2"))["posted"] == THRESHOLD + 5
    assert await grant_count(client) == 2


async def test_program_run_above_threshold_needs_approval(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]], clock: Any
) -> None:
    """A manual run of a program granting more than the threshold answers 202 and issues nothing;
    approving runs the cycle once; running it again afterwards issues nothing new."""
    from datetime import UTC, datetime

    clock.set(datetime(2026, 5, 10, tzinfo=UTC))
    await api.employee("e-1")
    requester, approver = hr
    program = {
        "amount": THRESHOLD * 2,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "starts_on": "2026-05-01",
        "active": True,
    }
    r = await client.put("/v1/grant-programs/big", json=program, headers=requester)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/grant-programs/big/runs", json={"cycle": "2026-05"}, headers=requester
    )
    assert r.status_code == 202, r.text
    apr = r.json()["approval"]
    assert apr["kind"] == "program_run" and apr["request"] == {"program": "big", "cycle": "2026-05"}
    assert (await api.account("employee:e-1"))["posted"] == 0
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **key()})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["issued"] == 1
    assert (await api.account("employee:e-1"))["posted"] == THRESHOLD * 2
    r = await client.post(
        "/v1/grant-programs/big/runs", json={"cycle": "2026-05"}, headers=requester
    )
    assert r.status_code == 200 and r.json()["issued"] == 0
    assert (await api.account("employee:e-1"))["posted"] == THRESHOLD * 2


async def test_approved_program_run_names_requester_like_grants(
    api: Api, client: AsyncTestClient[Any], hr: tuple[dict[str, str], dict[str, str]], clock: Any
) -> None:
    """An approved program run's grants carry the requester as actor, as an approved grant's
    posting does; the approval names the approver (the audit trail shows both)."""
    from datetime import UTC, datetime

    clock.set(datetime(2026, 5, 10, tzinfo=UTC))
    await api.employee("e-1")
    requester, approver = hr
    program = {
        "amount": THRESHOLD * 2,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "starts_on": "2026-05-01",
        "active": True,
    }
    r = await client.put("/v1/grant-programs/big", json=program, headers=requester)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/grant-programs/big/runs", json={"cycle": "2026-05"}, headers=requester
    )
    apr = r.json()["approval"]
    r = await client.post(f"/v1/approvals/{apr['id']}/approve", headers={**approver, **key()})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["decided_by"] and done["decided_by"] != done["requested_by"]
    r = await client.get("/v1/transactions?kind=grant&limit=10")
    grants = r.json()["items"]
    assert len(grants) == 1
    assert grants[0]["actor"] == apr["requested_by"]
