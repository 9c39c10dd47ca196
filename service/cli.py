"""The `tokenledger` command (also `python -m service`).

tokenledger [serve]        run the HTTP service (the default)
tokenledger audit          check the ledger invariants; exit 1 naming the first violation
                           (routine: what came after each check's checkpoint)
  --full                   check all history again, not only what came after the checkpoints
  --verify-chain           also verify the hash chain and print its head (README, Tamper evidence)
tokenledger apply-schema   apply schema.sql to DATABASE_URL
tokenledger sweep          write due expiry transactions once, then exit
tokenledger chain          append settled transactions to the hash chain once, then exit
tokenledger prices import FILE  add price versions from a LiteLLM-format price map
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from service import chain as hash_chain
from service import db, pricing
from service.audit import audit
from service.config import Config, env_var


def _database_url(args: argparse.Namespace, config: Config) -> str:
    url = getattr(args, "database_url", None) or config.database_url
    if not url:
        sys.exit("tokenledger: DATABASE_URL is not set (or pass --database-url)")
    return url


def _dev_admin_key(config: Config) -> Config:
    """`make run` on a developer machine: make sure there is an admin key and
    print it, so the first curl works. Kept in the data dir across restarts."""
    from service.auth import new_key

    if config.bootstrap_admin_key:
        key = config.bootstrap_admin_key
    else:
        path = Path(config.data_dir) / "admin-key"
        if path.exists():
            key = path.read_text().strip()
        else:
            key = new_key().secret
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(key + "\n")
            path.chmod(0o600)
    print(f"development admin key: {key}", flush=True)
    print(f"  curl -H 'Authorization: Bearer {key}' ...", flush=True)
    return _replace(config, bootstrap_admin_key=key)


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
        dsn, stop_embedded = start_embedded(Path(config.data_dir) / "pg")
        config = _replace(config, database_url=dsn)
    if config.environment == "development":
        config = _dev_admin_key(config)
    workers = config.workers or os.cpu_count() or 1
    try:
        base = f"http://{config.host}:{config.port}"
        print(
            f"tokenledger {base}/v1  docs {base}/schema  openapi {base}/schema/openapi.json"
            f"  ({workers} worker{'s' if workers > 1 else ''})",
            flush=True,
        )
        options: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "log_level": "warning",
            "access_log": False,
            "loop": "uvloop",
            "http": "httptools",
            "timeout_graceful_shutdown": 10,
        }
        if workers == 1:
            uvicorn.run(create_app(config), **options)
        else:
            # Worker processes build their app from the environment
            # (service.asgi), so what serve() decided goes there; the
            # schema is applied once, here, not by each worker.
            if config.apply_schema:
                asyncio.run(_apply_schema(config.database_url or ""))
            os.environ.update(
                {
                    env_var("database_url"): config.database_url or "",
                    env_var("bootstrap_admin_key"): config.bootstrap_admin_key or "",
                    env_var("environment"): config.environment,
                    env_var("apply_schema"): "false",
                }
            )
            uvicorn.run("service.asgi:app_from_env", factory=True, workers=workers, **options)
    finally:
        if stop_embedded is not None:
            print("stopping the embedded PostgreSQL", flush=True)
            stop_embedded()
    return 0


def _replace(config: Config, **changes: object) -> Config:
    import msgspec

    return msgspec.structs.replace(config, **changes)


async def _audit(
    url: str, config: Config, full: bool, chain_args: argparse.Namespace | None = None
) -> int:
    """`audit`: the invariant checks (routine: since each check's checkpoint;
    --full: everything), then the chain when asked."""
    conn = await db.connect(url)
    try:
        started = time.perf_counter()
        run = await audit(conn, full=full, settle_seconds=config.chain_settle_seconds)
        seconds = time.perf_counter() - started
        chain_lines = (
            await _verify_chain(conn, chain_args, full, config.chain_settle_seconds)
            if chain_args
            else []
        )
    finally:
        await conn.close()
    if run.violations:
        for violation in run.violations:
            print(f"FAIL {violation}")
    else:
        print("ok: invariants 1 to 8 hold")
    checked = (
        "in full"
        if not run.since
        else f"{len(run.full)} in full, {len(run.since)} since checkpoints"
    )
    print(f"checked {len(run.full) + len(run.since)} invariants {checked} in {seconds:.2f}s")
    if run.since:
        print(f"routine: transactions created since {min(run.since.values())} up to {run.cutoff}")
    for line in chain_lines:
        print(line)
    failed = bool(run.violations) or any(line.startswith("FAIL") for line in chain_lines)
    return 1 if failed else 0


async def _verify_chain(
    conn: asyncpg.Connection, args: argparse.Namespace, full: bool, settle_seconds: float
) -> list[str]:
    """`audit --verify-chain`: verify (never append) from the last verified
    row (all of it with --full), record that row, then print the head to anchor."""
    since: tuple[int, bytes] | None = None
    if not full:
        row = await conn.fetchrow(db.load_queries()["chain_row_verified"])
        if row is not None:
            since = (int(row["chain_seq"]), bytes(row["chain_hash"]))
    started = time.perf_counter()
    problem, verified = await hash_chain.verify_chain_since(
        conn,
        since,
        max_lag_seconds=args.max_lag_seconds,
        anchors=args.anchor or (),
        settle_seconds=settle_seconds,
    )
    seconds = time.perf_counter() - started
    if problem is None and verified is not None:
        await conn.execute(db.load_queries()["audit_chain_checkpoint_save"], *verified)
    head = await hash_chain.head(conn)
    count, oldest = await hash_chain.pending(conn)
    lines = [f"FAIL chain: {problem}" if problem else "ok: the hash chain verifies"]
    start = f"from seq {since[0] + 1}" if since else "from seq 1"
    lines.append(f"chain verified {start} in {seconds:.2f}s")
    lines.append(f"chain head: {head}" if head else "chain head: none (nothing chained yet)")
    if count:
        assert oldest is not None
        lines.append(f"not chained yet: {count} transactions, the oldest created at {oldest}")
    return lines


def _anchor(value: str) -> tuple[int, bytes]:
    """SEQ:HEX, a chain head recorded earlier (from the logs or a previous audit)."""
    seq, _, digest = value.partition(":")
    try:
        anchor = (int(seq), bytes.fromhex(digest))
    except ValueError:
        anchor = (0, b"")
    if anchor[0] < 1 or len(anchor[1]) != 32:
        raise argparse.ArgumentTypeError(f"expected SEQ:SHA256HEX, got {value!r}")
    return anchor


async def _chain(url: str, config: Config, everything: bool) -> int:
    conn = await db.connect(url)
    try:
        appended = await hash_chain.append_pending(
            conn,
            batch_size=config.chain_batch_size,
            settle_seconds=config.chain_settle_seconds,
            everything=everything,
        )
        head = await hash_chain.head(conn)
    finally:
        await conn.close()
    print(f"chained {appended} transactions; head {head if head else 'none'}")
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


async def _keys(url: str, args: argparse.Namespace) -> int:
    from service.auth import new_key

    conn = await db.connect(url)
    queries = db.load_queries()
    try:
        if args.keys_command == "create":
            key = new_key()
            row = await conn.fetchrow(
                queries["create_key"],
                key.id,
                key.prefix,
                key.secret_hash,
                args.name,
                args.role,
                args.created_by,
            )
            assert row is not None
            print(f"created key {row['id']} ({row['name']}, role {row['role']})", file=sys.stderr)
            print("the secret is shown once; store it now:", file=sys.stderr)
            print(key.secret)
        elif args.keys_command == "list":
            for r in await conn.fetch(queries["list_keys"]):
                state = f"revoked {r['revoked_at']:%Y-%m-%d}" if r["revoked_at"] else "active"
                used = f"{r['last_used_at']:%Y-%m-%d %H:%M}" if r["last_used_at"] else "never"
                key_id = f"{r['id']}  tlk_{r['prefix']}_…"
                print(f"{key_id}  {r['role']:8} {state:18} used {used:16} {r['name']}")
        elif args.keys_command == "revoke":
            row = await conn.fetchrow(queries["revoke_key"], args.key)
            if row is None:
                print(f"no key {args.key}", file=sys.stderr)
                return 1
            print(f"revoked {row['id']} ({row['name']}) at {row['revoked_at']}")
    finally:
        await conn.close()
    return 0


def _import_prices(url: str, args: argparse.Namespace, config: Config) -> int:
    """`prices import`: a version for each model whose rates differ from the
    version in effect at the import's instant (now, or --effective-from), all
    in one database transaction; an unchanged model adds nothing."""
    from decimal import Decimal

    path = Path(args.file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except (OSError, ValueError) as exc:
        print(f"tokenledger: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"tokenledger: {path} is not a JSON object of models", file=sys.stderr)
        return 2
    credits_per_usd = args.credits_per_usd or config.credits_per_usd
    parsed = pricing.rates_from_litellm(data, credits_per_usd)
    when = args.effective_from or datetime.now(UTC)
    source = f"import:{path.name}"[:200]
    return asyncio.run(_add_prices(url, parsed, when, source, credits_per_usd))


async def _add_prices(
    url: str, parsed: pricing.LiteLLMRates, when: datetime, source: str, credits_per_usd: int
) -> int:
    queries = db.load_queries()
    added: list[str] = []
    unchanged: list[str] = []
    conn = await db.connect(url)
    try:
        async with conn.transaction():
            for model in sorted(parsed.rates):
                rates = parsed.rates[model]
                current = await conn.fetchrow(queries["price_at"], model, when)
                assert current is not None
                if current["id"] is not None and (
                    current["input_per_mtok"],
                    current["cached_input_per_mtok"],
                    current["output_per_mtok"],
                ) == (rates.input_per_mtok, rates.cached_input_per_mtok, rates.output_per_mtok):
                    unchanged.append(model)
                    continue
                price = await conn.fetchval(
                    queries["add_price"],
                    {
                        "model": model,
                        "tier": current["tier"] or "standard",
                        "effective_from": when.isoformat(),
                        "input_per_mtok": rates.input_per_mtok,
                        "cached_input_per_mtok": rates.cached_input_per_mtok,
                        "output_per_mtok": rates.output_per_mtok,
                        "source": source,
                    },
                    {"actor": "cli:prices-import"},
                )
                added.append(
                    f"added {model} {price['id']}: input {rates.input_per_mtok}, cached input "
                    f"{rates.cached_input_per_mtok}, output {rates.output_per_mtok} credits/Mtok "
                    f"from {price['effective_from']}"
                )
    except asyncpg.PostgresError as exc:
        # Nothing was added: the whole import is one transaction.
        print(
            f"tokenledger: import failed, nothing added: {exc} {exc.detail or ''}", file=sys.stderr
        )
        return 1
    finally:
        await conn.close()
    for line in added:
        print(line)
    for model in unchanged:
        print(f"unchanged {model}")
    for model, reason in sorted(parsed.skipped.items()):
        print(f"skipped {model}: {reason}")
    print(
        f"{len(added)} added, {len(unchanged)} unchanged, {len(parsed.skipped)} skipped "
        f"({credits_per_usd} credits per USD)"
    )
    return 0


def _timestamp(value: str) -> datetime:
    """An RFC 3339 instant with its offset (--effective-from)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"expected an RFC 3339 time with offset, got {value!r}")
    return parsed


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


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
        ("chain", "append settled transactions to the hash chain once"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--database-url", help="defaults to DATABASE_URL")
    audit_parser = sub.choices["audit"]
    audit_parser.add_argument(
        "--full",
        action="store_true",
        help="check all history, not only what came after the audit's checkpoints",
    )
    audit_parser.add_argument(
        "--verify-chain",
        action="store_true",
        help="also recompute the hash chain (appends nothing) and print its head",
    )
    audit_parser.add_argument(
        "--max-lag-seconds",
        type=float,
        default=None,
        help="fail when a transaction this much older than the newest one is not chained "
        "(default: TOKENLEDGER_CHAIN_SETTLE_SECONDS + 300)",
    )
    audit_parser.add_argument(
        "--anchor",
        type=_anchor,
        action="append",
        metavar="SEQ:SHA256",
        help="a chain head recorded earlier that must still be in the chain (repeatable)",
    )
    sub.choices["chain"].add_argument(
        "--all",
        action="store_true",
        help="also append stragglers from any depth of history (check them first)",
    )
    keys = sub.add_parser("keys", help="manage service keys")
    url_arg = argparse.ArgumentParser(add_help=False)
    url_arg.add_argument("--database-url", help="defaults to DATABASE_URL")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", parents=[url_arg], help="create a key and print its secret once"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=["admin", "hr", "finance", "meter"])
    create.add_argument("--created-by", default=None, help="who asked for it (recorded)")
    keys_sub.add_parser("list", parents=[url_arg], help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", parents=[url_arg], help="revoke a key by id or prefix")
    revoke.add_argument("key")
    prices = sub.add_parser("prices", help="manage model prices")
    prices_sub = prices.add_subparsers(dest="prices_command", required=True)
    price_import = prices_sub.add_parser(
        "import",
        parents=[url_arg],
        help="add versions from a LiteLLM model_prices_and_context_window.json-format file",
    )
    price_import.add_argument("file", help="the price map (see deploy/prices.example.json)")
    price_import.add_argument(
        "--credits-per-usd",
        type=_positive_int,
        default=None,
        help="conversion rate (default TOKENLEDGER_CREDITS_PER_USD, else 1000000)",
    )
    price_import.add_argument(
        "--effective-from",
        type=_timestamp,
        default=None,
        help="RFC 3339 instant the changed prices take effect (default now)",
    )
    args = parser.parse_args(argv)
    config = Config.from_env()
    command = args.command or "serve"
    if command == "serve":
        return serve(config)
    url = _database_url(args, config)
    if command == "audit":
        if not args.verify_chain:
            return asyncio.run(_audit(url, config, args.full))
        if args.max_lag_seconds is None:
            args.max_lag_seconds = config.chain_settle_seconds + 300
        return asyncio.run(_audit(url, config, args.full, args))
    if command == "apply-schema":
        return asyncio.run(_apply_schema(url))
    if command == "sweep":
        return asyncio.run(_sweep(url))
    if command == "chain":
        return asyncio.run(_chain(url, config, args.all))
    if command == "keys":
        return asyncio.run(_keys(url, args))
    if command == "prices":
        return _import_prices(url, args, config)
    parser.error(f"unknown command {command}")
    return 2
