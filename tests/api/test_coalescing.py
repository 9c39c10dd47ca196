"""Coalescing (service/coalesce.py, tl_execute_batch): concurrent hot-path
operations share one database call, and each still gets its own outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service import errors
from service.api.common import parse_public_id
from service.coalesce import Coalescer, Item
from service.journal import Database, request_hash
from tests.api.conftest import Api, assert_audit_clean, key, posted, problem


def ledger_of(client: Any) -> Database:
    ledger: Database = client.app.state.ledger
    return ledger


def item(op: str, args: dict[str, Any], key: str | None, *, status: int = 201) -> Item:
    """An operation as run_operation would hand it over, with the body as its fingerprint."""
    path = {"debit": "/v1/debits", "capture": "/x/capture", "release": "/x/release"}.get(op, op)
    return Item(
        caller="test-caller",
        key=key,
        fingerprint=request_hash("POST", path, args),
        op=op,
        success_status=status,
        args=args,
        # An admin's context: these items act on reservations the tests made
        # through the API with another key (only its maker or an admin may).
        ctx={"actor": "test-caller", "request_id": "req-test", "now": None, "admin": True},
    )


def batch_totals(ledger: Database) -> tuple[float, float]:
    """(items, batches) the batch-size histogram has seen: items exceed
    batches exactly when some batch held more than one item."""
    values = {
        sample.name: sample.value
        for metric in ledger.metrics.coalesced_batch_size.collect()
        for sample in metric.samples
    }
    return values["tokenledger_coalesced_batch_size_sum"], values[
        "tokenledger_coalesced_batch_size_count"
    ]


async def test_batch_mixes_outcomes_without_failing_the_others(client: Any, api: Api) -> None:
    """One batch holding a success, an insufficient-credits rejection, a replay
    of a committed key, a reused key and an unknown account answers each item
    as it would have been answered alone, and commits only the successes."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    ledger = ledger_of(client)
    first = item("debit", {"account": "employee:e-1", "amount": 10}, "k-first")
    second = item("debit", {"account": "employee:e-1", "amount": 10}, "k-second")
    done, _ = await ledger._execute_batch([first, second])
    assert done["status"] == 201 and not done["replayed"]

    results = await ledger._execute_batch(
        [
            item("debit", {"account": "employee:e-1", "amount": 30}, "k-ok"),
            item("debit", {"account": "employee:e-1", "amount": 500}, "k-poor"),
            first,  # the same key and body again: a replay
            item("debit", {"account": "employee:e-1", "amount": 11}, "k-second"),  # reused
            item("debit", {"account": "employee:nobody", "amount": 1}, "k-missing"),
            item("debit", {"account": "employee:e-1", "amount": 5}, "k-ok-2"),
        ]
    )
    ok, poor, replay, reused, missing, ok2 = results
    assert ok["status"] == 201 and not ok["replayed"]
    assert poor["status"] == 409 and poor["body"]["code"] == "insufficient_credits"
    assert poor["body"]["extra"]["available"] == 50
    assert replay == {**done, "replayed": True}
    assert isinstance(reused, errors.IdempotencyKeyReused)
    assert isinstance(missing, errors.EmployeeNotFound)
    assert ok2["status"] == 201
    assert await api.available("employee:e-1") == 100 - 10 - 10 - 30 - 5

    # The rejection was stored with its key; the unknown account's key was
    # given back, so a corrected retry under it goes through.
    [again] = await ledger._execute_batch(
        [item("debit", {"account": "employee:e-1", "amount": 500}, "k-poor")]
    )
    assert again["status"] == 409 and again["replayed"]
    await api.employee("nobody")
    await api.grant("nobody", 5)
    [retried] = await ledger._execute_batch(
        [item("debit", {"account": "employee:nobody", "amount": 1}, "k-missing")]
    )
    assert retried["status"] == 201
    await assert_audit_clean(str(ledger.config.database_url))


async def test_hot_wallet_in_one_batch_applies_in_arrival_order(client: Any, api: Api) -> None:
    """Debits of one wallet in one batch are applied in arrival order: with 25
    credits, 10 + 10 succeed, the third 10 is refused, and the 5 after it fits."""
    await api.employee("e-1")
    await api.grant("e-1", 25)
    ledger = ledger_of(client)
    amounts = [10, 10, 10, 5]
    results = await ledger._execute_batch(
        [
            item("debit", {"account": "employee:e-1", "amount": a}, f"k-{i}")
            for i, a in enumerate(amounts)
        ]
    )
    assert [r["status"] for r in results] == [201, 201, 409, 201]
    assert [r["body"]["entries"][0]["balance_after"] for r in results if r["status"] == 201] == [
        15,
        5,
        0,
    ]


async def test_capture_and_release_in_one_batch_exactly_one_wins(client: Any, api: Api) -> None:
    """A capture and a release of the same reservation in one batch: the first
    resolves it, the second answers reservation_not_active; the credits move once."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    r = await client.post(
        "/v1/reservations", json={"account": "employee:e-1", "amount": 40}, headers=key()
    )
    assert r.status_code == 201, r.text
    public = r.json()["id"]
    rid = str(parse_public_id(public, "rsv_", errors.ReservationNotFound))
    ledger = ledger_of(client)
    usage_before = await posted(api, "system:usage")
    capture, release = await ledger._execute_batch(
        [
            item(
                "capture",
                {"reservation": public, "reservation_id": rid, "amount": 25},
                "k-cap",
                status=200,
            ),
            item("release", {"reservation": public, "reservation_id": rid}, "k-rel", status=200),
        ]
    )
    assert capture["status"] == 200 and capture["body"]["reservation"]["status"] == "captured"
    assert release["status"] == 409
    assert release["body"]["code"] == "reservation_not_active"
    assert release["body"]["extra"]["status"] == "captured"
    assert await posted(api, "system:usage") - usage_before == 25
    account = await api.account("employee:e-1")
    assert (account["posted"], account["reserved"]) == (75, 0)
    await assert_audit_clean(str(ledger.config.database_url))


async def test_concurrent_debits_on_a_wallet_covering_twenty(client: Any, api: Api) -> None:
    """32 concurrent debits of 5 on a wallet holding 100: exactly 20 succeed,
    the other 12 answer insufficient_credits, and some went in shared batches."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    ledger = ledger_of(client)
    items_before, batches_before = batch_totals(ledger)
    responses = await asyncio.gather(*(api.debit("employee:e-1", 5) for _ in range(32)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 20 + [409] * 12, statuses
    for r in responses:
        if r.status_code == 409:
            problem(r, 409, "insufficient_credits")
    assert await api.available("employee:e-1") == 0
    items, batches = batch_totals(ledger)
    assert items - items_before == 32
    assert batches - batches_before < 32, "no two debits shared a call"
    await assert_audit_clean(str(ledger.config.database_url))


async def test_whole_batch_failure_reruns_items_one_by_one(
    client: Any, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the batch call itself fails with a database error, every item is
    run again on its own: the good ones succeed once, each gets its own answer."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    ledger = ledger_of(client)
    real = ledger.queries["execute_batch"]
    # A statement that fails as a whole, as a timeout or a bug would.
    monkeypatch.setitem(
        ledger.queries,
        "execute_batch",
        "SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7) WHERE 1 / (cardinality($1) - 3) > 0",
    )
    results = await ledger._execute_batch(
        [
            item("debit", {"account": "employee:e-1", "amount": 30}, "k-a"),
            item("debit", {"account": "employee:e-1", "amount": 500}, "k-b"),
            item("debit", {"account": "employee:e-1", "amount": 20}, "k-c"),
        ]
    )
    monkeypatch.setitem(ledger.queries, "execute_batch", real)
    a, b, c = results
    assert a["status"] == 201 and c["status"] == 201
    assert b["status"] == 409 and b["body"]["code"] == "insufficient_credits"
    assert await api.available("employee:e-1") == 50


async def test_coalescer_defers_a_repeated_key_and_answers_each_waiter() -> None:
    """Two submissions under one key never share a batch (the second waits for
    the next call), lone submissions start at once, and a runner's exception
    reaches every waiter of its batch."""
    calls: list[list[str | None]] = []
    gate = asyncio.Event()

    async def run(items: list[Item]) -> list[Any]:
        calls.append([i.key for i in items])
        await gate.wait()
        keys = [i.key for i in items]
        return [
            ValueError(i.key) if i.key == "bad" else {"key": i.key, "batch": keys} for i in items
        ]

    coalescer = Coalescer(run, max_batch=8, max_in_flight=1)
    lone = asyncio.create_task(coalescer.submit(item("debit", {}, "a")))
    for _ in range(3):  # the submitting task, then the call it starts
        await asyncio.sleep(0)
    assert calls == [["a"]], "a lone submission must start its call at once"
    queued = [
        asyncio.create_task(coalescer.submit(item("debit", {}, k))) for k in ("b", "c", "b", "bad")
    ]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(lone, *queued, return_exceptions=True)
    assert calls == [["a"], ["b", "c", "bad"], ["b"]]
    assert results[0] == {"key": "a", "batch": ["a"]}
    assert results[1] == {"key": "b", "batch": ["b", "c", "bad"]}
    assert results[3] == {"key": "b", "batch": ["b"]}
    assert isinstance(results[4], ValueError)


async def test_set_based_debits_take_only_wallets_with_nothing_due(
    client: Any, api: Api, clock: Any
) -> None:
    """tl_debit_fast takes the debits of a clean wallet and leaves those of a
    wallet with a lot past its expiry to tl_op_debit, which expires it first:
    both answer as a lone debit would."""
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 3, 1, tzinfo=UTC)
    clock.set(start)
    await api.employee("e-clean")
    await api.employee("e-due")
    await api.grant("e-clean", 50)
    await api.grant("e-due", 30, expires_at=(start + timedelta(days=1)).isoformat())
    await api.grant("e-due", 40)
    clock.set(start + timedelta(days=2))
    ledger = ledger_of(client)
    items = [
        item("debit", {"account": "employee:e-clean", "amount": 20}, "k-c1"),
        item("debit", {"account": "employee:e-due", "amount": 25}, "k-d1"),
        item("debit", {"account": "employee:e-clean", "amount": 20}, "k-c2"),
    ]
    for i in items:
        i.ctx["now"] = clock.now.isoformat()
    async with ledger.pool.acquire() as conn:
        probe = conn.transaction()
        await probe.start()
        try:
            taken = await conn.fetchval(
                "SELECT tl_debit_fast($1, $2, $3, $4, $5)",
                [i.op for i in items],
                [i.args for i in items],
                [i.ctx for i in items],
                [201] * 3,
                [True] * 3,
            )
        finally:
            await probe.rollback()  # the real run below starts from the same state
    assert [t is not None for t in taken] == [True, False, True]

    clean1, due, clean2 = await ledger._execute_batch(items)
    assert [r["status"] for r in (clean1, due, clean2)] == [201, 201, 201]
    assert [e["balance_after"] for e in clean1["body"]["entries"]][:1] == [30]
    assert [e["balance_after"] for e in clean2["body"]["entries"]][:1] == [10]
    assert due["body"]["entries"][0]["balance_after"] == 15  # 30 expired first, then 40 - 25
    assert await api.available("employee:e-due") == 15
    expired = await client.get("/v1/transactions", params={"kind": "expiry"})
    assert len(expired.json()["items"]) == 1
    await assert_audit_clean(str(ledger.config.database_url))


def _canon(value: Any, names: dict[str, str]) -> Any:
    """An answer with the ids it mints (reservations, transactions) and
    per-wallet names replaced by stable labels, and instants (and the shared
    system:usage's running balance) dropped, so
    that two runs on two wallets compare equal exactly when they decided
    the same things."""
    if isinstance(value, dict):
        # system:usage is shared by both twins: its balance differs between the runs.
        shared = value.get("account") == "system:usage"
        return {
            k: _canon(v, names)
            for k, v in value.items()
            if k not in ("created_at", "resolved_at", "expires_at", "request_id")
            and not (shared and k in ("balance_after", "version"))
        }
    if isinstance(value, list):
        return [_canon(v, names) for v in value]
    if isinstance(value, str):
        if value.startswith(("rsv_", "txn_", "lot_")):
            return names.setdefault(value, f"{value[:4]}{len(names)}")
        for old, new in names.items():
            value = value.replace(old, new)
    return value


async def _wallet_state(client: Any, address: str, names: dict[str, str]) -> Any:
    account = (await client.get(f"/v1/accounts/{address}")).json()
    lots = (await client.get(f"/v1/accounts/{address}/lots")).json()
    reservations = (await client.get(f"/v1/accounts/{address}/reservations")).json()
    state = {
        "account": {k: account[k] for k in ("posted", "reserved", "available", "version")},
        "lots": sorted(
            (lot["amount"], lot["remaining"], lot["reserved"], lot["priority"])
            for lot in lots["items"]
        ),
        "reservations": sorted(
            (r["amount"], r["status"], r["captured"], len(r["holds"]))
            for r in reservations["items"]
        ),
    }
    return _canon(state, names)


def reservation_item(
    kind: str, args: dict[str, Any], rsv: str | None, key: str, *, status: int = 201
) -> Item:
    """item(), with the reservation's public and internal id for captures and releases."""
    if rsv is not None:
        rid = parse_public_id(rsv, "rsv_", errors.ReservationNotFound)
        args = {"reservation": rsv, "reservation_id": str(rid), **args}
    return item(kind, args, key, status=status)


async def fast_items(ledger: Database, items: list[Item]) -> list[bool]:
    """Which items tl_batch_fast would take set-based (in a transaction rolled back)."""
    async with ledger.pool.acquire() as conn:
        probe = conn.transaction()
        await probe.start()
        try:
            taken = await conn.fetchval(
                "SELECT tl_batch_fast($1, $2, $3, $4, $5)",
                [i.op for i in items],
                [i.args for i in items],
                [i.ctx for i in items],
                [i.success_status for i in items],
                [True] * len(items),
            )
        finally:
            await probe.rollback()
    return [t is not None for t in taken]


async def run_twin(ledger: Database, twin: str, items: list[Item], one_by_one: bool) -> list[Any]:
    """A twin's items run one by one, or set-based in one coalesced batch (all of
    them must go set-based), and their answers with the twin's name as TWIN: what
    the two ways of a differential test must agree on."""
    if one_by_one:
        results = [await ledger._execute_one(i) for i in items]
    else:
        assert await fast_items(ledger, items) == [True] * len(items)
        results = await ledger._execute_batch(items)
    names = {twin: "TWIN"}
    return [
        (r["status"], _canon(r["body"], names)) if isinstance(r, dict) else repr(r) for r in results
    ]


async def test_set_based_reservations_decide_as_one_by_one(client: Any, api: Api) -> None:
    """A batch of reserves, captures (under, exactly and over the held
    amount), a release, and debits and a reserve beyond what is left, on one
    wallet with several lots, goes set-based and answers and leaves the
    wallet exactly as the same operations run one by one in the same order
    on a twin wallet."""
    ledger = ledger_of(client)
    outcomes = {}
    states = {}
    for twin, one_by_one in (("e-batch", False), ("e-single", True)):
        await api.employee(twin)
        await api.grant(twin, 30, priority=10)
        await api.grant(twin, 50)
        await api.grant(twin, 40, expires_at="2999-01-01T00:00:00Z")
        address = f"employee:{twin}"
        # Reservations made beforehand, captured and released in the batch.
        held = []
        for amount in (25, 35, 15, 5):
            r = await client.post(
                "/v1/reservations", json={"account": address, "amount": amount}, headers=key()
            )
            assert r.status_code == 201, r.text
            held.append(r.json()["id"])
        keys = (f"{twin}-{k}" for k in range(100))
        reserve = {"account": address, "ttl_seconds": 600, "metadata": None}
        items = [
            reservation_item(
                "reserve", {**reserve, "amount": 20, "metadata": {"a": 1}}, None, next(keys)
            ),
            # Under the held amount: 15 of the 25 are free again.
            reservation_item(
                "capture", {"amount": 10, "metadata": None}, held[0], next(keys), status=200
            ),
            reservation_item("debit", {"account": address, "amount": 7}, None, next(keys)),
            # Over by 10, taken from free credits.
            reservation_item(
                "capture", {"amount": 45, "metadata": {"m": "x"}}, held[1], next(keys), status=200
            ),
            reservation_item("release", {}, held[2], next(keys), status=200),
            reservation_item("reserve", {**reserve, "amount": 500}, None, next(keys)),
            reservation_item(
                "capture", {"amount": 5, "metadata": None}, held[3], next(keys), status=200
            ),
            reservation_item(
                "reserve", {**reserve, "amount": 33, "ttl_seconds": 60}, None, next(keys)
            ),
            reservation_item("debit", {"account": address, "amount": 1000}, None, next(keys)),
        ]
        outcomes[twin] = await run_twin(ledger, twin, items, one_by_one)
        states[twin] = await _wallet_state(client, address, {twin: "TWIN"})
    assert [o[0] for o in outcomes["e-batch"]] == [201, 200, 201, 200, 200, 409, 200, 201, 409]
    assert outcomes["e-batch"] == outcomes["e-single"]
    assert states["e-batch"] == states["e-single"]
    await assert_audit_clean(str(ledger.config.database_url))
