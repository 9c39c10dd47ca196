"""Retention on a year of history (README, Retention): idempotency keys go
after their 30 days in small batches, old usage events move to the archive
while reports over the roll-ups and the audit stay exact, and the journal
keeps every entry."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import pytest

from service.audit import audit
from service.config import Config
from tests.db.test_audit_plans import year

__all__ = ["year"]  # the fixture, shared with the audit tests


async def test_idempotency_keys_purged_after_30_days_in_batches(year: asyncpg.Connection) -> None:
    """Each purge call deletes at most its batch, oldest first; in the end no
    key older than 30 days is left and every newer one is."""
    # The year's own keys older than 30 days are few and random in number (9
    # in one run, where the batches below need more than 10): twelve more,
    # 31 to 34 days old, so that the purge always takes several batches.
    await year.execute(
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body, created_at)"
        " SELECT 'gateway', 'old-' || g, '\\x00', 201, '{}'::jsonb,"
        " now() - interval '31 days' - g * interval '6 hours' FROM generate_series(1, 12) g"
    )
    cutoff = await year.fetchval("SELECT now() - interval '30 days'")
    old = await year.fetchval("SELECT count(*) FROM idempotency_keys WHERE created_at < $1", cutoff)
    young = await year.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE created_at >= $1", cutoff
    )
    assert old > 10 and young > 0
    deleted = []
    while n := await year.fetchval("SELECT tl_purge_idempotency_keys('30 days', 5)"):
        deleted.append(n)
    assert max(deleted) == 5 and sum(deleted) == old
    assert (
        await year.fetchval("SELECT count(*) FROM idempotency_keys WHERE created_at < $1", cutoff)
        == 0
    )
    assert await year.fetchval("SELECT count(*) FROM idempotency_keys") == young


async def test_old_usage_events_archived_reports_and_audit_stay_exact(
    year: asyncpg.Connection,
) -> None:
    """Events older than the horizon move to the archive in batches; the
    monthly roll-ups, the journal and the audit are unchanged by it."""
    rollups = (
        "SELECT month, account_id, model, events, credits FROM usage_monthly_models "
        "ORDER BY 1, 2, 3"
    )
    before_rollups = await year.fetch(rollups)
    entries = await year.fetchval("SELECT count(*) FROM entries")
    events = await year.fetchval("SELECT count(*) FROM usage_events")
    horizon: datetime = await year.fetchval("SELECT now() - interval '90 days'")
    due = await year.fetchval(
        "SELECT count(*) FROM usage_events WHERE occurred_at < $1 AND recorded_at < $1", horizon
    )
    assert 0 < due < events
    moved = []
    while n := await year.fetchval("SELECT tl_archive_usage_events($1, 500)", horizon):
        moved.append(n)
    assert max(moved) == 500 and sum(moved) == due
    assert await year.fetchval("SELECT count(*) FROM usage_events_archive") == due
    assert await year.fetchval("SELECT count(*) FROM usage_events") == events - due
    assert await year.fetchval("SELECT min(occurred_at) FROM usage_events") >= horizon - timedelta(
        0
    )
    assert await year.fetch(rollups) == before_rollups
    assert await year.fetchval("SELECT count(*) FROM entries") == entries
    run = await audit(year, full=True, settle_seconds=0)
    assert run.violations == []


def test_archive_horizon_must_outlast_the_retry_window() -> None:
    """A horizon shorter than 31 days, or than the age a usage event may be
    recorded at, is refused at start-up (a retry of an archived event would be
    charged again); 0 turns archiving off."""
    with pytest.raises(ValueError, match="usage_archive_after_days"):
        Config(usage_archive_after_days=10)
    with pytest.raises(ValueError, match="usage_archive_after_days"):
        Config(usage_archive_after_days=40, usage_max_age_seconds=60 * 86_400)
    assert Config(usage_archive_after_days=0).usage_archive_after_days == 0
    assert Config(usage_archive_after_days=90).usage_archive_after_days == 90
