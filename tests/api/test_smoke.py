"""The first walk through the API: the README's curl walk-through, as a test."""

from __future__ import annotations

from tests.api.conftest import Api, key


async def test_walkthrough(api: Api) -> None:
    """A department, an employee, an expiring signing bonus, a debit, then balance and history."""
    await api.department("eng")
    await api.employee("e-1042")
    grant = await api.grant(
        "e-1042", 500, reason="signing_bonus", expires_at="2099-01-01T00:00:00Z"
    )
    assert grant["lot"]["remaining"] == 500
    r = await api.debit("employee:e-1042", 120, metadata={"model": "gpt-x"})
    assert r.status_code == 201, r.text
    acct = await api.account("employee:e-1042")
    assert acct["posted"] == 380 and acct["available"] == 380
    assert acct["expiring"] == [{"amount": 380, "expires_at": "2099-01-01T00:00:00.000000Z"}]
    r = await api.c.get("/v1/accounts/employee:e-1042/entries")
    assert [e["amount"] for e in r.json()["items"]] == [-120, 500]
    assert key()["Idempotency-Key"] != key()["Idempotency-Key"]
