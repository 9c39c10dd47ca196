"""The hot path never scans every lot: with many lots in other accounts, a
debit and a balance read touch only the account's own lots, by index.

Counted with the backend's own table statistics (seq_scan of `lots`),
flushed by pg_stat_force_next_flush(), so the check does not depend on
timing or on EXPLAIN output."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

CTX = {"actor": "test", "request_id": "plans", "now": None}


async def lots_seq_scans(db: asyncpg.Connection) -> int:
    await db.execute("SELECT pg_stat_force_next_flush()")
    return int(await db.fetchval("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'lots'"))


@pytest.fixture
async def many_lots(db: asyncpg.Connection) -> str:
    """3,000 wallets with a lot each (and a voided one), analyzed; returns one wallet."""
    await db.execute("INSERT INTO departments (id, name) VALUES ('eng', 'Eng')")
    await db.execute(
        "INSERT INTO employees (id, name, email, department) "
        "SELECT 'e' || g, 'E', 'e@example.com', 'eng' FROM generate_series(1, 3000) g"
    )
    await db.execute(
        "INSERT INTO accounts (address, type, ref) SELECT 'employee:' || id, 'employee', id "
        "FROM employees"
    )
    program = {
        "id": "p",
        "amount": 100,
        "reason": "monthly_allotment",
        "cadence": {"every": "month", "day": 1},
        "time_zone": "UTC",
        "audience": {"all": True},
        "expiry": None,
        "funded_by": "system:issuance",
        "starts_on": "2026-01-01",
        "active": True,
    }
    await db.fetchval(
        "SELECT tl_op_put_program($1::jsonb, $2::jsonb)", json.dumps(program), json.dumps(CTX)
    )
    await db.fetchval(
        "SELECT tl_program_run('p', '2026-01', 'api', NULL, $1::jsonb)", json.dumps(CTX)
    )
    await db.execute("ANALYZE")
    return "employee:e1500"


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT tl_spendable(tl_account_id($1), now())",
        "SELECT tl_account_json(tl_account_id($1), now())",
        "SELECT tl_execute('t', NULL, NULL, 'debit', 201, "
        "jsonb_build_object('account', $1::text, 'amount', 1), '{}'::jsonb)",
    ],
    ids=["spendable", "balance", "debit"],
)
async def test_no_lot_table_scan(db: asyncpg.Connection, many_lots: str, statement: str) -> None:
    before = await lots_seq_scans(db)
    await db.fetchval(statement, many_lots)
    assert await lots_seq_scans(db) == before


@pytest.mark.parametrize("function", ["tl_ts", "tl_public_id", "tl_models_allow"])
async def test_formatting_helpers_are_inlined(db: asyncpg.Connection, function: str) -> None:
    """The helpers every answer calls per row are inlined into the calling statement: a SQL
    function that is not (tl_ts was declared IMMUTABLE over the STABLE to_char()) has its
    body planned again in each statement that calls it, and run once per row."""
    call = {
        "tl_ts": "tl_ts(t.created_at)",
        "tl_public_id": "tl_public_id('txn_', t.id)",
        "tl_models_allow": "tl_models_allow(t.metadata, t.kind, t.memo)",
    }[function]
    plan = await db.fetchval(f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT {call} FROM transactions t")  # noqa: S608  # why: a fixed call from the parameter list above
    output = " ".join(json.loads(plan)[0]["Plan"]["Output"])
    assert function not in output, output


async def test_entry_json_is_inlined(db: asyncpg.Connection) -> None:
    """The entries page's item (tl_entry_json, shared by its two queries) is inlined, and its
    field selections of the entry and transaction rows read plain columns, not whole rows."""
    plan = await db.fetchval(
        "EXPLAIN (VERBOSE, FORMAT JSON) SELECT tl_entry_json(e, t) "
        "FROM entries e JOIN transactions t ON t.id = e.transaction_id"
    )
    output = " ".join(json.loads(plan)[0]["Plan"]["Output"])
    assert "tl_entry_json" not in output, output
    assert "e.balance_after" in output and "t.metadata" in output, output
    assert "e.*" not in output and "ROW(" not in output, output


async def _flushed(db: asyncpg.Connection) -> None:
    await db.execute("SELECT pg_stat_force_next_flush()")


async def _add_keys(db: asyncpg.Connection, prefix: str, count: int) -> None:
    """`count` new idempotency keys, counted in the table's statistics at once."""
    await db.execute(
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
        "SELECT 'c', $1 || g, '\\x00', 200, 'null' FROM generate_series(1, $2::int) g",
        prefix,
        count,
    )
    await _flushed(db)


async def test_tables_that_doubled_are_analyzed_again(db: asyncpg.Connection) -> None:
    """tl_analyze_grown analyzes a hot table once it has grown since the last analysis by
    what it held then (500 rows at least), and then leaves it alone: generic plans made while
    the table was empty are made again with statistics that know its size."""
    await db.execute("ANALYZE idempotency_keys")
    await _add_keys(db, "k", 400)
    assert "idempotency_keys" not in await db.fetchval("SELECT tl_analyze_grown()")  # < 500
    await _add_keys(db, "m", 200)
    assert "idempotency_keys" in await db.fetchval("SELECT tl_analyze_grown()")
    assert (
        await db.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'idempotency_keys'")
        == 600
    )
    await _flushed(db)
    assert "idempotency_keys" not in await db.fetchval("SELECT tl_analyze_grown()")
    # Doubled again (600 more rows than the 600 it held): analyzed again.
    await _add_keys(db, "n", 600)
    assert "idempotency_keys" in await db.fetchval("SELECT tl_analyze_grown()")


async def test_tables_updated_in_place_are_not_analyzed_again(db: asyncpg.Connection) -> None:
    """Rows updated, however often, are not growth: the hot path updates `accounts`,
    `lots` and the roll-ups at every charge, and an ANALYZE of a table makes every
    connection plan again each statement that reads it. Counting updates as changes
    analyzed those tables at every background pass under load (every 5 s in
    `make bench`, in the middle of its usage batches); this failed then."""
    await _add_keys(db, "u", 600)  # counted before the analysis, which then finds them
    await db.execute("ANALYZE idempotency_keys")
    for _ in range(3):  # 1,800 rows changed, three times what the table holds
        await db.execute("UPDATE idempotency_keys SET status_code = status_code + 1")
    await _flushed(db)
    assert "idempotency_keys" not in await db.fetchval("SELECT tl_analyze_grown()")
    # Grown by what it held: analyzed.
    await _add_keys(db, "v", 600)
    assert "idempotency_keys" in await db.fetchval("SELECT tl_analyze_grown()")


async def reservation_reads(db: asyncpg.Connection) -> int:
    """Rows of `reservations` read so far, by any scan (the backend's own counters)."""
    await db.execute("SELECT pg_stat_force_next_flush()")
    row = await db.fetchrow(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n"
        " FROM pg_stat_user_tables WHERE relname = 'reservations'"
    )
    assert row is not None
    return int(row["n"])


async def test_batch_capture_reads_its_reservations_only(
    db: asyncpg.Connection, many_lots: str
) -> None:
    """A coalesced capture and release (tl_execute_batch) read the reservations they
    name, not every reservation: with 3,000 others open and the statistics of an
    empty table (every table starts so), the statement finding the wallets a
    reservation keeps on the one-by-one path was planned as a hash join of the
    batch against all of them (1.4 ms of an 8.6 ms batch in `make bench`).
    The answer builders (tl_reservation_json) keep the plan the session made
    first: here while the 3,000 were reserved one by one, outside the hot
    path's settings, which as PL/pgSQL without enable_seqscan = off of their
    own was a sequential scan at every later call."""
    ctx = json.dumps(CTX)
    await db.execute("ANALYZE reservations")  # empty: what a fresh database's planner sees
    await db.execute(
        "SELECT tl_op_reserve(jsonb_build_object('account', 'employee:e' || g, 'amount', 1,"
        " 'ttl_seconds', 3600), $1::jsonb) FROM generate_series(1, 3000) g",
        ctx,
    )
    ids = [
        str(r["id"])
        for r in await db.fetch(
            "SELECT r.id FROM reservations r JOIN accounts a ON a.id = r.account_id"
            " WHERE a.address = ANY ($1::text[]) ORDER BY a.address",
            ["employee:e1", "employee:e2"],
        )
    ]
    args = [
        json.dumps({"reservation_id": ids[0], "amount": 1, "metadata": None}),
        json.dumps({"reservation_id": ids[1]}),
    ]
    before = await reservation_reads(db)
    for _ in range(7):  # past the five custom plans of a cached statement
        tx = db.transaction()
        await tx.start()
        out = json.loads(
            await db.fetchval(
                "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6::jsonb[], $7::jsonb[])::text",
                ["t", "t"],
                ["k-capture", "k-release"],
                [b"\x01" * 32, b"\x02" * 32],
                ["capture", "release"],
                [200, 200],
                args,
                [ctx, ctx],
            )
        )
        await tx.rollback()  # the same two reservations again, 7 times
        assert [o["status"] for o in out] == [200, 200], out
    reads = await reservation_reads(db) - before
    assert reads <= 7 * 40, f"{reads} reservation rows read by 7 batches of 2"


@pytest.mark.parametrize("function", ["tl_transaction_json", "tl_reservation_json"])
async def test_answer_builders_keep_their_plans(db: asyncpg.Connection, function: str) -> None:
    """The functions a reserve or capture batch answers with, one call per item,
    read tables, so PostgreSQL cannot inline them; as SQL functions they were
    planned again at every call (about 190 us a call where the PL/pgSQL form,
    whose plan the session keeps, takes 65). They stay PL/pgSQL."""
    language = await db.fetchval(
        "SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
        " WHERE p.proname = $1",
        function,
    )
    assert language == "plpgsql"


async def key_reads(db: asyncpg.Connection) -> int:
    await db.execute("SELECT pg_stat_force_next_flush()")
    row = await db.fetchrow(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n"
        " FROM pg_stat_user_tables WHERE relname = 'idempotency_keys'"
    )
    assert row is not None
    return int(row["n"])


async def debit_batch(
    db: asyncpg.Connection, keys: list[str | None], accounts: list[str]
) -> list[dict[str, Any]]:
    """The answers of one coalesced batch (tl_execute_batch) of debits of 1 credit by
    caller "t", one per account, with these Idempotency-Keys (item i's request hash
    i + 1 repeated, none without a key)."""
    ctx = json.dumps(CTX)
    out: list[dict[str, Any]] = json.loads(
        await db.fetchval(
            "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6::jsonb[], $7::jsonb[])::text",
            ["t"] * len(keys),
            keys,
            [None if k is None else bytes([i + 1]) * 32 for i, k in enumerate(keys)],
            ["debit"] * len(keys),
            [201] * len(keys),
            [json.dumps({"account": a, "amount": 1}) for a in accounts],
            [ctx] * len(keys),
        )
    )
    return out


async def test_batch_completes_its_keys_by_key(db: asyncpg.Connection, many_lots: str) -> None:
    """A coalesced batch (tl_execute_batch) completes the Idempotency-Keys it claimed by
    key, not by reading every key. The connection keeps the generic plan it made at its
    first batch: made while the table was small (a fresh database), the completing UPDATE
    was a hash join of the batch against a full scan of the keys' index, and stayed so as
    the keys grew, until the table was analyzed (about 5 ms a batch at 8,000 keys in an
    A/B driver)."""

    async def batches(tag: str) -> None:
        for n in range(7):
            out = await debit_batch(
                db, [f"k-{tag}{n}-a", f"k-{tag}{n}-b"], ["employee:e1", "employee:e2"]
            )
            assert [o["status"] for o in out] == [201, 201], out

    await batches("first")  # the plans of this connection, made with few keys
    await db.execute(
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body)"
        " SELECT 't', 'old-' || g, '\\x00', 201, '{}' FROM generate_series(1, 5000) g"
    )
    before = await key_reads(db)
    await batches("then")
    reads = await key_reads(db) - before
    assert reads <= 7 * 20, f"{reads} key rows read by 7 batches of 2"
    stored = await db.fetch("SELECT status_code FROM idempotency_keys WHERE key LIKE 'k-%'")
    assert [r["status_code"] for r in stored] == [201] * 28


async def test_a_key_left_uncompleted_fails_the_batch(
    db: asyncpg.Connection, many_lots: str
) -> None:
    """The completion reaches the claimed keys by their rows' addresses; were a row to
    move in between (here a trigger updates it right after the claim), the batch fails
    instead of leaving an answered key claimed but empty (its retries would wait on a
    request that finished)."""
    await db.execute(
        "CREATE FUNCTION t_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " UPDATE idempotency_keys SET created_at = created_at"
        " WHERE caller = NEW.caller AND key = NEW.key; RETURN NULL; END $$;"
        " CREATE TRIGGER t_touch AFTER INSERT ON idempotency_keys"
        " FOR EACH ROW EXECUTE FUNCTION t_touch()"
    )
    with pytest.raises(asyncpg.PostgresError, match="an answered key was not completed"):
        await debit_batch(db, ["k-moved"], ["employee:e1"])


async def test_a_batch_of_items_without_keys_is_not_failed(
    db: asyncpg.Connection, many_lots: str
) -> None:
    """Items without an Idempotency-Key (the coalescer passes them with a null key) claim
    nothing, so they have no key to complete: the completion check counts only the keys
    claimed now, and such a batch answers set-based like any other."""
    out = await debit_batch(db, [None, "k-keyed"], ["employee:e1", "employee:e2"])
    assert [o["status"] for o in out] == [201, 201], out
    assert (
        await db.fetchval("SELECT status_code FROM idempotency_keys WHERE key = 'k-keyed'") == 201
    )
