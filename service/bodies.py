"""Strict decoding of request bodies and datetime query parameters.

Litestar converts a body to the handler's `data` type leniently ("5" would
be an amount of 5). Here, before the handler runs, the body is parsed once
and converted once, strictly, and that value is what the handler gets:
Litestar's own conversion passes a value of the right type through as it is.
Timestamps are made UTC (PostgreSQL takes offsets up to 15:59 only; RFC 3339
allows 23:59), so a body with a timestamp in another offset is converted
again from its UTC form; other bodies are converted once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
from litestar import Request
from litestar.exceptions import SerializationException

from service import errors

_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)


def integral(value: Any) -> Any:
    """`value` with every number that has no fractional part (5.0) made an
    int: JSON Schema counts 5.0 as an integer, so the served schema's
    `integer` admits it, and so does the service. 1.5 and "5" are still no
    amount."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [integral(item) for item in value]
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    return value


def in_utc(value: Any, path: str = "$", shifted: list[str] | None = None) -> Any:
    """`value` (from msgspec.to_builtins) with its datetimes as RFC 3339 UTC
    text; text with a NUL character is refused (PostgreSQL cannot store it,
    and the schema's strings exclude it). The path of each datetime that was
    not in UTC is added to `shifted`."""
    if isinstance(value, str):
        if "\x00" in value:
            message = "text may not contain the NUL character"
            raise errors.invalid(path, message, f"{path}: {message}")
        return value
    if isinstance(value, datetime):
        if shifted is not None and value.tzinfo is not UTC:
            shifted.append(path)
        try:
            return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        except OverflowError:
            raise errors.invalid(path, "the timestamp is out of range") from None
    if isinstance(value, list):
        return [in_utc(item, f"{path}[{i}]", shifted) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {
            in_utc(key, path, shifted): in_utc(item, f"{path}.{key!s}", shifted)
            for key, item in value.items()
        }
    return value


_HAS_DATETIME: dict[Any, bool] = {}


def has_datetime(annotation: Any) -> bool:
    """Whether a body type holds a timestamp anywhere (cached per type)."""
    known = _HAS_DATETIME.get(annotation)
    if known is None:
        known = _HAS_DATETIME[annotation] = _holds_datetime(
            msgspec.inspect.type_info(annotation), set()
        )
    return known


def _holds_datetime(info: Any, seen: set[int]) -> bool:
    if id(info) in seen:
        return False
    seen.add(id(info))
    if isinstance(info, msgspec.inspect.DateTimeType):
        return True
    if isinstance(info, msgspec.inspect.StructType | msgspec.inspect.TypedDictType):
        return any(_holds_datetime(f.type, seen) for f in info.fields)
    # Annotated types are Metadata wrappers (.type), optional ones unions.
    for attr in ("type", "types", "item_type", "key_type", "value_type"):
        inner = getattr(info, attr, None)
        if isinstance(inner, tuple) and any(_holds_datetime(t, seen) for t in inner):
            return True
        if inner is not None and not isinstance(inner, tuple) and _holds_datetime(inner, seen):
            return True
    return False


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """Decode the JSON body strictly against the handler's `data` type, and
    hand the handler that value: "5" or 1.5 is not an amount (5.0 is 5, as
    JSON Schema counts it an integer).

    Also enforces the body size limit and gives precise JSON paths
    (`$.grants[3].amount`) in the 400.
    """
    handler = request.route_handler
    field = handler.parsed_fn_signature.parameters.get("data")
    if field is None:
        return
    body = await request.body()
    if not body.strip():
        return
    try:
        parsed = await request.json()
    except SerializationException as exc:
        raise errors.invalid("$", str(exc), f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise errors.invalid("$", "the body is nested too deeply") from None
    annotation = field.annotation
    try:
        try:
            value = msgspec.convert(parsed, annotation, strict=True)
        except msgspec.ValidationError:
            value = msgspec.convert(integral(parsed), annotation, strict=True)
        # The hot path's bodies (no timestamps, no NUL) are used as they are:
        # walking every body in Python cost the service a fifth more CPU per
        # debit. A body whose type holds a timestamp is walked.
        if has_datetime(annotation) or b"\\u0000" in body:
            shifted: list[str] = []
            normal = in_utc(msgspec.to_builtins(value, builtin_types=(datetime,)), "$", shifted)
            if shifted:
                # A timestamp with another offset: the value is made again
                # from the UTC form, as Litestar would convert it (leniently:
                # the text of a timestamp, a UUID or a decimal to its type).
                value = msgspec.convert(normal, annotation, strict=False, str_keys=True)
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_PATH.match(str(exc))
        message = match.group("message") if match else str(exc)
        path = (match.group("path") if match else None) or "$"
        raise errors.invalid(path, message, f"{path}: {message}") from None
    # Litestar takes the handler's `data` from this cache, and passes a value
    # of the declared type through without converting it again.
    request._json = request._connection_state.json = value


# RFC 3339 date-time with an offset, as the schema's `format: date-time` says;
# Litestar alone would also take a number of seconds since the epoch.
_DATE_TIME = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def datetime_queries(handler: Any) -> list[str]:
    """The query parameters a handler takes as datetimes, by their names in the URL."""
    names = []
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if type(kwarg).__name__ != "QueryParameter" and not (
            kwarg is None and name not in ("request", "scope", "state", "data")
        ):
            continue
        if field.annotation is datetime or datetime in get_args(field.annotation):
            names.append(getattr(kwarg, "name", None) or getattr(kwarg, "query", None) or name)
    return names


def strict_query(request: Request[Any, Any, Any]) -> None:
    """A datetime in the query is RFC 3339 with an offset, nothing else."""
    handler = request.route_handler
    names = handler.opt.get("_datetime_queries")
    if names is None:
        names = handler.opt["_datetime_queries"] = datetime_queries(handler)
    for name in names:
        for value in request.query_params.getall(name, []):
            if not _DATE_TIME.match(value):
                message = "must be an RFC 3339 date-time with an offset"
                raise errors.invalid(name, message, f"{name} {message}")
