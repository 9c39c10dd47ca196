"""The served OpenAPI schema, made to tell the truth (issue 11).

Litestar builds the document from the handlers. What it cannot know, this
module adds once, the first time the document is served:

* request and response bodies are described by msgspec's own JSON Schema of
  the Structs (msgspec is what decodes them): `additionalProperties: false`
  where a Struct forbids unknown fields, constraints kept inside `X | null`;
* the formats of path and query parameters the handlers check themselves;
* the `Idempotency-Key` header where an operation requires it;
* "exactly one of" rules between optional fields;
* no security requirement on the public routes;
* each operation's own success statuses and error answers (route options
  `statuses` and `problems`, below), never every code on every operation.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.openapi.plugins import JsonRenderPlugin

from service import errors
from service.api.common import (
    ADDRESS_PATTERN,
    IDEMPOTENCY_HEADER,
    MAX_IDEMPOTENCY_KEY,
    REF_PATTERN,
)
from service.reports import GROUP_KEYS, MAX_TAG_KEYS
from service.roles import ROLES

PROBLEM_JSON = "application/problem+json"
_STATE_KEY = "openapi_contract_applied"

# Path parameters the handlers check (check_ref, check_address) or parse
# (parse_public_id: anything else is a 404, which the pattern also says).
PATH_PATTERNS = {
    "address": ADDRESS_PATTERN,
    "employee_id": REF_PATTERN,
    "department_id": REF_PATTERN,
    "program_id": REF_PATTERN,
    "reservation_id": r"^rsv_[0-9a-f]{32}$",
    "transaction_id": r"^txn_[0-9a-f]{32}$",
    "lot_id": r"^lot_[0-9a-f]{32}$",
    "webhook_id": r"^wh_[0-9a-f]{32}$",
    "delivery_id": r"^dlv_[0-9a-f]{32}$",
}
# Query parameters of the same kinds.
QUERY_PATTERNS = {
    "account": ADDRESS_PATTERN,
    "cursor": r"^[A-Za-z0-9_-]+$",
}

# Query parameters whose whole schema Litestar cannot state: group_by is a
# comma list of distinct keys (service.reports.parse_group_by).
QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "group_by": {
        "style": "form",
        "explode": False,
        "schema": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"enum": list(GROUP_KEYS)},
                    # service.reports: a tag key, at most MAX_TAG_KEYS of them.
                    {"type": "string", "pattern": "^tag:[^,\\s]([^,]{0,62}[^,\\s])?$"},
                ]
            },
            "maxItems": len(GROUP_KEYS) + MAX_TAG_KEYS,
            "minItems": 1,
            "uniqueItems": True,
        },
    },
}

# "Exactly one of" rules msgspec cannot state: component -> the fields of
# which exactly one must be given, and what "given" means (not null, or a value).
NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}
EXACTLY_ONE: dict[str, dict[str, dict[str, Any]]] = {
    "ReserveIn": {"amount": NOT_NULL, "estimate": NOT_NULL},
    "CaptureIn": {"amount": NOT_NULL, "usage": NOT_NULL},
    "Audience": {"all": {"const": True}, "departments": NOT_NULL, "employees": NOT_NULL},
    "Expiry": {"at": NOT_NULL, "after_days": NOT_NULL},
}

# The errors any authenticated route may answer, whatever it does.
AUTHENTICATED = (errors.Unauthenticated, errors.Forbidden, errors.RateLimited, errors.Unavailable)
# And a route that checks parameters or a body.
WITH_INPUT = (errors.InvalidRequest,)
WITH_BODY = (errors.InvalidRequest, errors.PayloadTooLarge)
# And a route that takes an Idempotency-Key (run_operation).
IDEMPOTENT = (
    errors.IdempotencyKeyRequired,
    errors.IdempotencyKeyInProgress,
    errors.IdempotencyKeyReused,
)


def problems(*classes: type[errors.LedgerError], idempotent: bool = False) -> dict[str, Any]:
    """Route option: the operation's own error answers (besides those every
    authenticated route may give), and whether it takes an Idempotency-Key."""
    return {"problems": tuple(classes), "idempotent": idempotent}


def statuses(*codes: int) -> dict[str, Any]:
    """Route option: success statuses besides the handler's `status_code`
    (a create-or-update answers 201 or 200)."""
    return {"statuses": tuple(codes)}


def struct_types() -> dict[str, type[msgspec.Struct]]:
    """Every Struct of service.api by name (Litestar names components so)."""
    import service.api

    found: dict[str, type[msgspec.Struct]] = {}
    for info in pkgutil.iter_modules(service.api.__path__):
        module = importlib.import_module(f"service.api.{info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, msgspec.Struct)
                and value.__module__.startswith("service.api")
            ):
                found.setdefault(name, value)
    return found


def exactly_one(schema: dict[str, Any], fields: dict[str, dict[str, Any]]) -> None:
    """Exactly one of `fields` is present with a value its schema admits."""
    schema["oneOf"] = [
        {"required": [name], "properties": {name: copy.deepcopy(given)}}
        for name, given in fields.items()
    ]


NO_NUL = "^[^\\u0000]*$"


def no_nul(schema: Any) -> None:
    """Every free text in a body excludes NUL, which the service refuses
    (PostgreSQL cannot store it); patterned text excludes it already."""
    if isinstance(schema, list):
        for item in schema:
            no_nul(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "string" and not (
        {"pattern", "format", "enum", "const"} & schema.keys()
    ):
        schema["pattern"] = NO_NUL
    names = schema.get("propertyNames")
    if isinstance(names, dict) and "pattern" not in names:
        names["pattern"] = NO_NUL
    for key, value in schema.items():
        if key not in ("propertyNames", "examples", "default", "const", "enum"):
            no_nul(value)


def struct_components(names: Iterable[str]) -> dict[str, Any]:
    types = struct_types()
    wanted = [types[name] for name in names if name in types]
    _, components = msgspec.json.schema_components(
        wanted, ref_template="#/components/schemas/{name}"
    )
    return components


def apply_contract(document: dict[str, Any], app: Litestar) -> None:
    """Rewrite Litestar's document in place (see the module docstring)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(struct_components([*schemas, "Problem"]))
    # A batch takes any items and checks each on its own (a malformed one is
    # rejected alone, in `results`); a well-formed one is a usage event.
    batch = schemas.get("UsageBatchIn", {}).get("properties", {}).get("events")
    if batch is not None:
        batch["items"] = {
            "anyOf": [{"$ref": "#/components/schemas/UsageIn"}, {}],
            "description": "A usage event; any other item is rejected alone in `results`.",
        }
        schemas.update(struct_components(["UsageIn"]))
    for name, schema in schemas.items():
        if name != "Problem":  # an answer, which may quote what it refuses
            no_nul(schema)
    for name, fields in EXACTLY_ONE.items():
        if name in schemas:
            exactly_one(schemas[name], fields)

    handlers = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in handler.http_methods:
                handlers[(route.path_format, method.lower())] = handler

    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            handler = handlers.get((path, method))
            if handler is None or not isinstance(operation, dict):
                continue
            # A route may narrow a path parameter's pattern (its opt
            # "path_patterns"): the policy routes take wallets only.
            narrowed = handler.opt.get("path_patterns", {})
            for parameter in operation.get("parameters", []):
                pattern = (
                    narrowed.get(parameter["name"], PATH_PATTERNS.get(parameter["name"]))
                    if parameter["in"] == "path"
                    else QUERY_PATTERNS.get(parameter["name"])
                    if parameter["in"] == "query"
                    else None
                )
                if pattern is not None:
                    parameter["schema"] = with_pattern(parameter["schema"], pattern)
                if (
                    parameter["in"] == "query"
                    and parameter["name"] in QUERY_SCHEMAS
                    # A route whose parameter is an enum (a Literal) states it already.
                    and "enum" not in parameter["schema"]
                ):
                    description = parameter["schema"].get("description")
                    parameter.update(copy.deepcopy(QUERY_SCHEMAS[parameter["name"]]))
                    if description:
                        parameter["schema"]["description"] = description
            document_operation(operation, handler, has_body="requestBody" in operation)


def with_pattern(schema: dict[str, Any], pattern: str) -> dict[str, Any]:
    """`schema` (a string, or a string or null) with the pattern on the string."""
    string = {k: v for k, v in schema.items() if k not in ("oneOf", "anyOf", "type", "pattern")}
    string.update({"type": "string", "pattern": pattern})
    alternatives = schema.get("oneOf") or schema.get("anyOf")
    if alternatives and any(a.get("type") == "null" for a in alternatives):
        return {"anyOf": [string, {"type": "null"}]}
    return string


def document_operation(operation: dict[str, Any], handler: Any, *, has_body: bool) -> None:
    access = handler.opt.get("access")
    public = getattr(access, "public", False)
    responses = operation.setdefault("responses", {})
    if public:
        operation["security"] = []
        return
    if handler.opt.get("csv_body"):
        # The handler reads the raw body itself (a CSV import): Litestar cannot see it.
        operation["requestBody"] = {
            "required": True,
            "content": {
                "text/csv": {
                    "schema": {
                        "type": "string",
                        "description": "A header row, then one record per row (RFC 4180).",
                    }
                }
            },
        }
        has_body = True
    # Who may call it, from the one role table (service.roles).
    roles = sorted(access.roles, key=ROLES.index)
    operation["x-roles"] = roles
    note = "Roles: " + ", ".join(f"`{r}`" for r in roles)
    if access.own is not None:
        note += f" (`employee` only for their own `{access.own}`)"
    elif "employee" in roles:
        note += " (`employee`: their own)"
    operation["description"] = (operation.get("description", "").rstrip() + "\n\n" + note).strip()
    success = str(handler.status_code)
    for extra in handler.opt.get("statuses", ()):
        if str(extra) not in responses and success in responses:
            answer = copy.deepcopy(responses[success])
            answer["description"] = "Created" if extra == 201 else "Updated"
            responses[str(extra)] = answer
    classes: list[type[errors.LedgerError]] = list(AUTHENTICATED)
    if has_body:
        classes += WITH_BODY
    elif operation.get("parameters"):
        classes += WITH_INPUT
    if handler.opt.get("idempotent"):
        classes += IDEMPOTENT
        parameters = operation.setdefault("parameters", [])
        parameters.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": True,
                "description": (
                    "1..255 printable ASCII characters, scoped to the caller; a replay "
                    "returns the stored answer with `Idempotent-Replayed: true`."
                ),
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_IDEMPOTENCY_KEY,
                    "pattern": r"^[\x20-\x7e]+$",
                },
            }
        )
    classes += handler.opt.get("problems", ())
    for key in [k for k in responses if k.isdigit() and int(k) >= 400]:
        del responses[key]
    by_status: dict[int, list[type[errors.LedgerError]]] = {}
    for cls in errors.ERRORS:  # in precedence order
        if cls in classes:
            by_status.setdefault(cls.status, []).append(cls)
    for status, members in sorted(by_status.items()):
        responses[str(status)] = {
            "description": ", ".join(f"`{cls.code}`" for cls in members),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }


def openapi_description() -> str:
    """The API's conventions and its closed set of error codes, in precedence order."""
    rows = "\n".join(
        f"| {row.status} | `{row.code}` | {row.detail.splitlines()[0]} |" for row in errors.TABLE
    )
    return (
        "A double-entry ledger of AI-token credits. Amounts are JSON integers (credits), "
        "1..2^53. Every `/v1` route needs `Authorization: Bearer <token>` (a service key or an "
        "employee JWT). Every state-changing POST takes an `Idempotency-Key` header (1..255 "
        "printable ASCII, scoped to the caller); a replay returns the stored answer with "
        "`Idempotent-Replayed: true`. Lists are newest first with an opaque `cursor`, `limit` "
        "1..500 (default 50). Request bodies are at most 1 MiB by default. Errors are RFC 9457 "
        "`application/problem+json` with a stable `code` (schema `Problem`); when several "
        "checks fail the first in this table answers (401/403 are checked before the body):"
        "\n\n| status | code | meaning |\n|---|---|---|\n" + rows
    )


def served(app: Litestar) -> dict[str, Any]:
    """The document /schema/openapi.json serves (built and rewritten once)."""
    from litestar._openapi.plugin import OpenAPIPlugin

    document = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    if not app.state.get(_STATE_KEY):
        apply_contract(document, app)
        app.state[_STATE_KEY] = True
    return document


class ContractJson(JsonRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, served(request.app))
