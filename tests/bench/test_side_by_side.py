"""bench.side_by_side: two source trees served at once and loaded by wrk in
turns, at the smallest scale (two rounds of one-second turns, the same tree on
both sides, five wallets), for balance reads and for debits, against a database
of the session's test PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from bench import cpu, side_by_side

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def server_is_local(dsn: str) -> bool:
    """Whether a PostgreSQL process of this machine listens on the DSN's port."""
    port = urlsplit(dsn).port or 5432
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return (cpu.comm(c.pid) or "").startswith("postgres")
    return False


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
            "--b-env",
            "TOKENLEDGER_COALESCE_MAX_IN_FLIGHT=2",
        ]
    )
    # Side B ran with its own setting.
    assert result["A"]["env"] == {}  # type: ignore[index]
    assert result["B"]["env"] == {"TOKENLEDGER_COALESCE_MAX_IN_FLIGHT": "2"}  # type: ignore[index]
    for name in ("A", "B"):
        side = result[name]
        assert isinstance(side, dict)
        assert side["requests"] > 0
        assert side["service_cpu_us_per_request"] > 0
        # A server running here (local binaries, the embedded package) has its
        # backends found and measured; one in a container has none to find.
        if server_is_local(database_url):
            assert side["postgres_backend_cpu_us_per_request"] > 0
        else:
            assert side["postgres_backend_cpu_us_per_request"] is None
        assert len(side["requests_per_s_by_turn"]) == 2
