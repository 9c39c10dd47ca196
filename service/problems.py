"""Every error a request meets, answered as RFC 9457 problem+json.

Our LedgerErrors answer with their code; Litestar's own errors (a body that
does not fit the handler's types, an unknown route, a wrong method, a body
over the size limit) become the LedgerError that says the same; a database
error becomes what service.errors.translate makes of it. Anything else is a
bug: 500, with its traceback in the log (STYLE.md habit 6).
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.types import ExceptionHandlersMap

from service import errors
from service.observability import REQUEST_ID_HEADER, request_id_for

log = structlog.get_logger("tokenledger")

PROBLEM_JSON = "application/problem+json"


def problem_response(exc: errors.LedgerError, request: Request[Any, Any, Any]) -> Response[Any]:
    request.state.outcome = exc.code
    headers = dict(exc.headers)
    if "request_id" not in request.scope.get("state", {}):
        # Router-level 404/405 never reach the request middleware (it runs
        # per route), so they get their request id here.
        headers[REQUEST_ID_HEADER] = request_id_for(request.headers.get(REQUEST_ID_HEADER))
    return Response(
        exc.problem(instance=request.url.path),
        status_code=exc.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def handle_ledger_error(request: Request[Any, Any, Any], exc: errors.LedgerError) -> Response[Any]:
    return problem_response(exc, request)


def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    details = []
    for item in exc.extra or []:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key", ""))
        source = item.get("source")
        if source == "body":
            path = "$" if key in ("", "data") else "$." + key
        else:
            path = key
        details.append({"path": path, "message": item.get("message", "")})
    first = details[0] if details else {"path": "$", "message": exc.detail}
    err = errors.InvalidRequest(f"{first['path']}: {first['message']}", errors=details or [first])
    return problem_response(err, request)


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    err: errors.LedgerError
    if isinstance(exc, NotFoundException):
        err = errors.NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = errors.MethodNotAllowed()
        # RFC 9110: a 405 names the methods the route takes.
        allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        if allow:
            err.headers["Allow"] = allow
    elif exc.status_code == 413:
        err = errors.PayloadTooLarge()
    elif exc.status_code == 403:
        # The development sign-in's CSRF check (service/pages.py).
        err = errors.Forbidden(str(exc.detail))
    elif exc.status_code == 400:
        err = errors.invalid("$", str(exc.detail))
    else:
        request.state.outcome = "http_error"
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "code": "http_error",
        }
        return Response(body, status_code=exc.status_code, media_type=PROBLEM_JSON)
    return problem_response(err, request)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    translated = errors.translate(exc)
    if translated is not None:
        return problem_response(translated, request)
    # A bug or a broken invariant: 500, with the traceback in the log.
    log.error("unhandled_error", path=request.url.path, exc_info=exc)
    request.state.outcome = "internal"
    body = {
        "type": "https://tokenledger.internal/problems/internal",
        "title": "Internal error",
        "status": 500,
        "detail": "An unexpected error occurred; it has been logged.",
        "code": "internal",
    }
    return Response(body, status_code=500, media_type=PROBLEM_JSON)


# The app's exception handlers: Litestar picks the most specific class.
EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    errors.LedgerError: handle_ledger_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
