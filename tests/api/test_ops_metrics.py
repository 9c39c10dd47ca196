"""Operations metrics: every metric the Grafana dashboard and the Prometheus
alert rules read is one /metrics of a running app exposes, and the
ledger-wide gauges (lags, system balances) say what the ledger holds."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import yaml
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.background import Background
from service.config import Config
from tests.api.conftest import Api, FakeClock, problem, running

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tokenledger.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Referenced by the dashboard and the rules before the code that exports them
# has landed: each is named here with the change that brings it, and printed
# on every run, so the gap is visible rather than skipped.
PENDING: dict[str, str] = {}

# The app answers /metrics' database queries at most once a second
# (service/operations.py, PUBLIC_QUERY_SECONDS); a test that changes the ledger
# waits this long before scraping again.
FRESH_SECONDS = 1.1


def referenced_metrics() -> set[str]:
    """Every tokenledger_* series name in the dashboard's and the rules' queries."""
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    walk(dashboard["panels"])
    exprs.extend(v["definition"] for v in dashboard["templating"]["list"] if v.get("definition"))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        exprs.extend(rule["expr"] for rule in group["rules"])
    return {name for expr in exprs for name in re.findall(r"\btokenledger_[a-z0-9_]+", expr)}


def exposed_series(text: str) -> set[str]:
    """The series names a scrape can contain, from its # TYPE lines (a
    histogram is _bucket, _count and _sum; a labelled family with no child
    yet still has its TYPE line)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def gauge(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the scrape."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, flags=re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


async def scrape(client: AsyncTestClient[Any]) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


async def test_every_dashboard_and_alert_metric_is_exposed(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Each tokenledger_* name in deploy/grafana and deploy/prometheus is exposed by
    /metrics of a running app, except the PENDING ones, which are listed aloud."""
    await api.employee("e-metrics")
    await api.grant("e-metrics", 10)
    referenced = referenced_metrics()
    assert len(referenced) >= 15, referenced  # the parsing found the queries
    exposed = exposed_series(await scrape(client))
    missing = sorted(referenced - exposed - PENDING.keys())
    assert not missing, f"dashboard or alert rules read metrics /metrics lacks: {missing}"
    for name, reason in sorted(PENDING.items()):
        assert name in referenced, f"{name} is pending but nothing references it: drop it"
        state = "now exposed: drop it from PENDING" if name in exposed else "not exposed yet"
        print(f"pending metric {name}: {reason}; {state}")


async def test_ledger_gauges_follow_the_ledger(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """The chain lag is the age of the oldest unchained transaction and falls to 0
    once the chainer has run; the system balances are the credits issued, spent and
    expired."""
    now = datetime.now(UTC)
    clock.set(now - timedelta(hours=2))
    await api.employee("e-gauges")
    await api.grant("e-gauges", 700, expires_at=(now - timedelta(hours=1)).isoformat())
    await api.grant("e-gauges", 500)
    clock.now = None
    r = await api.debit("employee:e-gauges", 120)
    assert r.status_code == 201, r.text

    text = await scrape(client)
    # The grants were written two hours ago by the service's clock and nothing
    # is chained. The first grant's lot has been due for an hour, but the
    # debit wrote its expiry (every write to a wallet does): no sweeper lag.
    assert 7100 < gauge(text, "tokenledger_chain_lag_seconds") < 7300
    assert gauge(text, "tokenledger_sweeper_lag_seconds") == 0
    assert gauge(text, "tokenledger_scheduler_lag_seconds") == 0
    balance = "tokenledger_system_account_balance_credits"
    assert gauge(text, balance, '{account="system:issuance"}') == -1200
    assert gauge(text, balance, '{account="system:usage"}') == 120
    assert gauge(text, balance, '{account="system:expired"}') == 700

    conn = await asyncpg.connect(database_url)
    try:
        # Chain everything at once (the service waits for the settle window).
        await conn.fetchval("SELECT tl_chain_pending(10000, interval '0', true)")
    finally:
        await conn.close()
    await asyncio.sleep(FRESH_SECONDS)
    text = await scrape(client)
    assert gauge(text, "tokenledger_chain_lag_seconds") == 0


async def test_an_unswept_expiry_shows_as_sweeper_lag(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A lot past its expiry that no write has touched is sweeper lag until the
    sweeper writes its expiry."""
    now = datetime.now(UTC)
    clock.set(now - timedelta(minutes=30))
    await api.employee("e-idle")
    await api.grant("e-idle", 50, expires_at=(now - timedelta(minutes=10)).isoformat())
    clock.now = None
    text = await scrape(client)
    assert 550 < gauge(text, "tokenledger_sweeper_lag_seconds") < 700
    assert await Background(client.app.state.ledger).sweep_expired() == 50
    await asyncio.sleep(FRESH_SECONDS)
    text = await scrape(client)
    assert gauge(text, "tokenledger_sweeper_lag_seconds") == 0
    assert (
        gauge(text, "tokenledger_system_account_balance_credits", '{account="system:expired"}')
        == 50
    )


async def test_an_owed_program_cycle_shows_as_scheduler_lag(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A grant-program cycle that has started and has not been run is scheduler lag
    from the cycle's start, until the scheduler issues it."""
    now = datetime.now(UTC)
    last_month = (now.replace(day=1) - timedelta(days=1)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    clock.set(last_month - timedelta(days=10))
    await api.employee("e-program")
    program = {
        "amount": 100,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "expiry": {"at": "end_of_cycle"},
        "starts_on": last_month.date().isoformat(),
        "active": True,
    }
    r = await api.c.put("/v1/grant-programs/monthly", json=program)
    assert r.status_code == 201, r.text
    clock.now = None
    text = await scrape(client)
    expected = (datetime.now(UTC) - last_month).total_seconds()
    assert abs(gauge(text, "tokenledger_scheduler_lag_seconds") - expected) < 120
    runs = await Background(client.app.state.ledger).run_programs()
    assert [run["cycle"] for run in runs] == [
        last_month.strftime("%Y-%m"),
        now.strftime("%Y-%m"),
    ]
    await asyncio.sleep(FRESH_SECONDS)
    text = await scrape(client)
    assert gauge(text, "tokenledger_scheduler_lag_seconds") == 0


async def test_503s_are_counted_by_route(config: Config, admin_key: str) -> None:
    """A request refused with 503 because the pool had no connection in time counts
    in tokenledger_http_unavailable_responses_total under its route template."""
    tight = msgspec.structs.replace(config, pool_max_size=1, pool_acquire_timeout_seconds=0.2)
    app = create_app(tight)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://testserver.local",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c:
            async with app.state.ledger.pool.acquire():
                r = await c.get("/v1/accounts/employee:e-nobody")
                problem(r, 503, "unavailable")
            text = (await c.get("/metrics")).text
    labels = '{method="GET",route="/v1/accounts/{address}"}'
    assert gauge(text, "tokenledger_http_unavailable_responses_total", labels) == 1
