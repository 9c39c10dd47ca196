"""The grant-program benchmark: one cycle issued to N employees by the running service.

    python -m bench.programs [--employees N] [--database-url DSN] [--json PATH]

1. A database of its own (bench.postgres.provision: DATABASE_URL's server, or a
   throwaway one from service/devdb.py), and the real service as a subprocess
   (bench.process.Service, `python -m service`) with its background tasks
   off, so that only the runs we time issue anything.
2. N employees in one department, written set-based straight into the
   database (their onboarding is not what is measured).
3. Over HTTP, as admin:
   - `system`: a program for everyone funded by system:issuance; POST last
     month's run on the empty database (N grants), ANALYZE (what autovacuum
     does on a ledger that has been running), then this month's run (N
     grants) and the same run again (nothing new);
   - `department`: a program for the department funded by department:eng,
     which holds enough for half of them; the run issues N/2 and skips the
     rest for insufficient budget.
   Each run is one HTTP request and one SQL call; its wall time is measured
   at the client.
4. The invariant audit (`python -m service audit`) on the database.

The figures go to stdout as a table and as JSON (and to --json when given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.postgres import provision
from bench.process import Service, run_audit
from bench.report import run_side_bench
from service import db, migrate

AMOUNT = 1000

SETUP_SQL = """
INSERT INTO departments (id, name) VALUES ('eng', 'Engineering');
INSERT INTO accounts (address, type, ref) VALUES ('department:eng', 'department', 'eng');
INSERT INTO employees (id, name, email, department)
    SELECT 'e-' || lpad(g::text, 6, '0'), 'Employee ' || g, 'e' || g || '@example.com', 'eng'
    FROM generate_series(1, {employees}) g;
INSERT INTO accounts (address, type, ref)
    SELECT 'employee:' || id, 'employee', id FROM employees;
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def program(cycle_start: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": AMOUNT,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "audience": {"all": True},
        "expiry": {"at": "end_of_cycle"},
        "starts_on": cycle_start,
        "active": True,
    }
    body.update(overrides)
    return body


async def timed_run(client: httpx.AsyncClient, pid: str, cycle: str) -> dict[str, Any]:
    started = time.perf_counter()
    r = await client.post(f"/v1/grant-programs/{pid}/runs", json={"cycle": cycle})
    seconds = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"run {pid} {cycle}: {r.status_code} {r.text[:500]}")
    body = r.json()
    return {
        "program": pid,
        "seconds": round(seconds, 3),
        "issued": body["issued"],
        "credits": body["credits"],
        "skipped": body["skipped"],
    }


async def measure(base_url: str, admin_key: str, dsn: str, employees: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    cycle = now.strftime("%Y-%m")
    previous = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    results = []
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=600,
        trust_env=False,
    ) as client:
        r = await client.put(
            "/v1/grant-programs/everyone", json=program(f"{previous}-01", expiry=None)
        )
        assert r.status_code == 201, r.text
        cold = await timed_run(client, "everyone", previous)
        results.append({"scenario": "system-funded, empty database", **cold})
        # A ledger that has been running has statistics on its tables
        # (autovacuum's ANALYZE); an empty one plans for empty tables.
        conn = await db.connect(dsn)
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()
        first = await timed_run(client, "everyone", cycle)
        results.append({"scenario": "system-funded, analyzed database", **first})
        again = await timed_run(client, "everyone", cycle)
        results.append({"scenario": "system-funded, run again", **again})
        budget = AMOUNT * (employees // 2)
        r = await client.post(
            "/v1/transfers",
            json={"from": "system:issuance", "to": "department:eng", "amount": budget},
            headers={"Idempotency-Key": f"bench-fund-{time.time()}"},
        )
        assert r.status_code == 201, r.text
        r = await client.put(
            "/v1/grant-programs/eng",
            json=program(
                f"{cycle}-01", audience={"departments": ["eng"]}, funded_by="department:eng"
            ),
        )
        assert r.status_code == 201, r.text
        dept = await timed_run(client, "eng", cycle)
        results.append({"scenario": "department-funded, half the budget", **dept})
        r = await client.get("/v1/accounts/department:eng")
        dept_available = r.json()["available"]
    checks = {
        "cold_run_issued_all": cold["issued"] == employees,
        "first_run_issued_all": first["issued"] == employees
        and first["credits"] == employees * AMOUNT,
        "second_run_issued_none": again["issued"] == 0
        and again["skipped"] == {"already_granted": employees},
        "department_issued_half": dept["issued"] == employees // 2
        and dept["skipped"].get("insufficient_budget", 0) == employees - employees // 2,
        "department_not_below_zero": dept_available == budget - dept["credits"] >= 0,
    }
    results.append({"scenario": "checks", **checks})
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'scenario':<36} {'seconds':>8} {'issued':>7} {'credits':>10}  skipped"]
    for r in results:
        if r["scenario"] == "checks":
            continue
        lines.append(
            f"{r['scenario']:<36} {r['seconds']:>8} {r['issued']:>7} {r['credits']:>10}  "
            f"{json.dumps(r['skipped'])}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    database = await provision(args.database_url, f"tokenledger_programs_{os.getpid()}")
    service = None
    try:
        log(f"bench.programs: database {database.name} ({database.source})")
        conn = await db.connect(database.dsn)
        try:
            await migrate.migrate(conn)
            started = time.perf_counter()
            await conn.execute(SETUP_SQL.format(employees=int(args.employees)))
            await conn.execute("ANALYZE")
            setup_seconds = time.perf_counter() - started
        finally:
            await conn.close()
        log_path = Path(tempfile.mkdtemp(prefix="bench-programs-")) / "service.log"
        service = Service(
            database.dsn, log_path, extra_env={"TOKENLEDGER_BACKGROUND_ENABLED": "false"}
        )
        service.start()
        await service.wait_ready()
        results = await measure(service.base_url, service.admin_key, database.dsn, args.employees)
        service.stop()
        audit = await asyncio.to_thread(run_audit, database.dsn)
    finally:
        if service is not None:
            service.stop()
        await database.drop()
    checks = results[-1]
    passed = all(v for k, v in checks.items() if k != "scenario") and audit["passed"]
    return {
        "employees": args.employees,
        "amount": AMOUNT,
        "server_version": database.server_version,
        "setup_seconds": round(setup_seconds, 3),
        "results": results[:-1],
        "checks": {k: v for k, v in checks.items() if k != "scenario"},
        "audit": audit,
        "passed": passed,
    }


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--employees", type=int, default=10_000)
    summary = run_side_bench(parser, main, argv, table=table)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(cli())
