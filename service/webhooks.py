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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import secrets
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from standardwebhooks import Webhook

from service import errors
from service.config import Config
from service.journal import Ledger

log = structlog.get_logger("tokenledger.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105  # why: the Standard Webhooks prefix, not a secret
# Standard Webhooks secrets are 24 to 64 random bytes; 32 is what we make.
SECRET_BYTES = 32
NONCE_BYTES = 12
# Events fanned out per statement.
FANOUT_BATCH = 500
# A claim outlives twice the attempt's timeout by this much before another
# replica may take the delivery over.
LEASE_MARGIN_SECONDS = 2.0
# The receiver's answer is not read; only its status counts.
_encoder = msgspec.json.Encoder()


class SecretBox:
    """Encrypts webhook signing secrets at rest with AES-256-GCM.

    Signing needs the secret itself, so it cannot be hashed like a service
    key; the database holds nonce + ciphertext, and the key lives only in
    the service's configuration. The webhook's id is the associated data,
    so a ciphertext copied onto another webhook does not decrypt."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("TOKENLEDGER_WEBHOOK_SECRET_KEY must be 32 bytes in base64")
        self._aead = AESGCM(key)

    @classmethod
    def from_config(cls, config: Config) -> SecretBox | None:
        if not config.webhook_secret_key:
            return None
        try:
            key = base64.b64decode(config.webhook_secret_key, validate=True)
        except ValueError:
            raise ValueError("TOKENLEDGER_WEBHOOK_SECRET_KEY must be base64") from None
        return cls(key)

    def seal(self, webhook_id: uuid.UUID, secret: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), webhook_id.bytes)

    def open(self, webhook_id: uuid.UUID, sealed: bytes) -> str:
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], webhook_id.bytes)
        except InvalidTag:
            raise AssertionError(
                f"webhook {webhook_id}: its secret does not decrypt with the configured key"
            ) from None
        return plain.decode()


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value: `v1,<base64 HMAC-SHA256>` of
    "{msg_id}.{timestamp}.{body}" keyed by the secret's bytes."""
    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)


# --- The URL guard ---------------------------------------------------------


class AddressNotAllowed(Exception):
    """The URL's host is, or resolves to, an address webhooks may not reach."""


def allowed_address(address: str) -> bool:
    """Public unicast only: no loopback, private, link-local (169.254/16,
    the cloud metadata service), shared (100.64/10), multicast, reserved or
    unspecified address, also when written as IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


def check_url_shape(url: str, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL, or InvalidRequest: an absolute
    https URL (http too when private addresses are allowed) without
    credentials or fragment; a literal IP must be public unless allowed."""

    def bad(message: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(
            f"$.url: {message}", errors=[{"path": "$.url", "message": message}]
        )

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"not a valid URL ({exc})") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise bad("must be an https URL")
    host = parts.hostname
    if not host:
        raise bad("must name a host")
    if parts.username is not None or parts.password is not None:
        raise bad("must not carry credentials")
    if parts.fragment:
        raise bad("must not have a fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not allow_private:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not allowed_address(host):
            raise bad("must not point to a private, loopback or link-local address")
    return parts.scheme, host, port


async def resolve_allowed(host: str, port: int, allow_private: bool, within_seconds: float) -> str:
    """The address to connect to: `host` resolved now, every address it
    resolves to checked (a name with one private address among public ones
    is refused: DNS may hand out either). Raises AddressNotAllowed."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=within_seconds
        )
    except (OSError, TimeoutError) as exc:
        raise AddressNotAllowed(f"{host} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise AddressNotAllowed(f"{host} does not resolve")
    if not allow_private:
        for address in addresses:
            if not allowed_address(address):
                raise AddressNotAllowed(f"{host} resolves to {address}, which is not public")
    # IPv4 first where a name has both (localhost is ::1 first on many hosts,
    # while a development receiver often listens on 127.0.0.1 only).
    return next((a for a in addresses if ":" not in a), addresses[0])


async def check_url(url: str, allow_private: bool, within_seconds: float = 5.0) -> None:
    """The whole check at creation: the shape, then the name resolved and
    its addresses checked (the dispatcher checks again at each send)."""
    _scheme, host, port = check_url_shape(url, allow_private)
    try:
        await resolve_allowed(host, port, allow_private, within_seconds)
    except AddressNotAllowed as exc:
        raise errors.InvalidRequest(
            f"$.url: {exc}", errors=[{"path": "$.url", "message": str(exc)}]
        ) from None


# --- The dispatcher --------------------------------------------------------


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def event_body(row: Any) -> bytes:
    """The delivered body: {id, type, created_at, data}."""
    created = row["event_created_at"].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return _encoder.encode(
        {
            "id": row["event_id"],
            "type": row["event_type"],
            "created_at": created,
            "data": row["event_data"],
        }
    )


class Dispatcher:
    """One per replica: the fan-out, claim, send, record loop."""

    def __init__(self, ledger: Ledger, box: SecretBox) -> None:
        self.ledger = ledger
        self.config = ledger.config
        self.metrics = ledger.metrics
        self.box = box
        self.replica = replica_name()
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self.config.webhook_timeout_seconds),
            limits=httpx.Limits(
                max_connections=self.config.webhook_max_in_flight, max_keepalive_connections=8
            ),
        )
        self._task = asyncio.create_task(self._loop(), name="tokenledger-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Sends cut off here are leased; another replica (or this one after
        # a restart) sends them again when the lease runs out.
        for task in list(self._sends):
            task.cancel()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _loop(self) -> None:
        interval = self.config.webhook_poll_interval_seconds
        while True:
            try:
                busy = await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # why: a failed pass is logged and retried next interval
                log.warning("webhook_pass_failed", error=repr(exc))
                busy = False
            if not busy:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=interval)

    async def pass_once(self) -> bool:
        """Fan out new events and start sends for due deliveries; whether
        there was anything to do (then the loop goes again at once)."""
        retry_for = self.config.webhook_retry_for_seconds
        fanned = int(
            await self.ledger.fetchval("webhook_fanout", FANOUT_BATCH, _seconds(retry_for))
        )
        free = self.config.webhook_max_in_flight - len(self._sends)
        claimed: list[Any] = []
        if free > 0:
            lease = self.config.webhook_timeout_seconds * 2 + LEASE_MARGIN_SECONDS
            claimed = await self.ledger.fetch(
                "webhook_claim",
                free,
                self.config.webhook_max_in_flight_per_endpoint,
                _seconds(lease),
                self.replica,
            )
        for row in claimed:
            task = asyncio.create_task(self._send(row), name="tokenledger-webhook-send")
            self._sends.add(task)
            task.add_done_callback(self._sent)
        return fanned >= FANOUT_BATCH or bool(claimed)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        # A slot freed: look for more due deliveries now, not at the next tick.
        self._wake.set()

    async def _send(self, row: Any) -> None:
        attempt = int(row["attempt"])
        if attempt > 1:
            self.metrics.webhook_retries.inc()
        started = time.perf_counter()
        ok, status_code, error = False, None, None
        try:
            status_code = await asyncio.wait_for(
                self.deliver(row), timeout=self.config.webhook_timeout_seconds
            )
            ok = 200 <= status_code < 300
            if not ok:
                error = f"answered {status_code}"
        except AddressNotAllowed as exc:
            error = f"refused: {exc}"
            self.metrics.webhook_deliveries.labels("refused").inc()
        except TimeoutError:
            error = f"no answer within {self.config.webhook_timeout_seconds}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except Exception as exc:  # noqa: BLE001  # why: a bug in one send is logged and the delivery retried, not lost
            log.error("webhook_send_error", exc_info=exc)
            error = f"internal error: {type(exc).__name__}"
        latency = time.perf_counter() - started
        self.metrics.webhook_latency.observe(latency)
        try:
            outcome = await self.ledger.fetchval(
                "webhook_record",
                row["delivery_id"],
                attempt,
                ok,
                status_code,
                error,
                latency,
                self.config.webhook_retry_base_seconds,
                self.config.webhook_retry_max_seconds,
            )
        except Exception as exc:  # noqa: BLE001  # why: unrecorded, the lease runs out and the delivery is sent again
            log.warning("webhook_record_failed", error=repr(exc))
            return
        self.metrics.webhook_deliveries.labels(str(outcome)).inc()
        if not ok:
            log.info(
                "webhook_attempt_failed",
                delivery="dlv_" + row["delivery_id"].hex,
                attempt=attempt,
                outcome=outcome,
                error=error,
            )

    async def deliver(self, row: Any) -> int:
        """Send one delivery; the receiver's status code. The host is
        resolved and checked now and the connection made to the checked
        address (the Host header and TLS name stay the URL's), so a name
        that changed to a private address since the webhook was made is
        refused, and no second look-up can differ from the one checked."""
        assert self._http is not None
        allow_private = self.config.webhook_allow_private
        url = str(row["url"])
        try:
            scheme, host, port = check_url_shape(url, allow_private)
        except errors.InvalidRequest as exc:
            raise AddressNotAllowed(exc.detail) from None
        address = await resolve_allowed(
            host, port, allow_private, self.config.webhook_timeout_seconds
        )
        secret = self.box.open(row["webhook_id"], bytes(row["secret_encrypted"]))
        body = event_body(row)
        timestamp = int(time.time())
        msg_id = str(row["event_id"])
        parts = urlsplit(url)
        netloc = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        host_header = parts.netloc.rsplit("@", 1)[-1]
        headers = {
            "content-type": "application/json",
            "user-agent": "tokenledger-webhooks",
            "host": host_header,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
        }
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        request = self._http.build_request(
            "POST", target, content=body, headers=headers, extensions=extensions
        )
        response = await self._http.send(request, stream=True)
        await response.aclose()
        return response.status_code


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
