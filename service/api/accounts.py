"""Accounts and balances (API.md, Accounts and balances)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter

from service import errors
from service.api.common import (
    ADDRESS_NOT_FOUND,
    CursorParam,
    LimitParam,
    check_address,
    decode_cursor,
    int_cursor,
    invalid_cursor,
    page,
    page_of,
)
from service.api.resources import Account, Balance, EntriesPage, LotsPage, Series
from service.auth import access
from service.journal import Database
from service.openapi import problems

# A series may not ask for more points than this (hourly for ~6 weeks, daily
# for ~20 years): bounded work per request.
MAX_SERIES_POINTS = 1000


async def account_id(ledger: Database, address: str) -> int:
    check_address(address)
    found = await ledger.fetchval("account_id", address)
    if found is None:
        raise not_found(address)
    return int(found)


def not_found(address: str) -> errors.LedgerError:
    return errors.not_found_for(address)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def require_tz(value: datetime | None, name: str) -> None:
    if value is not None and value.tzinfo is None:
        raise errors.invalid(
            name, "timestamp without offset", f"{name} needs a UTC offset (RFC 3339)"
        )


class AccountsController(Controller):
    path = "/v1"
    tags = ["Accounts"]

    @get(
        "/accounts/{address:str}",
        summary="Balances of an account",
        opt={
            **access("balance.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def get_account(
        self, ledger: NamedDependency[Database], address: FromPath[str]
    ) -> Account:
        """Posted, reserved, pending and available credits, and what expires when."""
        check_address(address)
        body = await ledger.fetchval("account_json", address, ledger.now())
        if body is None:
            raise not_found(address)
        return body

    @get(
        "/me",
        summary="The calling employee's wallet",
        opt={**access("me"), **problems(errors.EmployeeNotFound)},
    )
    async def me(
        self, request: Request[Any, Any, Any], ledger: NamedDependency[Database]
    ) -> Account:
        principal = getattr(request.state, "principal", None)
        employee = getattr(principal, "employee", None)
        if employee is None:
            raise errors.AccountNotFound("the caller is not an employee and has no wallet")
        return await self.get_account.fn(self, ledger, f"employee:{employee}")

    @get(
        "/accounts/{address:str}/entries",
        summary="Entries of an account, newest first",
        opt={
            **access("history.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def entries(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
        from_: Annotated[datetime | None, QueryParameter(name="from")] = None,
        to: FromQuery[datetime | None] = None,
    ) -> EntriesPage:
        require_tz(from_, "from")
        require_tz(to, "to")
        acc = await account_id(ledger, address)
        after = int_cursor(cursor)
        if from_ is None and to is None:
            rows = await ledger.fetch("account_entries_latest", acc, after, limit + 1)
        else:
            rows = await ledger.fetch("account_entries", acc, after, from_, to, limit + 1)
        return page(rows, limit)

    @get(
        "/accounts/{address:str}/balance",
        summary="Posted balance as of an instant",
        opt={
            **access("balance.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def balance(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        at: FromQuery[datetime | None] = None,
    ) -> Balance:
        """The posted balance after every entry made at or before `at` (default now)."""
        require_tz(at, "at")
        acc = await account_id(ledger, address)
        when = at or ledger.now() or datetime.now(UTC)
        posted = await ledger.fetchval("balance_at", acc, when)
        return Balance(address=address, at=iso(when), posted=int(posted))

    @get(
        "/accounts/{address:str}/series",
        summary="Posted balance over time, for charts",
        opt={
            **access("history.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def series(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        from_: Annotated[datetime, QueryParameter(name="from")],
        to: FromQuery[datetime],
        interval: FromQuery[Literal["day", "hour"]] = "day",
    ) -> Series:
        """The posted balance at each step from `from` to `to` (both included), at most
        1000 points."""
        require_tz(from_, "from")
        require_tz(to, "to")
        step = timedelta(days=1) if interval == "day" else timedelta(hours=1)
        if to < from_:
            raise errors.InvalidRequest("to is before from", errors=[{"path": "to"}])
        if (to - from_) // step + 1 > MAX_SERIES_POINTS:
            raise errors.InvalidRequest(
                f"at most {MAX_SERIES_POINTS} points per series", errors=[{"path": "interval"}]
            )
        acc = await account_id(ledger, address)
        rows = await ledger.fetch("balance_series", acc, from_, to, step)
        items = [{"at": iso(r["at"]), "posted": int(r["posted"])} for r in rows]
        return Series(address=address, interval=interval, items=items)  # type: ignore[arg-type]  # why: dicts encode the same

    @get(
        "/accounts/{address:str}/lots",
        summary="Live lots in consumption order",
        opt={
            **access("history.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def lots(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> LotsPage:
        """Lots with credits left, in the order debits consume them (priority, then
        soonest expiry, then oldest). Lots with a future `effective_at` are listed too."""
        acc = await account_id(ledger, address)
        offset = decode_cursor(cursor) or 0
        if not isinstance(offset, int) or offset < 0:
            raise invalid_cursor()
        rows = await ledger.fetch("account_lots", acc, ledger.now(), offset, limit + 1)
        items = [r[0] for r in rows]
        return page_of(items[:limit], offset + limit if len(items) > limit else None)
