"""`tokenledger prices import` and `tokenledger import employees`: bulk
imports from files, straight to the database."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from service import db, pricing
from service.cli.args import positive_int, url_option
from service.config import Config

# Rows per database transaction of `tokenledger import employees`: each chunk
# commits on its own, so the progress bar moves and a stopped import is
# completed by running it again (rows are idempotent by employee id).
IMPORT_CHUNK_ROWS = 5000


def add_parsers(sub: Any) -> None:
    """prices import and import employees, with their options."""
    price_import = _subcommand(
        sub,
        ("prices", "manage model prices"),
        ("import", "add versions from a LiteLLM model_prices_and_context_window.json-format file"),
    )
    price_import.add_argument("file", help="the price map (see deploy/prices.example.json)")
    price_import.add_argument(
        "--credits-per-usd",
        type=positive_int("expected a positive integer, got {!r}"),
        default=None,
        help="conversion rate (default TOKENLEDGER_CREDITS_PER_USD, else 1000000)",
    )
    price_import.add_argument(
        "--effective-from",
        type=_timestamp,
        default=None,
        help="RFC 3339 instant the changed prices take effect (default now)",
    )
    import_employees = _subcommand(
        sub,
        ("import", "bulk imports from CSV"),
        ("employees", "create or update employees from a CSV (id,name,email,department)"),
    )
    import_employees.add_argument("file", help="the CSV file, with a header row")
    import_employees.add_argument(
        "--dry-run", action="store_true", help="report what would happen; change nothing"
    )


def _subcommand(
    sub: Any, group: tuple[str, str], command: tuple[str, str]
) -> argparse.ArgumentParser:
    """`tokenledger GROUP COMMAND [--database-url URL]`, each (name, help)."""
    commands = sub.add_parser(group[0], help=group[1]).add_subparsers(
        dest=f"{group[0]}_command", required=True
    )
    parser: argparse.ArgumentParser = commands.add_parser(
        command[0], parents=[url_option()], help=command[1]
    )
    return parser


def import_prices(url: str, args: argparse.Namespace, config: Config) -> int:
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


def import_employees(url: str, args: argparse.Namespace, config: Config) -> int:
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
