"""The commands that check and maintain the ledger's database: `audit`
(and `--verify-chain`), `migrate` (and its former name `apply-schema`),
`sweep` and `chain`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable
from typing import Any

import asyncpg

from service import chain as hash_chain
from service import db, migrate
from service.audit import audit
from service.background import sweep_expired
from service.cli.args import url_option
from service.config import Config


def add_parsers(sub: Any) -> None:
    """audit, migrate, apply-schema, sweep and chain, with their options."""
    help_texts = {
        "audit": "check the ledger invariants",
        "migrate": "bring the database schema to this release",
        "apply-schema": "the same as migrate (its former name)",
        "sweep": "write due expiry transactions once",
        "chain": "append settled transactions to the hash chain once",
    }
    parsers = {
        name: sub.add_parser(name, parents=[url_option()], help=text)
        for name, text in help_texts.items()
    }
    audit_parser = parsers["audit"]
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
        type=anchor,
        action="append",
        metavar="SEQ:SHA256",
        help="a chain head recorded earlier that must still be in the chain (repeatable)",
    )
    parsers["migrate"].add_argument(
        "--check",
        action="store_true",
        help="change nothing: exit 0 when current, 1 when migrations or schema.sql are pending",
    )
    parsers["migrate"].add_argument(
        "--reapply",
        action="store_true",
        help="apply schema.sql even if this content was applied before",
    )
    parsers["chain"].add_argument(
        "--all",
        action="store_true",
        help="also append stragglers from any depth of history (check them first)",
    )


def run(command: str, url: str, args: argparse.Namespace, config: Config) -> int:
    """Run one of the commands add_parsers made; its exit status."""
    if command == "audit":
        if not args.verify_chain:
            return asyncio.run(run_audit(url, config, args.full))
        if args.max_lag_seconds is None:
            args.max_lag_seconds = config.chain_settle_seconds + 300
        return asyncio.run(run_audit(url, config, args.full, args))
    if command == "migrate":
        return asyncio.run(migrate_database(url, check=args.check, reapply=args.reapply))
    if command == "apply-schema":
        return asyncio.run(migrate_database(url, check=False))
    if command == "sweep":
        return asyncio.run(sweep(url))
    assert command == "chain", command
    return asyncio.run(chain(url, config, args.all))


async def run_audit(
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
        print(f"ok: {invariants_checked([*run.full, *run.since])} hold")
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


def invariants_checked(checks: Iterable[str]) -> str:
    """The invariants that checks named audit_<invariant>_<what> cover, as
    "invariants 1 to 9" (or "invariants 1, 3 and 4" when some are missing)."""
    numbers = sorted({int(check.split("_")[1]) for check in checks})
    if not numbers:
        return "no invariants"
    if len(numbers) == 1:
        return f"invariant {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"invariants {numbers[0]} to {numbers[-1]}"
    return f"invariants {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


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


def anchor(value: str) -> tuple[int, bytes]:
    """SEQ:HEX, a chain head recorded earlier (from the logs or a previous audit)."""
    seq, _, digest = value.partition(":")
    try:
        anchor = (int(seq), bytes.fromhex(digest))
    except ValueError:
        anchor = (0, b"")
    if anchor[0] < 1 or len(anchor[1]) != 32:
        raise argparse.ArgumentTypeError(f"expected SEQ:SHA256HEX, got {value!r}")
    return anchor


async def chain(url: str, config: Config, everything: bool) -> int:
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


async def migrate_database(url: str, *, check: bool, reapply: bool = False) -> int:
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


async def sweep(url: str) -> int:
    """`sweep`: expiry transactions for every due lot, 1000 accounts a
    transaction, as the background sweeper writes them."""
    sql = db.load_queries()["sweep_expired"]
    conn = await db.connect(url)
    try:
        total = await sweep_expired(
            lambda batch: conn.fetchval(sql, batch, {"actor": "system:sweeper"}),
            1000,
            to_the_end=True,
        )
    finally:
        await conn.close()
    print(f"expired {total} credits")
    return 0
