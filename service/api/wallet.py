"""What a wallet spent over a period (issue 15: the wallet page).

The employee's page shows spend by model and project this month and a
trailing-30-day burn rate. Employees may not read the usage reports (they
cover everyone), and paging through a busy wallet's entries to add them up
would cost the page a request per 500 entries, so the page asks this one
question of its own account: one query on the account's own indexes.
"""

from __future__ import annotations

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from service import reports
from service.api.accounts import account_id, iso
from service.api.common import ADDRESS_NOT_FOUND, From, To
from service.auth import access
from service.journal import Database
from service.openapi import problems


class SpendDay(msgspec.Struct, frozen=True):
    day: str
    credits: int


class SpendModel(msgspec.Struct, frozen=True):
    """Spend under one model and project; `model` null: spend that names no
    model (a debit without one, say); `project` null: no project."""

    model: str | None
    project: str | None
    events: int
    credits: int


class Spend(msgspec.Struct, frozen=True):
    """Every debit, usage event and capture (net of reversals of them), by when
    the journal recorded it: in total, per UTC day, and per model and project.
    `models` adds up to `credits`."""

    address: str
    from_: str = msgspec.field(name="from")
    to: str = ""
    credits: int = 0
    days: list[SpendDay] = []
    models: list[SpendModel] = []


class WalletController(Controller):
    path = "/v1"
    tags = ["Accounts"]

    @get(
        "/accounts/{address:str}/spend",
        summary="What an account spent over a period, per day and per model",
        opt={
            **access("history.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def spend(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        from_: From,
        to: To,
    ) -> Spend:
        """Credits spent in `[from, to)` (debits, usage and captures, net of their
        reversals): in total, per UTC day, and per model and project, where a
        usage charge counts under its events' model and project, a debit or
        capture under its metadata's `model` and `project` (a capture of an
        estimate: the estimate's model), and spend without a model under
        `model: null`. Employees may ask about their own wallet."""
        reports.check_period(from_, to)
        acc = await account_id(ledger, address)
        body = await ledger.fetchval("account_spend", acc, from_, to)
        return Spend(
            address=address,
            from_=iso(from_),
            to=iso(to),
            credits=int(body["credits"]),
            days=[SpendDay(**d) for d in body["days"]],
            models=[SpendModel(**m) for m in body["models"]],
        )
