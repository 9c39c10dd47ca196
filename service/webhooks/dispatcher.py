"""The dispatcher: each replica's fan-out, claim, send and record loop
(the steps are in the package's docstring, service/webhooks/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from datetime import UTC, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog

from service import errors
from service.journal import Database
from service.tasks import cancel
from service.webhooks.signing import SecretBox, sign
from service.webhooks.url_guard import AddressNotAllowed, check_url_shape, resolve_allowed

log = structlog.get_logger("tokenledger.webhooks")

# Events fanned out per statement.
FANOUT_BATCH = 500
# A claim outlives twice the attempt's timeout by this much before another
# replica may take the delivery over.
LEASE_MARGIN_SECONDS = 2.0
_encoder = msgspec.json.Encoder()


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

    def __init__(self, ledger: Database, box: SecretBox) -> None:
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
        await cancel(self._task)
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
        # The receiver's answer is not read; only its status counts.
        response = await self._http.send(request, stream=True)
        await response.aclose()
        return response.status_code


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
