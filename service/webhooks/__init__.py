"""Webhooks: secrets, the URL guard, signing and the dispatcher (issue 14).

Events are written to the outbox by the database, in the transaction of the
change that causes them (schema.sql, "Alerts and webhooks"). Every replica
runs a Dispatcher that

1. fans new outbox events out to deliveries, one per webhook that wants
   them (tl_webhook_fanout, SKIP LOCKED: replicas take disjoint events);
2. claims due deliveries (tl_webhook_claim): at most
   `webhook_max_in_flight_per_endpoint` in flight per webhook across all
   replicas, at most `webhook_max_in_flight` per replica; a claim leases
   the delivery for the timeout plus a margin and commits before anything
   is sent, so no row lock is held across the network;
3. sends each one (Standard Webhooks headers, HMAC-SHA256 signature) with
   a timeout and without following redirects, to an address resolved and
   checked at send time;
4. records the outcome (tl_webhook_record): delivered, or the next attempt
   after an exponential backoff with jitter, or failed once the retry
   window (at least 24 hours) is over.

A replica that dies between its claim and its record leaves a lease that
runs out; another replica then sends again with the same `webhook-id`
(at least once; receivers deduplicate). A slow or dead receiver holds at
most its own per-endpoint slots, never a database connection or a writer.

The modules: `signing` (secrets kept encrypted, signatures), `url_guard`
(which receivers may be reached) and `dispatcher` (the loop above).
Callers import from `service.webhooks`.
"""

from service.webhooks.dispatcher import Dispatcher, event_body
from service.webhooks.signing import SecretBox, new_secret, sign
from service.webhooks.url_guard import (
    AddressNotAllowed,
    allowed_address,
    check_url,
    check_url_shape,
    resolve_allowed,
)

__all__ = [
    "AddressNotAllowed",
    "Dispatcher",
    "SecretBox",
    "allowed_address",
    "check_url",
    "check_url_shape",
    "event_body",
    "new_secret",
    "resolve_allowed",
    "sign",
]
