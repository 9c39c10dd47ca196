"""The README's walk-through, run exactly as written (the ```sh walkthrough
blocks, in order) against a running service on a real PostgreSQL, so the
README and the service stay in step. Its dates are relative to today, so it
keeps working in any year."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Prepended to the blocks: stop at the first failing command, and make curl
# fail on an HTTP error (the README's curl -s would print the problem and go
# on). Everything after it is the README's text, unchanged.
PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --max-time 30 "$@"; echo; }
"""


def walkthrough_blocks() -> list[str]:
    blocks = re.findall(r"^```sh walkthrough\n(.*?)^```$", README.read_text(), re.M | re.S)
    assert blocks, "README.md has no ```sh walkthrough block"
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_walkthrough_has_no_fixed_dates() -> None:
    """No walk-through line names a calendar date: they are computed from today."""
    for block in walkthrough_blocks():
        assert not re.search(r"\b20\d\d-\d\d-\d\d", block), block


def test_readme_walkthrough_runs_as_written(database_url: str, tmp_path: Path) -> None:
    """Started like `make run` (development mode, admin key in .data/admin-key), the
    service answers every command of the walk-through without an error, the repeated
    debit is replayed, and the wallet ends with 48,800 credits expiring in 90 days."""
    assert shutil.which("curl"), "curl is missing"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    env.pop("DATABASE_URL", None)
    env.update(
        DATABASE_URL=database_url,
        TOKENLEDGER_ENVIRONMENT="development",
        TOKENLEDGER_PORT=str(port),
        TOKENLEDGER_WORKERS="1",
        TOKENLEDGER_APPLY_SCHEMA="false",  # the test database has it
        TOKENLEDGER_LOG_LEVEL="warning",
        TOKENLEDGER_URL=url,
    )
    log = (tmp_path / "service.log").open("w")
    service = subprocess.Popen(  # noqa: S603  # why: this interpreter running the service
        [sys.executable, "-m", "service"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert service.poll() is None, (tmp_path / "service.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "service.log").read_text()
            time.sleep(0.2)
        script = PRELUDE + "\n".join(walkthrough_blocks())
        bash = shutil.which("bash")
        assert bash, "bash is missing"
        done = subprocess.run(  # noqa: S603  # why: bash running the README's own commands
            [bash, "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert re.search(r"^idempotent-replayed: true", done.stdout, re.I | re.M), done.stdout

        key = (tmp_path / ".data" / "admin-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        account = httpx.get(f"{url}/v1/accounts/employee:e-1042", headers=headers).json()
        assert account["posted"] == 48_800, account
        assert account["available"] == 48_800, account
        lots = httpx.get(f"{url}/v1/accounts/employee:e-1042/lots", headers=headers)
        assert lots.status_code == 200, lots.text
        (lot,) = lots.json()["items"]
        expires = datetime.fromisoformat(lot["expires_at"].replace("Z", "+00:00"))
        assert abs(expires - (datetime.now(UTC) + timedelta(days=90))) < timedelta(hours=1)
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=10)
        log.close()
