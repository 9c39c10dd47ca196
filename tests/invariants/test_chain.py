"""The hash chain (README, Tamper evidence): an untouched ledger verifies, and
every kind of tampering a superuser can do with the triggers switched off is
caught and names the right transaction."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from service import chain
from service import db as service_db
from service.background import Background
from service.config import Config
from service.journal import Database, database_clock
from service.observability import Metrics

# The scripted operations run at injected instants in 2020, so that they
# are long settled and the chainer takes them with any settle window.
SETTLE = 1.0


def _ctx(second: int) -> dict[str, Any]:
    return {
        "actor": "test",
        "request_id": f"chain-{second}",
        "now": f"2020-01-01T00:00:{second:02d}Z",
    }


def _txn(public: str) -> uuid.UUID:
    return uuid.UUID(public.removeprefix("txn_"))


@dataclass(frozen=True)
class World:
    """The transactions of the scripted ledger, by what they are."""

    grant: uuid.UUID
    expiring_grant: uuid.UUID
    debit: uuid.UUID
    transfer: uuid.UUID
    reversal: uuid.UUID
    expiry: uuid.UUID
    last_debit: uuid.UUID


async def _op(conn: asyncpg.Connection, op: str, args: dict[str, Any], second: int) -> Any:
    result = await conn.fetchval(
        "SELECT tl_execute('test', NULL, NULL, $1, 201, $2, $3)", op, args, _ctx(second)
    )
    assert result["status"] == 201, result
    return result["body"]


async def _script(conn: asyncpg.Connection) -> World:
    """Department, two employees, and a grant, an expiring grant, a debit, a
    transfer, a reversal and a debit that first expires the expiring lot."""
    await conn.fetchval(
        "SELECT tl_op_put_department($1, $2)", {"id": "eng", "name": "Eng"}, _ctx(0)
    )
    for e in ("e1", "e2"):
        await conn.fetchval(
            "SELECT tl_op_put_employee($1, $2)",
            {"id": e, "name": e.upper(), "email": f"{e}@example.com", "department": "eng"},
            _ctx(0),
        )
    grant = await _op(conn, "grant", {"employee": "e1", "amount": 100, "reason": "spot_bonus"}, 1)
    expiring = await _op(
        conn,
        "grant",
        {"employee": "e2", "amount": 30, "reason": "monthly", "expires_at": "2020-01-01T00:00:05Z"},
        2,
    )
    debit = await _op(
        conn, "debit", {"account": "employee:e1", "amount": 10, "metadata": {"model": "m"}}, 3
    )
    transfer = await _op(
        conn, "transfer", {"from": "employee:e1", "to": "employee:e2", "amount": 20}, 4
    )
    reversal = await _op(conn, "reverse", {"transaction_id": str(_txn(debit["id"]))}, 6)
    last = await _op(conn, "debit", {"account": "employee:e2", "amount": 5}, 7)
    expiry = await conn.fetchval("SELECT id FROM transactions WHERE kind = 'expiry'")
    return World(
        grant=_txn(grant["transaction"]["id"]),
        expiring_grant=_txn(expiring["transaction"]["id"]),
        debit=_txn(debit["id"]),
        transfer=_txn(transfer["id"]),
        reversal=_txn(reversal["id"]),
        expiry=expiry,
        last_debit=_txn(last["id"]),
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the service's codecs to this test's database."""
    c = await service_db.connect(database_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def world(conn: asyncpg.Connection) -> World:
    """The scripted ledger, fully chained."""
    w = await _script(conn)
    assert await chain.append_pending(conn, batch_size=3, settle_seconds=SETTLE) == 7
    return w


@pytest.fixture
async def su(db: asyncpg.Connection) -> asyncpg.Connection:
    """The superuser connection with triggers (and foreign keys) switched off."""
    await db.execute("SET session_replication_role = replica")
    return db


async def _seq(db: asyncpg.Connection, txn: uuid.UUID) -> int:
    return int(await db.fetchval("SELECT seq FROM chain WHERE transaction_id = $1", txn))


async def test_untouched_chain_verifies(conn: asyncpg.Connection, world: World) -> None:
    """A chain of untouched transactions verifies, in (created_at, id) order, in any batch size."""
    assert await chain.verify_chain(conn) is None
    assert await chain.verify_chain(conn, batch_size=2, max_lag_seconds=60) is None
    order = await conn.fetch(
        "SELECT t.id FROM chain c JOIN transactions t ON t.id = c.transaction_id ORDER BY c.seq"
    )
    expected = await conn.fetch("SELECT id FROM transactions ORDER BY created_at, id")
    assert [r["id"] for r in order] == [r["id"] for r in expected]
    head = await chain.head(conn)
    assert head is not None and head.seq == 7
    # The expiry and the debit after it share an instant; their ids order them.
    assert head.transaction_id in {world.expiry, world.last_debit}
    assert await chain.append_pending(conn, batch_size=3, settle_seconds=SETTLE) == 0
    assert await chain.pending(conn) == (0, None)


async def test_chain_rows_are_append_only(conn: asyncpg.Connection, world: World) -> None:
    """With the triggers on, chain rows cannot be updated, deleted or truncated."""
    for statement in (
        "UPDATE chain SET chained_at = now()",
        "DELETE FROM chain",
        "TRUNCATE chain",
    ):
        with pytest.raises(asyncpg.PostgresError) as exc:
            await conn.execute(statement)
        assert exc.value.sqlstate == "TLE01", statement


async def test_service_role_chains_but_cannot_rewrite(
    conn: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    """tokenledger_app may append to the chain, and may not update, delete or truncate it."""
    await _script(conn)
    await db.execute("SET ROLE tokenledger_app")
    assert await db.fetchval("SELECT tl_chain_pending(100, '1 second')") == 7
    for statement in ("UPDATE chain SET chained_at = now()", "DELETE FROM chain", "TRUNCATE chain"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute(statement)
    assert await chain.verify_chain(db) is None


async def test_changed_entry_amount_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Changing one entry's amount is reported as altered content of that transaction."""
    seq = await _seq(su, world.debit)
    await su.execute(
        "UPDATE entries SET amount = amount + 1 WHERE id = "
        "(SELECT min(id) FROM entries WHERE transaction_id = $1)",
        world.debit,
    )
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq}, transaction {chain.public_id(world.debit)}: content altered" in problem


async def test_deleted_entry_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Deleting one entry is reported as altered content of its transaction."""
    seq = await _seq(su, world.transfer)
    await su.execute(
        "DELETE FROM entries WHERE id = (SELECT max(id) FROM entries WHERE transaction_id = $1)",
        world.transfer,
    )
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq}, transaction {chain.public_id(world.transfer)}: content altered" in problem


async def _delete_transaction(su: asyncpg.Connection, txn: uuid.UUID, *, chain_row: bool) -> None:
    await su.execute("DELETE FROM entries WHERE transaction_id = $1", txn)
    await su.execute("DELETE FROM lot_movements WHERE transaction_id = $1", txn)
    if chain_row:
        await su.execute("DELETE FROM chain WHERE transaction_id = $1", txn)
    await su.execute("DELETE FROM transactions WHERE id = $1", txn)


async def test_deleted_transaction_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Deleting a transaction with its entries and its chain row leaves a gap
    at its seq, reported with the transaction that follows it."""
    seq = await _seq(su, world.debit)
    after = await su.fetchval("SELECT transaction_id FROM chain WHERE seq = $1", seq + 1)
    await _delete_transaction(su, world.debit, chain_row=True)
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert problem.startswith(f"seq {seq} is missing")
    assert f"seq {seq + 1}, transaction {chain.public_id(after)}" in problem


async def test_deleted_transaction_with_renumbered_chain_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Closing the gap by renumbering the later chain rows breaks the link at the deleted seq."""
    seq = await _seq(su, world.debit)
    after = await su.fetchval("SELECT transaction_id FROM chain WHERE seq = $1", seq + 1)
    await _delete_transaction(su, world.debit, chain_row=True)
    await su.execute("UPDATE chain SET seq = seq - 1 WHERE seq > $1", seq)
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq}, transaction {chain.public_id(after)}: prev_hash" in problem


async def test_deleted_transaction_keeping_its_chain_row_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """A chain row whose transaction is gone names that transaction."""
    seq = await _seq(su, world.transfer)
    await _delete_transaction(su, world.transfer, chain_row=False)
    problem = await chain.verify_chain(conn)
    assert problem == (
        f"seq {seq}, transaction {chain.public_id(world.transfer)}: "
        "the transaction was deleted after it was chained"
    )


async def test_swapped_chain_rows_are_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Swapping two chain rows' seq is reported at the earlier position, naming
    the transaction moved there."""
    a, b = await _seq(su, world.expiring_grant), await _seq(su, world.transfer)
    assert a < b
    await su.execute("UPDATE chain SET seq = 1000 WHERE seq = $1", a)
    await su.execute("UPDATE chain SET seq = $1 WHERE seq = $2", a, b)
    await su.execute("UPDATE chain SET seq = $1 WHERE seq = 1000", b)
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {a}, transaction {chain.public_id(world.transfer)}: prev_hash" in problem


async def test_swapped_transaction_ids_are_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Swapping the transactions two chain rows point at (hashes left in
    place) is reported at the earlier position."""
    a, b = await _seq(su, world.grant), await _seq(su, world.debit)
    assert a < b
    parked = uuid.uuid4()  # transaction_id is unique: swap through a third value
    await su.execute("UPDATE chain SET transaction_id = $1 WHERE seq = $2", parked, a)
    await su.execute("UPDATE chain SET transaction_id = $1 WHERE seq = $2", world.grant, b)
    await su.execute("UPDATE chain SET transaction_id = $1 WHERE seq = $2", world.debit, a)
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {a}, transaction {chain.public_id(world.debit)}: content altered" in problem


async def test_updated_metadata_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Changing a transaction's metadata is caught; so is fixing up that row's
    hashes, at the next row."""
    seq = await _seq(su, world.debit)
    await su.execute(
        """UPDATE transactions SET metadata = '{"model": "cheaper"}' WHERE id = $1""", world.debit
    )
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq}, transaction {chain.public_id(world.debit)}: content altered" in problem

    # A tamperer who also recomputes this row's hashes breaks the link to the next row.
    await su.execute(
        "UPDATE chain SET content_hash = sha256(convert_to(tl_canonical(transaction_id), 'UTF8')) "
        "WHERE seq = $1",
        seq,
    )
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq}, transaction {chain.public_id(world.debit)}: chain_hash" in problem
    await su.execute(
        "UPDATE chain SET chain_hash = sha256(prev_hash || content_hash) WHERE seq = $1", seq
    )
    nxt = await su.fetchval("SELECT transaction_id FROM chain WHERE seq = $1", seq + 1)
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert f"seq {seq + 1}, transaction {chain.public_id(nxt)}: prev_hash" in problem


async def test_forged_past_transaction_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """A balanced transaction inserted with a past date, never chained, is named."""
    forged = uuid.uuid4()
    await su.execute(
        "INSERT INTO transactions (id, kind, created_at) VALUES ($1, 'grant', '2019-06-01Z')",
        forged,
    )
    await su.execute(
        "INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, "
        "version, created_at) "
        "SELECT $1, a.id, 0, 'CREDIT', x.amount, x.amount, 1000, '2019-06-01Z' "
        "FROM (VALUES ('employee:e1', 500), ('system:issuance', -500)) x (address, amount) "
        "JOIN accounts a ON a.address = x.address",
        forged,
    )
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert problem.startswith(f"transaction {chain.public_id(forged)} (created_at 2019-06-01T")
    assert "not in the chain" in problem
    # The chainer does not take it either: it is far behind the head.
    assert await chain.append_pending(conn, batch_size=10, settle_seconds=SETTLE) == 0


async def test_replaced_canonical_function_is_caught(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Redefining the function that verification hashes with is reported
    before any hash is trusted."""
    await su.execute("""UPDATE transactions SET memo = 'rewritten' WHERE id = $1""", world.debit)
    # A forger's tl_canonical_many, shadowing the real one; this one passes through, a real
    # forgery would leave the memo out so the debit hashes as before.
    await su.execute(
        "CREATE SCHEMA forger; SET search_path = forger, public; "
        "CREATE FUNCTION forger.tl_canonical_many(p_ids uuid[]) "
        "RETURNS TABLE (transaction_id uuid, canonical text) LANGUAGE sql STABLE AS "
        "$$ SELECT * FROM public.tl_canonical_many(p_ids) $$"
    )
    await conn.execute("SET search_path = forger, public")
    problem = await chain.verify_chain(conn)
    assert problem is not None
    assert problem.startswith("function tl_canonical_many(uuid[]) in the database is not")
    await conn.execute("RESET search_path")
    problem = await chain.verify_chain(conn)
    assert problem is not None and "content altered" in problem


async def test_lagging_chainer_is_reported(conn: asyncpg.Connection, world: World) -> None:
    """With max_lag_seconds, a transaction that long unchained fails verification;
    newer pending ones do not."""
    await _op(conn, "debit", {"account": "employee:e1", "amount": 1}, 30)
    late = await _op(conn, "debit", {"account": "employee:e1", "amount": 1}, 50)
    # Unchained but newer than the head: pending, not tampering.
    assert await chain.verify_chain(conn, max_lag_seconds=60) is None
    problem = await chain.verify_chain(conn, max_lag_seconds=10)
    assert problem is not None and "is the chainer running?" in problem
    assert chain.public_id(_txn(late["id"])) not in problem
    assert (await chain.pending(conn))[0] == 2


async def test_anchor_defeats_a_rewritten_chain(
    conn: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Rewriting history and rebuilding the whole chain verifies on its own,
    but not against a head anchored before."""
    before = await chain.head(conn)
    assert before is not None
    anchor = [(before.seq, before.chain_hash)]
    assert await chain.verify_chain(conn, anchors=anchor) is None
    await su.execute(
        """UPDATE transactions SET metadata = '{"model": "cheaper"}' WHERE id = $1""", world.debit
    )
    await su.execute("DELETE FROM chain")
    assert await chain.append_pending(conn, batch_size=100, settle_seconds=SETTLE) == 7
    assert await chain.verify_chain(conn) is None
    problem = await chain.verify_chain(conn, anchors=anchor)
    assert problem is not None and "is not the anchored" in problem
    # Dropping the chain's tail is caught by an anchor beyond the new end.
    await su.execute("DELETE FROM chain WHERE seq = 7")
    problem = await chain.verify_chain(conn, anchors=anchor)
    assert problem is not None and "before the anchored seq 7" in problem


async def test_concurrent_chainers_never_fork(database_url: str, conn: asyncpg.Connection) -> None:
    """Two connections chaining at once append each transaction exactly once; the chain verifies."""
    await _script(conn)
    for i in range(40):
        await _op(conn, "debit", {"account": "employee:e1", "amount": 1}, 8 + i)
    total = int(await conn.fetchval("SELECT count(*) FROM transactions"))
    other = await service_db.connect(database_url)
    try:
        # While one connection holds the chainer's lock, the other appends nothing.
        async with conn.transaction():
            assert await conn.fetchval("SELECT tl_chain_pending(5, '1 second')") == 5
            assert await other.fetchval("SELECT tl_chain_pending(5, '1 second')") == 0

        # Both chaining in small batches at once.
        async def run(c: asyncpg.Connection) -> int:
            appended = 0
            for _ in range(30):
                appended += await chain.append_pending(c, batch_size=2, settle_seconds=SETTLE)
                await asyncio.sleep(0)
            return appended

        counts = await asyncio.gather(run(conn), run(other))
    finally:
        await other.close()
    assert 5 + sum(counts) == total
    rows = await conn.fetch("SELECT seq, transaction_id FROM chain ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, total + 1))
    assert len({r["transaction_id"] for r in rows}) == total
    assert await chain.verify_chain(conn, max_lag_seconds=0) is None


async def test_background_pass_chains_and_counts(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The background loop's chaining pass appends settled transactions and counts them."""
    await _script(conn)
    config = Config(database_url=database_url, chain_batch_size=2)
    pool = await service_db.create_pool(
        database_url,
        min_size=1,
        max_size=2,
        statement_timeout_ms=config.statement_timeout_ms,
        lock_timeout_ms=config.lock_timeout_ms,
        idle_in_transaction_timeout_ms=config.idle_in_transaction_timeout_ms,
        connect_timeout_seconds=config.connect_timeout_seconds,
    )
    try:
        ledger = Database(pool, config, Metrics(), database_clock)
        assert await Background(ledger).chain_pending() == 7
        counted = ledger.metrics.registry.get_sample_value("tokenledger_chained_transactions_total")
        assert counted == 7
    finally:
        await pool.close()
    assert await chain.verify_chain(conn) is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    return subprocess.run(  # noqa: S603  # why: our own CLI, fixed arguments
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_cli_verify_chain(
    database_url: str, conn: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """`tokenledger chain` then `audit --verify-chain` exits 0 and prints the head;
    after tampering it exits 1 naming the transaction."""
    w = await _script(conn)
    chained = _cli("chain", "--database-url", database_url)
    assert chained.returncode == 0, chained.stderr
    assert "chained 7 transactions" in chained.stdout
    ok = _cli("audit", "--verify-chain", "--database-url", database_url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    head = await chain.head(conn)
    assert head is not None
    assert f"chain head: seq 7 sha256 {head.chain_hash.hex()}" in ok.stdout
    anchored = _cli(
        "audit",
        "--verify-chain",
        "--anchor",
        f"7:{head.chain_hash.hex()}",
        "--database-url",
        database_url,
    )
    assert anchored.returncode == 0, anchored.stdout + anchored.stderr[-1500:]

    await su.execute("""UPDATE transactions SET memo = 'rewritten' WHERE id = $1""", w.transfer)
    # A routine verification starts after the last row verified (seq 7):
    # rewritten history is found by the full one.
    bad = _cli("audit", "--full", "--verify-chain", "--database-url", database_url)
    assert bad.returncode == 1
    assert "ok: invariants" in bad.stdout  # the ledger still balances: only the chain knows
    assert (
        f"FAIL chain: seq 4, transaction {chain.public_id(w.transfer)}: content altered"
        in bad.stdout
    )


def test_settle_must_exceed_statement_timeout() -> None:
    """A settle window not above statement_timeout is refused at start-up."""
    with pytest.raises(ValueError, match="chain_settle_seconds"):
        Config(statement_timeout_ms=10_000, chain_settle_seconds=10.0)


async def test_hashes_are_reproducible_outside_the_database(
    conn: asyncpg.Connection, world: World
) -> None:
    """content_hash is the SHA-256 of tl_canonical's UTF-8 text, which carries
    the entries; chain_hash = sha256(prev_hash || content_hash) from 32 zero bytes."""
    rows = await conn.fetch(
        "SELECT seq, tl_canonical(transaction_id) AS text, content_hash, prev_hash, chain_hash "
        "FROM chain ORDER BY seq"
    )
    prev = bytes(32)
    for row in rows:
        assert hashlib.sha256(row["text"].encode()).digest() == row["content_hash"]
        assert row["prev_hash"] == prev
        prev = hashlib.sha256(prev + row["content_hash"]).digest()
        assert row["chain_hash"] == prev
    first = rows[0]["text"]
    assert '"account": "employee:e1"' in first and '"amount": 100' in first


# The canonical text as it was first defined: jsonb_build_object(...)::text.
# tl_canonical_many writes the same text out by hand (it is five times
# cheaper); every content hash ever chained is of this form, so the two
# must never differ.
_JSONB_CANONICAL = """
SELECT t.id AS transaction_id, jsonb_build_object(
    'id', t.id, 'kind', t.kind, 'memo', t.memo, 'metadata', t.metadata, 'details', t.details,
    'actor', t.actor, 'request_id', t.request_id, 'reverses', t.reverses,
    'created_at', tl_ts(t.created_at),
    'entries', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'account', a.address, 'shard', e.shard, 'asset', e.asset, 'amount', e.amount,
                   'balance_after', e.balance_after, 'version', e.version,
                   'created_at', tl_ts(e.created_at))
                   ORDER BY a.address, e.shard, e.version)
        FROM entries e JOIN accounts a ON a.id = e.account_id
        WHERE e.transaction_id = t.id), '[]'::jsonb),
    'lots', coalesce((
        SELECT jsonb_agg(jsonb_build_object('lot', m.lot_id, 'amount', m.amount) ORDER BY m.lot_id)
        FROM lot_movements m WHERE m.transaction_id = t.id), '[]'::jsonb))::text AS canonical
FROM transactions t
"""


async def test_canonical_text_is_the_jsonb_form(conn: asyncpg.Connection, world: World) -> None:
    """tl_canonical_many's text equals jsonb_build_object(...)::text for every transaction, memos
    and metadata with quotes, backslashes, control characters, non-ASCII text and nesting
    included, so the chain's content hashes are what they always were."""
    odd = [
        'a "quoted" \\ back\\slash',
        "tab\there, newline\nthere, bell\x07, del\x7f",
        "日本語 ünïcödé 🚀 \u2028",
        "",
    ]
    for k, memo in enumerate(odd):
        await _op(
            conn,
            "debit",
            {
                "account": "employee:e2",
                "amount": 1,
                "memo": memo,
                "metadata": {"model": memo, "n": k, "nested": {"z": [1, None, True], "a": "\\"}},
            },
            40 + k,
        )
    expected = {r["transaction_id"]: r["canonical"] for r in await conn.fetch(_JSONB_CANONICAL)}
    got = {
        r["transaction_id"]: r["canonical"]
        for r in await conn.fetch(
            "SELECT * FROM tl_canonical_many(ARRAY(SELECT id FROM transactions))"
        )
    }
    assert len(expected) == 7 + len(odd)
    assert got == expected


async def test_a_chain_pass_scans_neither_the_journal_nor_the_chain(
    conn: asyncpg.Connection, db: asyncpg.Connection, world: World
) -> None:
    """A pass reaches the head, the unchained transactions and their entries by index, whatever
    the statistics say (here: taken when the journal and the chain held 7 rows, before 200 more
    transactions, as on a young database that grows faster than autovacuum analyzes it):
    a pass that hashed the whole journal or sorted the whole chain cost more at every pass as
    history grew (0.35 ms per chained transaction at 100k transactions)."""
    await db.execute("ANALYZE transactions, chain, entries, lot_movements")
    await _op(conn, "grant", {"employee": "e2", "amount": 1000, "reason": "spot_bonus"}, 50)
    for k in range(199):
        await _op(conn, "debit", {"account": "employee:e2", "amount": 1}, 50 + k % 9)

    async def scans() -> dict[str, int]:
        await db.execute("SELECT pg_stat_force_next_flush()")
        rows = await db.fetch(
            "SELECT relname, seq_scan FROM pg_stat_user_tables "
            "WHERE relname IN ('transactions', 'chain', 'entries', 'lot_movements')"
        )
        return {r["relname"]: int(r["seq_scan"]) for r in rows}

    # The pass on the connection whose counts are flushed (pg_stat_force_next_flush).
    before = await scans()
    assert await chain.append_pending(db, batch_size=1000, settle_seconds=SETTLE) == 200
    assert await scans() == before
    assert await chain.verify_chain(conn) is None
