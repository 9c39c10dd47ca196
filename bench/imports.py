"""The CSV import benchmark: 50,000 employees and 50,000 grants through HTTP.

    python -m bench.imports [--rows N] [--database-url DSN] [--json PATH]

A database of its own (bench.harness.provision), schema.sql applied, 20
departments; then, through the app in-process over ASGI as an hr key:
POST /v1/imports/employees with N rows (a dry run, the real run, and the
same file again: every row a duplicate), then POST /v1/imports/grants with
one grant per employee (the real run and again). Each step's seconds, the
answer's counts, and the audit at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import print_summary, provision
from service import db, migrate
from service.app import create_app
from service.audit import run_audit
from service.auth import new_key
from service.config import Config

DEPARTMENTS = 20  # the departments the setup SQL creates


def employees_csv(rows: int) -> bytes:
    lines = ["id,name,email,department"]
    lines += [
        f"emp-{i},Employee {i},emp-{i}@example.com,dept-{i % DEPARTMENTS + 1}" for i in range(rows)
    ]
    return ("\n".join(lines) + "\n").encode()


def grants_csv(rows: int) -> bytes:
    lines = ["key,employee,amount,reason,expires_at"]
    lines += [f"hire-{i},emp-{i},5000,signing_bonus,2030-01-01T00:00:00Z" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    database = await provision(args.database_url, f"tokenledger_imports_{os.getpid()}")
    steps: list[dict[str, Any]] = []
    try:
        conn = await db.connect(database.dsn)
        try:
            await migrate.migrate(conn)
            await conn.execute(
                "INSERT INTO departments (id, name) SELECT 'dept-' || g, 'Department ' || g"
                " FROM generate_series(1, 20) g;"
                " INSERT INTO accounts (address, type, ref)"
                " SELECT 'department:' || id, 'department', id FROM departments"
            )
        finally:
            await conn.close()
        admin = new_key().secret
        config = Config(
            database_url=database.dsn,
            apply_schema=False,
            background_enabled=False,
            log_level="warning",
            environment="development",
            bootstrap_admin_key=admin,
            rate_limits="",
        )
        app = create_app(config)
        async with (
            app.lifespan(),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://bench.local",
                headers={"Authorization": f"Bearer {admin}", "Content-Type": "text/csv"},
                timeout=300,
            ) as client,
        ):
            plan = (
                ("employees dry run", "/v1/imports/employees?dry_run=true", employees_csv),
                ("employees", "/v1/imports/employees", employees_csv),
                ("employees again", "/v1/imports/employees", employees_csv),
                ("grants", "/v1/imports/grants", grants_csv),
                ("grants again", "/v1/imports/grants", grants_csv),
            )
            for name, path, make in plan:
                body = make(args.rows)
                started = time.perf_counter()
                r = await client.post(path, content=body)
                seconds = time.perf_counter() - started
                r.raise_for_status()
                answer = r.json()
                step = {
                    "step": name,
                    "seconds": round(seconds, 3),
                    "bytes": len(body),
                    **{k: answer[k] for k in ("rows", "created", "updated", "duplicate")},
                    "rejected": len(answer["rejected"]),
                }
                print(f"bench.imports: {step}", file=sys.stderr, flush=True)
                steps.append(step)
        conn = await db.connect(database.dsn)
        try:
            violations = [str(v) for v in await run_audit(conn)]
        finally:
            await conn.close()
    finally:
        await database.drop()
    return {"rows": args.rows, "steps": steps, "audit": violations or "clean"}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    summary = asyncio.run(main(args))
    print_summary(summary, args.json)


if __name__ == "__main__":
    cli()
