"""Schemathesis against the served OpenAPI schema of a real service process.

The schema is the contract (issue 11): every request it allows must be
accepted, every request it forbids refused, and every answer must be one it
documents. This runs `python -m service` on a database of its own, seeds an
employee, a price, a grant, a reservation and a grant program (so that the
stateful phase reaches real objects), then runs

    schemathesis run <url>/schema/openapi.json --checks all -H "Authorization: Bearer <admin>"

`make check` runs it at length (`python -m tests.served_schema`);
tests/api/test_served_schema.py runs a short version in CI. Arguments after
the script's own are passed to schemathesis, e.g.
`python -m tests.served_schema --max-examples 50 --phases fuzzing`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.postgres import dsn_for
from bench.process import Service

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


async def seed(base_url: str, admin_key: str) -> dict[str, str]:
    """One of each object the API serves, so that links and path parameters
    in the stateful phase can reach something real. Returns their ids."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, trust_env=False) as c:

        async def call(method: str, path: str, body: object, *statuses: int) -> dict[str, object]:
            extra = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
            r = await c.request(method, path, json=body, headers=extra)
            if r.status_code not in statuses:
                raise RuntimeError(f"seeding: {method} {path} answered {r.status_code}: {r.text}")
            result: dict[str, object] = r.json()
            return result

        await call("PUT", "/v1/departments/eng", {"name": "Engineering"}, 200, 201)
        await call(
            "PUT",
            "/v1/employees/e-1042",
            {"name": "Ada", "email": "ada@example.com", "department": "eng"},
            200,
            201,
        )
        price = await call(
            "POST",
            "/v1/prices",
            {
                "model": "gpt-4o",
                "effective_from": "2026-01-01T00:00:00Z",
                "input_per_mtok": 2_500_000,
                "cached_input_per_mtok": 1_250_000,
                "output_per_mtok": 10_000_000,
            },
            201,
        )
        grant = await call(
            "POST",
            "/v1/grants",
            {"employee": "e-1042", "amount": 1_000_000_000, "reason": "spot_bonus"},
            201,
        )
        reservation = await call(
            "POST", "/v1/reservations", {"account": "employee:e-1042", "amount": 1000}, 201
        )
        today = datetime.now(UTC).date()
        await call(
            "PUT",
            "/v1/grant-programs/monthly",
            {
                "amount": 1000,
                "reason": "monthly_allotment",
                "cadence": {"every": "month", "day": 1},
                "audience": {"all": True},
                "expiry": {"at": "end_of_cycle"},
                "starts_on": today.replace(day=1).isoformat(),
                "active": True,
            },
            200,
            201,
        )
    return {
        "price": str(price["id"]),
        "lot": str(grant["lot"]["id"]),  # type: ignore[index]
        "reservation": str(reservation["id"]),
    }


def schemathesis_command(base_url: str, admin_key: str, args: list[str]) -> list[str]:
    return [
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        f"{base_url}/schema/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {admin_key}",
        # One worker: with two threads, hypothesis's description of the
        # lambdas behind a free-form schema (usage:batch items) parses source
        # concurrently and CPython 3.11's AST parser then fails at random
        # ("AST constructor recursion depth mismatch"), a runtime error of
        # the run rather than a finding.
        "--workers",
        "1",
        *args,
    ]


async def run(
    database_url: str, args: list[str], log_dir: Path
) -> subprocess.CompletedProcess[str]:
    """Start the service on database_url, seed it, run schemathesis with
    `args`; its output is in the result (the service's log in log_dir)."""
    service = Service(
        database_url,
        log_dir / "service.log",
        # The harness sets rate limits no run reaches; the sweeper would only
        # race the stateful phase's reservations.
        extra_env={
            "TOKENLEDGER_BACKGROUND_ENABLED": "0",
            # Webhooks can be made (a URL that does not resolve here answers 400).
            "TOKENLEDGER_WEBHOOK_SECRET_KEY": "dGVzdC13ZWJob29rLWtleS0wMTIzNDU2Nzg5YWJjZGU=",
        },
    )
    service.start()
    try:
        await service.wait_ready()
        await seed(service.base_url, service.admin_key)
        command = schemathesis_command(service.base_url, service.admin_key, args)
        env = dict(os.environ, SCHEMATHESIS_HOOKS=str(HOOKS), NO_COLOR="1")
        result = await asyncio.to_thread(
            subprocess.run,  # noqa: S603  # why: our own interpreter's schemathesis, our arguments
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=log_dir,
            check=False,
        )
    finally:
        service.stop()
    # A 500 is a bug: its traceback is in the service's log, which goes with log_dir.
    errors = [line for line in service.log_text().splitlines() if "unhandled_error" in line]
    if errors:
        result.stderr += "\nthe service's unhandled errors:\n" + "\n".join(
            e[-700:] for e in errors[:5]
        )
    return result


async def main_async(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TEST_DATABASE_URL"),
        help="a server's admin DSN (default: a throwaway server from tests/pg.py)",
    )
    own, rest = parser.parse_known_args(argv)
    from tests.pg import start_server

    server = None
    admin_dsn = own.database_url
    if admin_dsn is None:
        server = await asyncio.to_thread(start_server)
        admin_dsn = server.dsn
    import asyncpg

    name = f"served_schema_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        with tempfile.TemporaryDirectory(prefix="served-schema-") as tmp:
            result = await run(dsn_for(admin_dsn, name), rest, Path(tmp))
        print(result.stdout)
        print(result.stderr, file=sys.stderr)
        return result.returncode
    finally:
        conn = await asyncpg.connect(admin_dsn, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main_async(sys.argv[1:])))
