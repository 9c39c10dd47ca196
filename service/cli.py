"""The `tokenledger` command (also `python -m service`).

tokenledger [serve]        run the HTTP service (the default)
tokenledger audit          check the ledger invariants; exit 1 naming the first violation
tokenledger apply-schema   apply schema.sql to DATABASE_URL
tokenledger sweep          write due expiry transactions once, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from service import db
from service.audit import run_audit
from service.config import Config


def _database_url(args: argparse.Namespace, config: Config) -> str:
    url = getattr(args, "database_url", None) or config.database_url
    if not url:
        sys.exit("tokenledger: DATABASE_URL is not set (or pass --database-url)")
    return url


def serve(config: Config) -> int:
    import uvicorn

    from service.app import create_app
    from service.observability import configure_logging

    configure_logging(config.log_format, config.log_level)
    stop_embedded: Callable[[], None] | None = None
    if not config.database_url:
        from service.devdb import start_embedded

        print(
            "DATABASE_URL is unset: starting the embedded PostgreSQL in",
            config.data_dir,
            flush=True,
        )
        dsn, stop_embedded = start_embedded(Path(config.data_dir))
        config = _replace(config, database_url=dsn)
    try:
        app = create_app(config)
        base = f"http://{config.host}:{config.port}"
        print(
            f"tokenledger {base}/v1  docs {base}/schema  openapi {base}/schema/openapi.json",
            flush=True,
        )
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=10,
        )
    finally:
        if stop_embedded is not None:
            print("stopping the embedded PostgreSQL", flush=True)
            stop_embedded()
    return 0


def _replace(config: Config, **changes: object) -> Config:
    import msgspec

    return msgspec.structs.replace(config, **changes)


async def _audit(url: str) -> int:
    conn = await db.connect(url)
    try:
        violations = await run_audit(conn)
    finally:
        await conn.close()
    if violations:
        for violation in violations:
            print(f"FAIL {violation}")
        return 1
    print("ok: invariants 1, 2, 3, 4 and 7 hold")
    return 0


async def _apply_schema(url: str) -> int:
    conn = await db.connect(url)
    try:
        await db.apply_schema(conn)
        version = await db.schema_version(conn)
    finally:
        await conn.close()
    print(f"schema at version {version}")
    return 0


async def _sweep(url: str) -> int:
    conn = await db.connect(url)
    try:
        total = 0
        while True:
            result = await conn.fetchval(
                db.load_queries()["sweep_expired"], 1000, {"actor": "system:sweeper"}
            )
            total += int(result["credits"])
            if int(result["accounts"]) == 0:
                break
    finally:
        await conn.close()
    print(f"expired {total} credits")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP service (default)")
    for name, help_text in (
        ("audit", "check the ledger invariants"),
        ("apply-schema", "apply schema.sql"),
        ("sweep", "write due expiry transactions once"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--database-url", help="defaults to DATABASE_URL")
    args = parser.parse_args(argv)
    config = Config.from_env()
    command = args.command or "serve"
    if command == "serve":
        return serve(config)
    url = _database_url(args, config)
    if command == "audit":
        return asyncio.run(_audit(url))
    if command == "apply-schema":
        return asyncio.run(_apply_schema(url))
    if command == "sweep":
        return asyncio.run(_sweep(url))
    parser.error(f"unknown command {command}")
    return 2
