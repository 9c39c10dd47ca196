"""Grant programs (API.md, Grant programs): recurring allotments that the
service issues by itself, once per (program, cycle, employee).

The cycle arithmetic, the audience, the department budget and the
exactly-once claim all live in SQL (schema.sql, tl_program_run), so a run
is one round trip and two replicas running the same cycle cannot both
issue it. This module validates the definition's shape and maps HTTP to it.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from service import errors
from service.api.approvals import APPROVAL_RESPONSE, needs_approval, request_approval
from service.api.common import (
    ADDRESS_NOT_FOUND,
    MAX_AMOUNT,
    Amount,
    CursorParam,
    Funder,
    LimitParam,
    Ref,
    check_ref,
    check_time_zone,
    context_of,
    page,
    put_response,
    text_cursor,
    uuid_cursor,
)
from service.api.grants import Reason
from service.api.resources import Program, ProgramRun, ProgramRunsPage, ProgramsPage
from service.auth import access
from service.errors import invalid
from service.journal import Database
from service.openapi import problems, statuses
from service.programs import run_cycle

CYCLE_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
Cycle = Annotated[
    str, msgspec.Meta(pattern=CYCLE_PATTERN, description="`YYYY-MM`.", examples=["2026-12"])
]
MAX_AUDIENCE_LIST = 10_000


class Cadence(msgspec.Struct, forbid_unknown_fields=True):
    every: Literal["month"]
    day: Annotated[
        int,
        msgspec.Meta(
            ge=1, le=28, description="Day of the month a cycle starts, at local midnight."
        ),
    ]


class Audience(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of: `all: true`, `departments`, `employees`."""

    all: bool | None = None
    departments: Annotated[list[Ref], msgspec.Meta(min_length=1, max_length=1000)] | None = None
    employees: (
        Annotated[list[Ref], msgspec.Meta(min_length=1, max_length=MAX_AUDIENCE_LIST)] | None
    ) = None


class Expiry(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of: `at: "end_of_cycle"`, `after_days`."""

    at: Literal["end_of_cycle"] | None = None
    after_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] | None = None


class ProgramIn(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount
    reason: Reason
    cadence: Cadence
    audience: Audience
    starts_on: date
    active: bool
    expiry: Expiry | None = None
    rollover_max: Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)] | None = None
    funded_by: Funder = "system:issuance"
    ends_on: date | None = None
    prorate: bool = False
    time_zone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"


class RunIn(msgspec.Struct, forbid_unknown_fields=True):
    cycle: Cycle


def program_args(program_id: str, data: ProgramIn) -> dict[str, Any]:
    """The definition in its stored form, after the checks a schema cannot
    express (exactly one audience and expiry form, rollover only with
    end-of-cycle expiry, a known time zone, ends_on not before starts_on)."""
    audience = data.audience
    forms = [
        name
        for name, value in (
            ("all", audience.all),
            ("departments", audience.departments),
            ("employees", audience.employees),
        )
        if value is not None
    ]
    if len(forms) != 1:
        raise invalid("$.audience", "give exactly one of all, departments, employees")
    if audience.all is False:
        raise invalid("$.audience.all", "all must be true (use departments or employees)")
    stored_audience: dict[str, Any] = {forms[0]: msgspec.to_builtins(getattr(audience, forms[0]))}
    for name in ("departments", "employees"):
        members = stored_audience.get(name)
        if members is not None:
            if len(set(members)) != len(members):
                raise invalid(f"$.audience.{name}", f"{name} lists an id twice")
            stored_audience[name] = sorted(members)
    expiry: dict[str, Any] | None = None
    if data.expiry is not None:
        if (data.expiry.at is None) == (data.expiry.after_days is None):
            raise invalid("$.expiry", "give exactly one of at, after_days (or null: never)")
        expiry = (
            {"at": data.expiry.at}
            if data.expiry.at is not None
            else {"after_days": data.expiry.after_days}
        )
    if data.rollover_max is not None and expiry != {"at": "end_of_cycle"}:
        raise invalid("$.rollover_max", 'rollover needs expiry {"at": "end_of_cycle"}')
    if data.ends_on is not None and data.ends_on < data.starts_on:
        raise invalid("$.ends_on", "ends_on must not be before starts_on")
    check_time_zone(data.time_zone, "$.time_zone")
    return {
        "id": program_id,
        "amount": data.amount,
        "reason": data.reason,
        "cadence": {"every": "month", "day": data.cadence.day},
        "audience": stored_audience,
        "expiry": expiry,
        "rollover_max": data.rollover_max,
        "funded_by": data.funded_by,
        "starts_on": data.starts_on.isoformat(),
        "ends_on": data.ends_on.isoformat() if data.ends_on else None,
        "active": data.active,
        "prorate": data.prorate,
        "time_zone": data.time_zone,
    }


async def require_program(ledger: Database, program_id: str) -> None:
    if not await ledger.fetchval("program_exists", program_id):
        raise errors.GrantProgramNotFound(f"no grant program {program_id}", program=program_id)


class ProgramsController(Controller):
    path = "/v1"
    tags = ["Grant programs"]

    @put(
        "/grant-programs/{program_id:str}",
        summary="Create or update a grant program",
        opt={
            **access("programs.write"),
            **problems(*ADDRESS_NOT_FOUND),
            **statuses(201),
        },
    )
    async def put_program(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        program_id: FromPath[str],
        data: JSONBody[ProgramIn],
    ) -> Response[Program]:
        """201 when created, 200 when updated (its `version` goes up). A change applies
        to cycles run after it; grants already issued keep their lots. Cycles start at
        local midnight of `cadence.day` in `time_zone`; the first is the first to start on
        or after `starts_on`, the last the last to start on or before `ends_on`. Named
        departments and employees must exist (404)."""
        check_ref(program_id, "program_id")
        args = program_args(program_id, data)
        result = await ledger.call("put_program", args, context_of(request))
        return put_response(result)

    @get(
        "/grant-programs",
        summary="List grant programs",
        opt={**access("programs.read"), **problems()},
    )
    async def list_programs(
        self,
        ledger: NamedDependency[Database],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> ProgramsPage:
        """By id."""
        rows = await ledger.fetch("programs_page", text_cursor(cursor), limit + 1, ledger.now())
        return page(rows, limit)

    @get(
        "/grant-programs/{program_id:str}",
        summary="Get a grant program",
        opt={**access("programs.read"), **problems(errors.GrantProgramNotFound)},
    )
    async def get_program(
        self, ledger: NamedDependency[Database], program_id: FromPath[str]
    ) -> Program:
        """With `current_cycle` (the cycle in progress, if the program covers it) and
        `next_cycle`."""
        body = await ledger.fetchval("program_json", program_id, ledger.now())
        if body is None:
            raise errors.GrantProgramNotFound(f"no grant program {program_id}", program=program_id)
        return body

    @post(
        "/grant-programs/{program_id:str}/runs",
        summary="Issue a cycle of a grant program",
        status_code=200,
        responses=APPROVAL_RESPONSE,
        opt={
            **access("programs.write"),
            **problems(
                errors.GrantProgramNotFound, errors.InsufficientCredits, errors.BalanceLimitExceeded
            ),
        },
    )
    async def run_program(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        program_id: FromPath[str],
        data: JSONBody[RunIn],
    ) -> ProgramRun:
        """Issues the cycle's grant to every active member of the audience who does not
        have it yet. Running it again, or at the same time
        from another replica, issues nothing new: each (program, cycle, employee) has at
        most one grant, enforced by a unique key. `skipped` counts the members left out
        by reason; `skipped_employees` names them, except `already_granted`. A department
        funder covers members in ascending employee id while its credits last. Members are
        issued in batches (TOKENLEDGER_PROGRAM_RUN_BATCH_SIZE per database transaction);
        if the request fails half way, running it again completes it. A cycle that has
        not started yet, or lies outside the program, answers 400. The Idempotency-Key
        header is not needed: the run itself is idempotent. When the program's amount is
        above TOKENLEDGER_APPROVAL_THRESHOLD (when set), the first request answers 202
        with a pending approval and issues nothing; once another hr or admin caller has
        approved it, the approval runs the cycle, and so does this request again."""
        threshold = ledger.config.approval_threshold
        if threshold is not None:
            program = await ledger.fetchval("program_json", program_id, ledger.now())
            if program is None:
                raise errors.GrantProgramNotFound(
                    f"no grant program {program_id}", program=program_id
                )
            if needs_approval(ledger, int(program["amount"])):
                ctx = context_of(request)
                dedup = f"program_run:{program_id}:{data.cycle}"
                found = await ledger.fetchval("approval_find", ctx.caller, dedup)
                if found is None or found["status"] != "approved":
                    request_body = {"program": program_id, "cycle": data.cycle}
                    return await request_approval(  # type: ignore[return-value]  # why: the 202 answer
                        request, ledger, data, "program_run", request_body, dedup_key=dedup
                    )
        return await run_cycle(ledger, program_id, data.cycle, "api", context_of(request))

    @get(
        "/grant-programs/{program_id:str}/runs",
        summary="Runs of a grant program",
        opt={**access("programs.read"), **problems(errors.GrantProgramNotFound)},
    )
    async def list_runs(
        self,
        ledger: NamedDependency[Database],
        program_id: FromPath[str],
        cycle: Annotated[
            str | None, QueryParameter(pattern=CYCLE_PATTERN, description="Only this cycle.")
        ] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> ProgramRunsPage:
        """Newest first: API runs, scheduler runs and onboarding grants, each with what
        it issued and skipped, and when."""
        await require_program(ledger, program_id)
        rows = await ledger.fetch(
            "program_runs_page", program_id, cycle, uuid_cursor(cursor), limit + 1
        )
        return page(rows, limit)
