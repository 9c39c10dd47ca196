"""`tokenledger sweep`: the background sweeper's loop, run to the end once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.cli.ledger import sweep
from tests.api.conftest import Api, FakeClock, assert_audit_clean, posted, ts


async def test_sweep_command_expires_every_due_lot_once(
    api: Api, clock: FakeClock, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command writes the expiry of every lot due by the database's clock, prints the
    credits, and finds nothing more when run again."""
    now = datetime.now(UTC)
    clock.set(now - timedelta(days=2))
    for emp, amount in (("a", 100), ("b", 250)):
        await api.employee(emp)
        await api.grant(emp, amount, expires_at=ts(now - timedelta(days=1)))
    await api.employee("c")
    await api.grant("c", 40, expires_at=ts(now + timedelta(days=1)))

    capsys.readouterr()  # the requests' log lines
    assert await sweep(database_url) == 0
    assert capsys.readouterr().out == "expired 350 credits\n"
    assert await sweep(database_url) == 0
    assert capsys.readouterr().out == "expired 0 credits\n"
    clock.set(now)
    assert [await posted(api, f"employee:{e}") for e in "abc"] == [0, 0, 40]
    await assert_audit_clean(database_url)
