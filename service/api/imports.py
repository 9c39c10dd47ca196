"""Bulk imports from CSV (API.md, "Directory and bulk import"): employees and
grants, set-based, each row idempotent by its natural key. The parsing and
the per-row rules are in service/imports.py."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from service import errors, imports
from service.api.approvals import needs_approval, request_batch_approval
from service.api.common import CSV, context_of
from service.auth import access
from service.journal import Database
from service.openapi import problems

# A CSV import may be larger than a JSON body: 100,000 rows of employees are
# about 8 MB.
IMPORT_MAX_BYTES = 32 * 1024 * 1024
# Grant rows per database transaction of an import.
GRANT_CHUNK_ROWS = 5000
# Chunks of one grant import posted at the same time (the machine's 2 cores).
IMPORT_CONCURRENCY = 2


class ImportRejected(msgspec.Struct, frozen=True, omit_defaults=True):
    """A row that changed nothing: its line in the file (the header is line 1), the
    error code, and why. `approval` names the pending approval a grant above
    TOKENLEDGER_APPROVAL_THRESHOLD waits for."""

    line: int
    code: str
    detail: str | None = None
    approval: str | None = None


class ImportResult(msgspec.Struct, frozen=True):
    """What the import did (or, with `dry_run`, would do): `rows` data rows, of which
    `created`, `updated` (employees only), `duplicate` (already so: nothing changed),
    and `rejected`."""

    rows: int
    created: int
    updated: int
    duplicate: int
    rejected: list[ImportRejected]


DryRun = Annotated[
    bool,
    QueryParameter(
        description="Report exactly what the import would do, and change nothing.",
    ),
]


async def csv_text(request: Request[Any, Any, Any]) -> str:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != CSV:
        raise errors.invalid("$", "Content-Type: text/csv", "the body must be text/csv")
    body = await request.body()
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise errors.invalid("$", "not UTF-8", "the CSV must be UTF-8") from None


CSV_BODY = {
    "required": True,
    "content": {
        CSV: {
            "schema": {"type": "string"},
        }
    },
}


class ImportsController(Controller):
    path = "/v1"
    tags = ["Directory"]

    @post(
        "/imports/employees",
        summary="Import employees from CSV",
        status_code=200,
        request_max_body_size=IMPORT_MAX_BYTES,
        opt={**access("directory.write"), **problems(), "csv_body": True},
    )
    async def import_employees(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        dry_run: DryRun = False,
    ) -> ImportResult:
        """`text/csv` with a header row of `id,name,email,department` (and optionally
        `status`, which may only say `active`), one employee per row, at most
        TOKENLEDGER_IMPORT_MAX_ROWS rows. Each row is idempotent by the employee id: a
        new id is `created` (and opens a wallet), a changed one `updated`, an unchanged
        one `duplicate`. A row with a malformed value, an unknown department
        (`department_not_found`), an offboarded employee (`account_closed`), or an id
        repeated with other values is rejected and changes nothing; the others are
        imported. An unknown, missing or repeated column answers 400 for the whole file.
        No Idempotency-Key is needed: uploading the file again changes nothing."""
        parsed = imports.parse(
            await csv_text(request), imports.EmployeeRow, ledger.config.import_max_rows
        )
        result: dict[str, Any] = {}
        rows = imports.employee_rows(parsed)
        if rows:
            result = await ledger.fetchval_long(
                "import_employees",
                ledger.config.report_statement_timeout_ms,
                rows,
                ledger.context_json(context_of(request)),
                rollback=dry_run,
            )
        return msgspec.convert(imports.summary(parsed, result), ImportResult)

    @post(
        "/imports/grants",
        summary="Import grants from CSV",
        status_code=200,
        request_max_body_size=IMPORT_MAX_BYTES,
        opt={**access("grants.write"), **problems(), "csv_body": True},
    )
    async def import_grants(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        dry_run: DryRun = False,
    ) -> ImportResult:
        """`text/csv` with a header row of the fields of a `POST /v1/grants:batch` item
        (`key,employee,amount,reason` and optionally `expires_at,effective_at,priority,
        funded_by,memo`). Each row is idempotent by its `key` (scoped to the caller, the
        same key space as `grants:batch`): `created` the first time, `duplicate` after;
        the same key with other values is rejected (`idempotency_key_reused`), as is a
        row that cannot be granted (its error code). A row above
        TOKENLEDGER_APPROVAL_THRESHOLD is not posted: it is rejected with
        `approval_required`, and those rows wait together in one pending approval
        (`approval`). `updated` is always 0. Rows are written 5,000 per database
        transaction, two at a time: if the request fails part way, sending the file again
        completes it."""
        parsed = imports.parse(
            await csv_text(request), imports.GrantRow, ledger.config.import_max_rows
        )
        ctx = context_of(request)
        items = imports.grant_items(parsed)
        firsts, repeats = imports.split_repeated_keys(items)
        held = [
            (line, item) for line, item in firsts if needs_approval(ledger, item["grant"]["amount"])
        ]
        to_post = [
            (line, item)
            for line, item in firsts
            if not needs_approval(ledger, item["grant"]["amount"])
        ]
        parts = [imports.repeated_key_results(firsts, repeats)]
        if held:
            approval_id = None
            if not dry_run:
                batch = [item for _, item in held]
                pending = await request_batch_approval(request, ledger, batch)
                approval_id = pending.content["approval"]["id"]
            parts.append(
                {
                    "rejected": [
                        {
                            "line": line,
                            "code": "approval_required",
                            "detail": (
                                f"{item['grant']['amount']} credits is above the approval "
                                "threshold; the grant waits for another caller's approval"
                            ),
                            "approval": approval_id,
                        }
                        for line, item in held
                    ]
                }
            )
        # In chunks, each its own transaction (and statement timeout): rows are
        # idempotent by key, so an import cut short is completed by sending the
        # file again. Keys repeated in the file were split out above, so chunks
        # never share a key and a dry run rolls each back on its own.
        # IMPORT_CONCURRENCY chunks at a time, each on its own connection: they
        # share no key, lock their wallets in id order (tl_lock) and post to
        # different shards of system:issuance, so they only wait for each
        # other on a wallet they both grant to.
        gate = asyncio.Semaphore(IMPORT_CONCURRENCY)

        async def post(chunk: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
            async with gate:
                answer = await ledger.fetchval_long(
                    "import_grants",
                    ledger.config.report_statement_timeout_ms,
                    ctx.caller,
                    [item for _, item in chunk],
                    ledger.context_json(ctx),
                    rollback=dry_run,
                )
            return imports.grant_result(chunk, answer["results"])

        parts += await asyncio.gather(
            *(post(chunk) for chunk in imports.chunks(to_post, GRANT_CHUNK_ROWS))
        )
        return msgspec.convert(imports.summary(parsed, imports.merge(*parts)), ImportResult)
