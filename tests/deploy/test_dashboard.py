"""The Grafana dashboard (deploy/grafana/dashboards/tokenledger.json) is a
well-formed dashboard that covers what issue 17 asks an operator to see.
(That every metric it reads exists is tests/api/test_ops_metrics.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


def panels() -> list[dict[str, Any]]:
    data = json.loads((DASHBOARD / "tokenledger.json").read_text())
    return [p for p in data["panels"] if p["type"] != "row"]


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, panels inside the 24-column grid, each query with an expression
    and the dashboard's data-source variable, a fixed uid for provisioning."""
    data = json.loads((DASHBOARD / "tokenledger.json").read_text())
    assert data["uid"] == "tokenledger"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "instance"}


def test_dashboard_covers_the_operators_questions() -> None:
    """Request rate, latency and errors by route, pool saturation, 503s, retries,
    chainer, sweeper, scheduler and outbox lag, credits granted, spent and expired,
    and overage each have a query."""
    exprs = "\n".join(t["expr"] for p in panels() for t in p["targets"])
    wanted = {
        "rate by route": "sum by (route) (rate(tokenledger_http_request_duration_seconds_count",
        "latency by route": "histogram_quantile(0.99, sum by (route, le)",
        "errors by route": 'status_class=~"4xx|5xx"',
        "pool saturation": "tokenledger_db_pool_connections_in_use{",
        "503s": "tokenledger_http_unavailable_responses_total",
        "retries": "tokenledger_db_retries_total",
        "chain lag": "tokenledger_chain_lag_seconds",
        "sweeper lag": "tokenledger_sweeper_lag_seconds",
        "scheduler lag": "tokenledger_scheduler_lag_seconds",
        "outbox lag": "tokenledger_outbox_lag_seconds",
        "granted": 'account="system:issuance"',
        "spent": 'account="system:usage"',
        "expired": 'account="system:expired"',
        "overage": "tokenledger_overage_credits_total",
    }
    missing = [topic for topic, needle in wanted.items() if needle not in exprs]
    assert missing == []
