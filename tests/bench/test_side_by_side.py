"""bench.side_by_side: two source trees served at once and loaded by wrk in
turns, at the smallest scale (two rounds of one-second turns, the same tree on
both sides, five wallets), for balance reads and for debits, against a database of the session's test PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import side_by_side

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["read", "debit"])
def test_side_by_side_reports_both_versions(database_url: str, kind: str) -> None:
    """Both sides answered (every answer 2xx, or the tool exits) and were measured."""
    result = side_by_side.main(
        [
            "--database-url",
            database_url,
            "--kind",
            kind,
            "--wallets",
            "5",
            "--a",
            str(REPO),
            "--b",
            str(REPO),
            "--rounds",
            "2",
            "--seconds",
            "1",
            "--connections",
            "4",
        ]
    )
    for name in ("A", "B"):
        side = result[name]
        assert isinstance(side, dict)
        assert side["requests"] > 0
        assert side["service_cpu_us_per_request"] > 0
        assert len(side["requests_per_s_by_turn"]) == 2
