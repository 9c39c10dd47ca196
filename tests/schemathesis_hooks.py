"""Schemathesis hooks for tests/served_schema.py: generated requests behave
as a correct client does, which the schema cannot make them do.

An Idempotency-Key names one request: a client never sends the same key
with another body (the service answers 422 idempotency_key_reused, as
documented). Schemathesis draws keys from the schema and repeats short ones
("0") across different bodies, so each valid key it generated becomes a
fresh one; negative cases (keys or bodies the schema does not allow, a
missing header) are left alone.
Likewise a usage event's (source, event_id) names one event.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis

IDEMPOTENCY_HEADER = "Idempotency-Key"
VALID_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    meta = case.meta
    if meta is not None and meta.generation.mode.is_negative:
        # A negative case is about what it breaks; changing it would hide that.
        return
    headers = case.headers or {}
    key = headers.get(IDEMPOTENCY_HEADER)
    if isinstance(key, str) and VALID_KEY.match(key):
        headers[IDEMPOTENCY_HEADER] = uuid.uuid4().hex
    if case.path == "/v1/usage" and isinstance(case.body, dict):
        event_id = case.body.get("event_id")
        if isinstance(event_id, str) and 1 <= len(event_id) <= 200:
            case.body["event_id"] = uuid.uuid4().hex
