"""Tamper evidence: the hash chain of transactions (README, Tamper evidence).

A background chainer (`tl_chain_pending` in schema.sql, run by
service/background.py and `tokenledger chain`) appends committed
transactions to the `chain` table in (created_at, id) order, a settle
window behind the clock. Each row holds the SHA-256 of the transaction's
canonical content (`tl_canonical`: entries and lot movements included),
its predecessor's chain hash, and sha256(prev_hash || content_hash).

`verify_chain` recomputes all of it and names the first transaction whose
content, order or presence no longer matches. Anchoring the head (logged
after every chaining pass, printed by `tokenledger audit --verify-chain`)
outside the database is what defeats someone who rewrites the whole chain.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from service import db, migrate

# prev_hash of the first row.
GENESIS = bytes(32)
# Chain rows read per round trip while verifying: memory stays bounded
# whatever the length of the chain.
VERIFY_BATCH = 5000
# The database functions verification runs. Someone who could replace them
# could hash forged content as the original, so verify_chain first checks
# that what these signatures resolve to is what schema.sql defines.
VERIFIER_FUNCTIONS = ("tl_canonical_many(uuid[])", "tl_ts(timestamptz)")


def public_id(transaction_id: uuid.UUID) -> str:
    """The transaction's id as the API shows it (tl_public_id)."""
    return "txn_" + transaction_id.hex


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _shipped_body(signature: str) -> str:
    """The body of a function as schema.sql (shipped with this code) defines it."""
    sql = migrate.schema_sql()
    start = sql.index(f"CREATE OR REPLACE FUNCTION {signature.partition('(')[0]}(")
    body = sql.index("$$", start) + 2
    return sql[body : sql.index("$$", body)]


@dataclass(frozen=True)
class Head:
    """The last row of the chain: anchor seq and chain_hash outside the database."""

    seq: int
    transaction_id: uuid.UUID
    chain_hash: bytes

    def __str__(self) -> str:
        return f"seq {self.seq} sha256 {self.chain_hash.hex()} ({public_id(self.transaction_id)})"


async def append_pending(
    conn: asyncpg.Connection,
    *,
    batch_size: int,
    settle_seconds: float,
    everything: bool = False,
    max_batches: int | None = None,
) -> int:
    """Chain transactions created more than settle_seconds ago, batch by
    batch (one database transaction each), until none are left or
    max_batches ran. Returns how many were appended; 0 when another
    connection holds the chainer's lock. `everything` also appends
    stragglers from any depth of history (tl_chain_pending's p_all)."""
    sql = db.load_queries()["chain_pending"]
    settle = timedelta(seconds=settle_seconds)
    total = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        n = int(await conn.fetchval(sql, batch_size, settle, everything))
        total += n
        batches += 1
        if n < batch_size:
            break
    return total


async def head(conn: asyncpg.Connection) -> Head | None:
    """The last row of the chain, or None while it is empty."""
    row = await conn.fetchrow(db.load_queries()["chain_head"])
    if row is None:
        return None
    return Head(int(row["seq"]), row["transaction_id"], bytes(row["chain_hash"]))


async def pending(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """How many transactions are not chained yet, and the oldest one's created_at."""
    row = await conn.fetchrow(db.load_queries()["chain_pending_count"])
    assert row is not None
    return int(row["n"]), row["oldest"]


async def verify_chain(
    conn: asyncpg.Connection,
    *,
    max_lag_seconds: float | None = None,
    anchors: Sequence[tuple[int, bytes]] = (),
    batch_size: int = VERIFY_BATCH,
) -> str | None:
    """verify_chain_since from the genesis: the whole chain (see there)."""
    problem, _ = await verify_chain_since(
        conn, None, max_lag_seconds=max_lag_seconds, anchors=anchors, batch_size=batch_size
    )
    return problem


async def verify_chain_since(
    conn: asyncpg.Connection,
    since: tuple[int, bytes] | None,
    *,
    max_lag_seconds: float | None = None,
    anchors: Sequence[tuple[int, bytes]] = (),
    batch_size: int = VERIFY_BATCH,
    settle_seconds: float = 0.0,
) -> tuple[str | None, tuple[int, bytes] | None]:
    """(None, last row verified) when the chain is intact; otherwise (what is
    wrong, None), naming the first transaction (seq and id) whose content,
    order or presence was altered.

    Checks first that the SQL functions it hashes with are schema.sql's. Then
    walks the chain in seq order, batch by batch, in one REPEATABLE READ
    snapshot, checking for every row: no seq is skipped, the transaction
    exists, its recomputed content hash matches, prev_hash is the previous
    row's chain_hash, and chain_hash recomputes. Then no transaction older
    than the newest chained one may be missing from the chain (inserted into
    the past, or its chain row deleted); with max_lag_seconds, neither may a
    transaction that much older than the newest transaction (the chainer is
    stuck or not running). Each anchor (seq, chain_hash), a head recorded
    outside the database earlier, must still be in the chain with that hash:
    without anchors, a superuser who recomputes the whole chain after
    rewriting history goes unseen.

    `since` (seq, chain_hash), the last row an earlier verification passed
    (audit_checkpoints' 'chain' row), starts the walk after it: that row
    must still hold that hash, and rows up to it are not recomputed; the
    look-ups for transactions missing from the chain start at its
    transaction's created_at less settle_seconds. Its cost then follows the
    rows chained since. Also returns the last row verified, (seq,
    chain_hash), or None when the chain is empty (or the walk failed).
    """
    queries = db.load_queries()
    anchored = dict(anchors)
    verified: tuple[int, bytes] | None = None
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # Every batch is planned for its own ids: after five executions a
        # prepared statement may switch to a generic plan, which cannot know
        # how many ids a batch holds and joined them quadratically (a batch
        # of thousands took minutes on a year of history).
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        for signature in VERIFIER_FUNCTIONS:
            source = await conn.fetchval(queries["chain_function_source"], signature)
            if source != _shipped_body(signature):
                return (
                    f"function {signature} in the database is not the one schema.sql "
                    "defines: the chain cannot be verified with it (it was replaced, or "
                    "the database's schema is another version than this tokenledger's)"
                ), None
        expected_seq = 1
        prev_hash = GENESIS
        newest: datetime | None = None
        floor: datetime | None = None
        if since is not None:
            start = await conn.fetchrow(queries["chain_row"], since[0])
            if start is None or bytes(start["chain_hash"]) != since[1]:
                return (
                    f"seq {since[0]}, verified earlier with chain_hash {since[1].hex()}, "
                    "is gone or holds another hash now; the chain was rewritten "
                    "(run audit --full --verify-chain)"
                ), None
            for old_seq, old_hash in list(anchored.items()):
                if old_seq <= since[0]:
                    row = await conn.fetchrow(queries["chain_row"], old_seq)
                    if row is None or bytes(row["chain_hash"]) != old_hash:
                        return (
                            f"seq {old_seq}: chain_hash is not the anchored {old_hash.hex()}; "
                            "the chain up to here was rewritten"
                        ), None
                    del anchored[old_seq]
            expected_seq = since[0] + 1
            prev_hash = since[1]
            verified = since
            if start["created_at"] is not None:
                newest = start["created_at"]
                floor = start["created_at"] - timedelta(seconds=settle_seconds)
        while True:
            rows = await conn.fetch(queries["chain_verify_batch"], expected_seq - 1, batch_size)
            for row in rows:
                seq = int(row["seq"])
                where = f"seq {seq}, transaction {public_id(row['transaction_id'])}"
                if seq != expected_seq:
                    return (
                        f"seq {expected_seq} is missing: the chain goes from seq "
                        f"{expected_seq - 1} to {where}; a chained transaction was removed"
                    ), None
                if row["recomputed"] is None:
                    return f"{where}: the transaction was deleted after it was chained", None
                content_hash = bytes(row["content_hash"])
                if bytes(row["recomputed"]) != content_hash:
                    return (
                        f"{where}: content altered (the transaction, its entries or its "
                        "lot movements no longer match content_hash)"
                    ), None
                if bytes(row["prev_hash"]) != prev_hash:
                    return (
                        f"{where}: prev_hash is not the chain_hash of seq {seq - 1}; "
                        "the chain was reordered or rows were removed or inserted"
                    ), None
                chain_hash = bytes(row["chain_hash"])
                if hashlib.sha256(prev_hash + content_hash).digest() != chain_hash:
                    return (
                        f"{where}: chain_hash does not recompute; the chain row was altered",
                        None,
                    )
                anchor = anchored.pop(seq, None)
                if anchor is not None and anchor != chain_hash:
                    return (
                        f"{where}: chain_hash {chain_hash.hex()} is not the anchored "
                        f"{anchor.hex()}; the chain up to here was rewritten"
                    ), None
                prev_hash = chain_hash
                expected_seq = seq + 1
                verified = (seq, chain_hash)
                created_at: datetime = row["created_at"]
                if newest is None or created_at > newest:
                    newest = created_at
            if len(rows) < batch_size:
                break
        if anchored:
            return (
                f"the chain ends at seq {expected_seq - 1}, before the anchored seq "
                f"{min(anchored)}; chained transactions were removed from its end"
            ), None
        if newest is not None:
            behind = await conn.fetchrow(queries["chain_unchained_before"], newest, floor)
            if behind is not None:
                return (
                    f"transaction {public_id(behind['id'])} "
                    f"(created_at {_ts(behind['created_at'])}) "
                    "is not in the chain although newer transactions are: it was inserted "
                    "into the past or its chain row was removed"
                ), None
        if max_lag_seconds is not None:
            lagging = await conn.fetchrow(
                queries["chain_lagging"], timedelta(seconds=max_lag_seconds), floor
            )
            if lagging is not None:
                return (
                    f"transaction {public_id(lagging['id'])} "
                    f"(created_at {_ts(lagging['created_at'])}) "
                    f"is not chained although transactions over {max_lag_seconds:g}s newer "
                    "are: is the chainer running?"
                ), None
    return None, verified
