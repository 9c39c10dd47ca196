"""`tokenledger import employees FILE.csv`: the CSV import from the command line (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]


def run(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    return subprocess.run(  # noqa: S603  # why: our own CLI, fixed arguments
        [sys.executable, "-m", "service", "import", "employees", *args]
        + ["--database-url", database_url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_imports_employees(
    db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    """The CLI imports good rows, reports bad ones by line, changes nothing on --dry-run, and a
    second run changes nothing."""
    await db.execute("INSERT INTO departments (id, name) VALUES ('eng', 'Eng')")
    path = tmp_path / "hires.csv"
    path.write_text(
        "id,name,email,department\n"
        "e-1,Ada,ada@example.com,eng\n"
        "e-2,Alan,bad-email,eng\n"
        "e-3,Grace,grace@example.com,ops\n"
    )
    dry = run(database_url, str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert await db.fetchval("SELECT count(*) FROM employees") == 0
    done = run(database_url, str(path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == json.loads(dry.stdout)
    assert (result["rows"], result["created"]) == (3, 1)
    assert [(r["line"], r["code"]) for r in result["rejected"]] == [
        (3, "invalid_request"),
        (4, "department_not_found"),
    ]
    assert await db.fetchval("SELECT status FROM accounts WHERE address = 'employee:e-1'") == "open"
    again = json.loads(run(database_url, str(path)).stdout)
    assert (again["created"], again["duplicate"]) == (0, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name,colour\n")
    failed = run(database_url, str(bad))
    assert failed.returncode == 2 and "unknown column" in failed.stderr
