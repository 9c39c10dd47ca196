"""Verifying tokenledger's webhook deliveries (Standard Webhooks).

    from tokenledger_client.webhooks import verify, WebhookVerificationError

    event = verify(request_body_bytes, request.headers, secret)  # the whsec_... secret
    if seen(event["id"]): return 200   # at least once: deduplicate by webhook-id
    handle(event["type"], event["data"])

The signature is `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`
keyed by the secret's bytes; a timestamp more than 5 minutes from now is refused,
so a captured delivery cannot be replayed later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify"]


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict[str, Any]:
    """The delivered event `{id, type, created_at, data}` when the body is exactly
    what tokenledger signed with `secret`, less than 5 minutes ago; otherwise
    WebhookVerificationError. Pass the raw body as received, before any JSON parsing."""
    event = Webhook(secret).verify(body, dict(headers))
    if not isinstance(event, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return event
