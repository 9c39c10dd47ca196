"""Departments and employees (API.md, Directory)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from service import errors
from service.api.common import (
    REF_PATTERN,
    CursorParam,
    LimitParam,
    Memo,
    Name,
    Page,
    Ref,
    check_ref,
    context_of,
    page,
    put_response,
    run_operation,
    text_cursor,
)
from service.api.resources import Department, Employee, EmployeeListItem
from service.auth import access
from service.journal import Database
from service.openapi import problems, statuses


class DepartmentIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    parent: Ref | None = None


Email = Annotated[
    str,
    msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320, examples=["ada@example.com"]),
]


class EmployeeIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    email: Email
    department: Ref
    # Given explicitly, "active" re-hires an offboarded employee; left out,
    # an offboarded employee answers 409 account_closed as before.
    status: Literal["active"] | msgspec.UnsetType = msgspec.UNSET


class EmployeesPage(Page, frozen=True):
    items: list[EmployeeListItem]


class DepartmentsPage(Page, frozen=True):
    items: list[Department]


class OffboardIn(msgspec.Struct, forbid_unknown_fields=True):
    memo: Memo | None = None


class DirectoryController(Controller):
    path = "/v1"
    tags = ["Directory"]

    @put(
        "/departments/{department_id:str}",
        summary="Create or update a department",
        opt={**access("directory.write"), **problems(errors.DepartmentNotFound), **statuses(201)},
    )
    async def put_department(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        department_id: FromPath[str],
        data: JSONBody[DepartmentIn],
    ) -> Response[Department]:
        """Opens `department:{id}` on first creation. 201 when created, 200 when updated."""
        check_ref(department_id, "department_id")
        args = {"id": department_id, **msgspec.to_builtins(data)}
        result = await ledger.call("put_department", args, context_of(request))
        return put_response(result)

    @get(
        "/departments/{department_id:str}",
        summary="Get a department",
        opt={**access("directory.read"), **problems(errors.DepartmentNotFound)},
    )
    async def get_department(
        self, ledger: NamedDependency[Database], department_id: FromPath[str]
    ) -> Department:
        body = await ledger.fetchval("department_json", department_id)
        if body is None:
            raise errors.DepartmentNotFound(
                f"no department {department_id}", department=department_id
            )
        return body

    @get(
        "/departments",
        summary="List departments",
        opt={**access("directory.read"), **problems()},
    )
    async def list_departments(
        self,
        ledger: NamedDependency[Database],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> DepartmentsPage:
        """By id (keyset pagination: stable while departments are added)."""
        rows = await ledger.fetch("departments_page", text_cursor(cursor), limit + 1)
        return page(rows, limit)

    @get(
        "/employees",
        summary="List and search employees",
        opt={**access("directory.read"), **problems()},
    )
    async def list_employees(
        self,
        ledger: NamedDependency[Database],
        department: Annotated[
            str | None, QueryParameter(pattern=REF_PATTERN, description="Only this department.")
        ] = None,
        status: Annotated[
            Literal["active", "offboarded"] | None, QueryParameter(description="Only this status.")
        ] = None,
        q: Annotated[
            str | None,
            QueryParameter(
                min_length=1,
                max_length=200,
                description="Case-insensitive prefix of the id, the name or the email.",
            ),
        ] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> EmployeesPage:
        """By id, with keyset pagination: a page never repeats or skips an employee while
        others are added. `q` matches the start of the id, the name or the email, ignoring
        case (each has an index); `_` and `%` match themselves."""
        search = q.lower() if q is not None else None
        if search is not None and "\x00" in search:
            raise errors.InvalidRequest("q must not contain NUL", errors=[{"path": "q"}])
        rows = await ledger.fetch(
            "employees_page",
            text_cursor(cursor),
            department,
            status,
            search,
            limit + 1,
        )
        return page(rows, limit)

    @put(
        "/employees/{employee_id:str}",
        summary="Create or update an employee",
        opt={
            **access("directory.write"),
            **problems(errors.DepartmentNotFound, errors.AccountClosed),
            **statuses(201),
        },
    )
    async def put_employee(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        employee_id: FromPath[str],
        data: JSONBody[EmployeeIn],
    ) -> Response[Employee]:
        """Opens the wallet `employee:{id}` on first creation. 201 when created, 200 when
        updated; an offboarded employee answers 409 `account_closed`, unless the body says
        `status: "active"`: that re-hires them (the wallet reopens empty, its history
        stays, and they join grant-program audiences again). An employee who joins
        the audience of an active grant program (created, or moved into an audience
        department) gets the current cycle's grant in the same transaction, prorated when
        the program says so."""
        check_ref(employee_id, "employee_id")
        args = {"id": employee_id, **msgspec.to_builtins(data)}
        result = await ledger.call("put_employee", args, context_of(request))
        for run in result.get("program_runs") or ():
            ledger.metrics.record_program_run(run)
        return put_response(result)

    @get(
        "/employees/{employee_id:str}",
        summary="Get an employee with their wallet balance",
        opt={**access("directory.read"), **problems(errors.EmployeeNotFound)},
    )
    async def get_employee(
        self, ledger: NamedDependency[Database], employee_id: FromPath[str]
    ) -> Employee:
        body = await ledger.fetchval("employee_json", employee_id, ledger.now())
        if body is None:
            raise errors.EmployeeNotFound(f"no employee {employee_id}", employee=employee_id)
        return body

    @post(
        "/employees/{employee_id:str}/offboard",
        summary="Offboard an employee",
        status_code=200,
        opt={
            **access("directory.write"),
            **problems(
                errors.EmployeeNotFound,
                errors.AccountClosed,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def offboard(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        employee_id: FromPath[str],
        data: JSONBody[OffboardIn | None] = None,
    ) -> Response[Employee]:
        """Closes the wallet: active reservations are released and remaining lots are
        voided back to their funding accounts, in one transaction. Later writes to the
        wallet answer 409 `account_closed`. Requires an `Idempotency-Key`."""
        payload = data or OffboardIn()
        args = {"employee": employee_id, **msgspec.to_builtins(payload)}
        return await run_operation(
            request, ledger, "offboard", payload, args=args, success_status=200
        )
