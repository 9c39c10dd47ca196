"""The `tokenledger` command (also `python -m service`).

tokenledger [serve]        run the HTTP service (the default)
tokenledger audit          check the ledger invariants; exit 1 naming the first violation
                           (routine: what came after each check's checkpoint)
  --full                   check all history again, not only what came after the checkpoints
  --verify-chain           also verify the hash chain and print its head (README, Tamper evidence)
tokenledger migrate        bring the database to this release (pending migrations, then schema.sql)
  --check                  change nothing; exit 0 when current, 1 when behind (a readiness gate)
tokenledger sweep          write due expiry transactions once, then exit
tokenledger chain          append settled transactions to the hash chain once, then exit
tokenledger prices import FILE  add price versions from a LiteLLM-format price map
tokenledger import employees FILE.csv  create or update employees from a CSV (progress bar)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from service import chain as hash_chain
from service import db, migrate, pricing
from service.audit import audit
from service.config import Config, deprecated_in, env_var


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


def _dev_employee_tokens(config: Config) -> Config:
    """`make run`: when no employee-token verification is configured, verify
    HS256 tokens with a secret kept in the data dir, so that the development
    sign-in (/dev/sign-in, README, Web pages) can mint tokens the API accepts,
    for employees and the finance and hr roles. Development only."""
    import secrets

    assert config.environment == "development"
    if config.jwt_issuer or config.jwt_audience or config.jwt_hs256_secret:
        return config
    if config.jwt_jwks_file or config.jwt_public_key_file:
        return config
    path = Path(config.data_dir) / "dev-jwt-secret"
    if path.exists():
        secret = path.read_text().strip()
    else:
        secret = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secret + "\n")
        path.chmod(0o600)
    return _replace(
        config,
        jwt_issuer="tokenledger-dev",
        jwt_audience="tokenledger",
        jwt_hs256_secret=secret,
        jwt_allowed_roles="employee,finance,hr",
    )


def warn_deprecated(environ: Mapping[str, str]) -> None:
    """A warning at start for each former setting name still in use."""
    import structlog

    for old, new in deprecated_in(environ):
        structlog.get_logger("tokenledger.config").warning(
            "deprecated_setting", setting=old, use=new
        )


def serve(config: Config) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP, then stop gracefully and exit 0
    (service/serving.py); the embedded PostgreSQL, if this started one, is
    stopped last, whichever way serving ended."""
    import uvicorn

    from service import serving
    from service.app import create_app
    from service.observability import configure_logging

    configure_logging(config.log_format, config.log_level)
    warn_deprecated(os.environ)
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
    try:
        if config.environment == "development":
            config = _dev_admin_key(config)
            config = _dev_employee_tokens(config)
        workers = config.workers or os.cpu_count() or 1
        base = f"http://{config.host}:{config.port}"
        print(
            f"tokenledger {base}/v1  docs {base}/schema  openapi {base}/schema/openapi.json"
            f"  ({workers} worker{'s' if workers > 1 else ''})",
            flush=True,
        )
        sign_in = "/dev/sign-in" if config.environment == "development" else "/sign-in"
        print(f"pages {base}/wallet  {base}/finance  sign in {base}{sign_in}", flush=True)
        options: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "log_level": "warning",
            "access_log": False,
            "loop": "uvloop",
            "http": "httptools",
            # Requests in flight at a stop get this long to finish.
            "timeout_graceful_shutdown": config.shutdown_grace_seconds,
        }
        if workers == 1:
            server_config = uvicorn.Config(create_app(config), **options)
        else:
            # Worker processes build their app from the environment
            # (service.asgi), so what serve() decided goes there; the
            # schema is migrated once, here, not by each worker.
            if config.apply_schema and asyncio.run(
                _migrate(config.database_direct_url or config.database_url or "", check=False)
            ):
                return 2
            os.environ.update(
                {
                    env_var("database_url"): config.database_url or "",
                    env_var("bootstrap_admin_key"): config.bootstrap_admin_key or "",
                    env_var("environment"): config.environment,
                    env_var("apply_schema"): "false",
                }
            )
            # The development employee-token settings, when serve() chose them.
            os.environ.update(
                {
                    env_var(name): str(getattr(config, name))
                    for name in (
                        "jwt_issuer",
                        "jwt_audience",
                        "jwt_hs256_secret",
                        "jwt_allowed_roles",
                    )
                    if getattr(config, name)
                }
            )
            server_config = uvicorn.Config(
                "service.asgi:app_from_env", factory=True, workers=workers, **options
            )
        started = serving.run(server_config)
    finally:
        if stop_embedded is not None:
            # Before anything is printed: after a closed terminal (SIGHUP)
            # writing to it fails.
            stop_embedded()
            _say("stopped the embedded PostgreSQL")
    return 0 if started else 3


def _say(line: str) -> None:
    """Print, unless the terminal is gone."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


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


async def _migrate(url: str, *, check: bool, reapply: bool = False) -> int:
    """`tokenledger migrate [--check]`: exit 0 when the database is current
    (after migrating, or as found), 1 when --check finds it behind, 2 when
    this release cannot migrate it (printed why)."""
    conn = await db.connect(url)
    try:
        if check:
            state = await migrate.status(conn)
        else:
            report = await migrate.migrate(conn, reapply=reapply)
            for step in report.applied:
                print(f"applied {step}")
            state = await migrate.status(conn)
    except migrate.MigrationError as exc:
        print(f"tokenledger migrate: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    for m in state.pending:
        print(f"pending {m.version:04d}_{m.name}")
    if not state.schema_applied:
        print("pending schema.sql (this release's content not applied)")
    where = "empty" if state.version is None else f"at migration {state.version}"
    if state.ahead:
        where += f" (ahead of this release's {migrate.latest_version()})"
    print(f"database {where}: {'current' if state.current else 'behind'}")
    return 0 if state.current else 1


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


def _scope(values: list[str] | None) -> str:
    return "any" if values is None else ",".join(values) or "none"


def _scope_list(text: str) -> list[str]:
    """A comma list for a key scope; "" allows nothing."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _account_types(text: str) -> list[str]:
    kinds = _scope_list(text)
    unknown = set(kinds) - {"employee", "department"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown account types {sorted(unknown)}")
    return kinds


def _rate_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"a rate limit is a positive number of credits, not {text!r}"
        )
    return value


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
            if args.sources is not None or args.account_types is not None:
                await conn.fetchrow(
                    queries["set_key_scopes"], str(key.id), args.sources, args.account_types
                )
            if args.departments is not None or args.rate_limit is not None:
                await conn.fetchrow(
                    queries["set_key_limits"], str(key.id), args.departments, args.rate_limit
                )
            print(f"created key {row['id']} ({row['name']}, role {row['role']})", file=sys.stderr)
            print("the secret is shown once; store it now:", file=sys.stderr)
            print(key.secret)
        elif args.keys_command == "list":
            for r in await conn.fetch(queries["list_keys"]):
                state = f"revoked {r['revoked_at']:%Y-%m-%d}" if r["revoked_at"] else "active"
                used = f"{r['last_used_at']:%Y-%m-%d %H:%M}" if r["last_used_at"] else "never"
                key_id = f"{r['id']}  tlk_{r['prefix']}_…"
                print(f"{key_id}  {r['role']:8} {state:18} used {used:16} {r['name']}")
        elif args.keys_command == "scope":
            async with conn.transaction():
                row = await conn.fetchrow(
                    queries["set_key_scopes"], args.key, args.sources, args.account_types
                )
                limits = await conn.fetchrow(
                    queries["set_key_limits"], args.key, args.departments, args.rate_limit
                )
            if row is None or limits is None:
                print(f"no active key {args.key}", file=sys.stderr)
                return 1
            rate = "any" if limits["rate_limit"] is None else f"{limits['rate_limit']}/min"
            print(
                f"{row['id']} ({row['name']}): sources {_scope(row['sources'])}, "
                f"account types {_scope(row['account_types'])}, "
                f"departments {_scope(limits['departments'])}, credits {rate}"
            )
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


# Rows per database transaction of `tokenledger import employees`: each chunk
# commits on its own, so the progress bar moves and a stopped import is
# completed by running it again (rows are idempotent by employee id).
IMPORT_CHUNK_ROWS = 5000


def _import_employees(url: str, args: argparse.Namespace, config: Config) -> int:
    """`import employees FILE.csv`: the same rows and rules as POST
    /v1/imports/employees, straight to the database, in chunks with a progress
    bar. --dry-run runs every chunk in one transaction that is rolled back."""
    from service import imports
    from service.errors import InvalidRequest

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"tokenledger: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    try:
        parsed = imports.parse(text, imports.EmployeeRow, max(config.import_max_rows, 10**7))
    except InvalidRequest as exc:
        print(f"tokenledger: {path}: {exc.detail}", file=sys.stderr)
        return 2
    rows = imports.employee_rows(parsed)
    result = asyncio.run(_run_employee_import(url, rows, parsed.rows, args.dry_run))
    print(json.dumps(imports.summary(parsed, result), indent=2))
    return 0


async def _run_employee_import(
    url: str, rows: list[dict[str, Any]], total: int, dry_run: bool
) -> dict[str, Any]:
    from rich.progress import Progress

    from service import imports

    sql = db.load_queries()["import_employees"]
    ctx = {"actor": "cli:import", "request_id": None, "now": None, "admin": True}
    parts: list[dict[str, Any]] = []
    conn = await db.connect(url)
    try:
        outer = conn.transaction()
        if dry_run:
            await outer.start()
        with Progress(transient=not sys.stderr.isatty()) as progress:
            task = progress.add_task("importing employees", total=total)
            progress.update(task, advance=total - len(rows))  # format rejections
            for chunk in imports.chunks(rows, IMPORT_CHUNK_ROWS):
                async with conn.transaction():
                    parts.append(await conn.fetchval(sql, chunk, ctx))
                progress.update(task, advance=len(chunk))
        if dry_run:
            await outer.rollback()
    finally:
        await conn.close()
    return imports.merge(*parts)


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
        ("migrate", "bring the database schema to this release"),
        ("apply-schema", "the same as migrate (its former name)"),
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
    sub.choices["migrate"].add_argument(
        "--check",
        action="store_true",
        help="change nothing: exit 0 when current, 1 when migrations or schema.sql are pending",
    )
    sub.choices["migrate"].add_argument(
        "--reapply",
        action="store_true",
        help="apply schema.sql even if this content was applied before",
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
    scopes = argparse.ArgumentParser(add_help=False)
    scopes.add_argument(
        "--sources", type=_scope_list, default=None, help="usage sources it may send (comma list)"
    )
    scopes.add_argument(
        "--account-types",
        type=_account_types,
        default=None,
        help="account types it may charge: employee, department (comma list)",
    )
    scopes.add_argument(
        "--departments",
        type=_scope_list,
        default=None,
        help="departments whose accounts it may charge: their employees' wallets and the"
        " department accounts (comma list)",
    )
    scopes.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=None,
        help="most credits it may spend per minute (debits, reservations, usage)",
    )
    create = keys_sub.add_parser(
        "create", parents=[url_arg, scopes], help="create a key and print its secret once"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=["admin", "hr", "finance", "meter"])
    create.add_argument("--created-by", default=None, help="who asked for it (recorded)")
    keys_sub.add_parser(
        "scope",
        parents=[url_arg, scopes],
        help="set a key's scopes (an omitted scope becomes unrestricted)",
    ).add_argument("key")
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
    importer = sub.add_parser("import", help="bulk imports from CSV")
    import_sub = importer.add_subparsers(dest="import_command", required=True)
    import_employees = import_sub.add_parser(
        "employees",
        parents=[url_arg],
        help="create or update employees from a CSV (id,name,email,department)",
    )
    import_employees.add_argument("file", help="the CSV file, with a header row")
    import_employees.add_argument(
        "--dry-run", action="store_true", help="report what would happen; change nothing"
    )
    args = parser.parse_args(argv)
    config = Config.from_env()
    # Commands run several statements outside a transaction: behind
    # pgbouncer none may rely on a prepared statement kept between them.
    db.connect_statement_cache_size = config.statement_cache_size()
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
    if command == "migrate":
        return asyncio.run(_migrate(url, check=args.check, reapply=args.reapply))
    if command == "apply-schema":
        return asyncio.run(_migrate(url, check=False))
    if command == "sweep":
        return asyncio.run(_sweep(url))
    if command == "chain":
        return asyncio.run(_chain(url, config, args.all))
    if command == "keys":
        return asyncio.run(_keys(url, args))
    if command == "prices":
        return _import_prices(url, args, config)
    if command == "import":
        return _import_employees(url, args, config)
    parser.error(f"unknown command {command}")
    return 2
