"""The service as a process: `python -m service` started on a database, waited
for, stopped in order, and its log read back; and the audit command.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench import REPO

HOST = "127.0.0.1"
POOL_MAX_SIZE = 40
READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 15.0
AUDIT_TIMEOUT_SECONDS = 120.0


def new_admin_key() -> str:
    """A service key in the service's format, `tlk_<8 hex>_<secret>`."""
    return f"tlk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def service_auth_env(admin_key: str) -> dict[str, str]:
    """Authentication for a production-mode service: employee JWTs verified
    with a random HS256 secret (the bench sends none), our admin key made at
    start-up, and per-caller rate limits far above anything the bench can
    send (the check still runs on every request, but never answers 429)."""
    return {
        "TOKENLEDGER_JWT_ISSUER": "tokenledger-bench",
        "TOKENLEDGER_JWT_AUDIENCE": "tokenledger",
        "TOKENLEDGER_JWT_HS256_SECRET": secrets.token_urlsafe(48),
        "TOKENLEDGER_BOOTSTRAP_ADMIN_KEY": admin_key,
        "TOKENLEDGER_RATE_LIMITS": "admin=1000000,hr=1000000,finance=1000000,meter=1000000",
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServiceError(RuntimeError):
    """The service did not start, or died."""


class Service:
    """`python -m service` as a subprocess, its output in a log file."""

    def __init__(
        self,
        dsn: str,
        log_path: Path,
        *,
        pool_max_size: int = POOL_MAX_SIZE,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.log_path = log_path
        self.pool_max_size = pool_max_size
        self.extra_env = extra_env or {}
        # The bootstrap admin key the service creates at start-up; every
        # request of ours presents it.
        self.admin_key = new_admin_key()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_how: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            {
                # TOKENLEDGER_DATABASE_URL wins over DATABASE_URL: set both.
                "DATABASE_URL": self.dsn,
                "TOKENLEDGER_DATABASE_URL": self.dsn,
                "TOKENLEDGER_HOST": HOST,
                "TOKENLEDGER_PORT": str(self.port),
                "TOKENLEDGER_LOG_LEVEL": "warning",
                "TOKENLEDGER_LOG_FORMAT": "json",
                "TOKENLEDGER_POOL_MAX_SIZE": str(self.pool_max_size),
                **service_auth_env(self.admin_key),
                **self.extra_env,
            }
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603  # why: our own interpreter and module
                [sys.executable, "-m", "service"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal ^C reaches us, and we stop it in order
            )

    async def wait_ready(self, within: float = READY_TIMEOUT_SECONDS) -> float:
        """Poll GET /readyz until 200; the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        last = "no answer"
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=2.0, trust_env=False
        ) as client:
            while time.monotonic() - started < within:
                if self.proc.poll() is not None:
                    raise ServiceError(
                        f"the service exited with {self.proc.returncode} before it was ready:\n"
                        + self.log_tail()
                    )
                try:
                    r = await client.get("/readyz")
                    if r.status_code == 200:
                        return time.monotonic() - started
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                await asyncio.sleep(0.2)
        raise ServiceError(
            f"GET /readyz not 200 within {within:.0f}s (last: {last}):\n" + self.log_tail()
        )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> str:
        """SIGINT, then SIGKILL after `grace` seconds; says how it ended."""
        proc = self.proc
        if proc is None:
            return "not started"
        if self.stopped_how is not None:
            return self.stopped_how
        started = time.monotonic()
        if proc.poll() is not None:
            self.stopped_how = f"had already exited with {proc.returncode}"
            return self.stopped_how
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=grace)
            self.stopped_how = f"SIGINT: exited {rc} in {time.monotonic() - started:.1f}s"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            self.stopped_how = f"SIGINT ignored for {grace:.0f}s: killed"
        return self.stopped_how

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def unhandled_exceptions(self) -> Counter[str]:
        """The exceptions behind the service's 500s (`unhandled_error` log
        events), by their last traceback line."""
        found: Counter[str] = Counter()
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "unhandled_error":
                lines = str(record.get("exception", "")).strip().splitlines()
                found[f"{record.get('path')}: {lines[-1][:200] if lines else '?'}"] += 1
        return found

    def log_events(self) -> Counter[str]:
        """How many times each structured log event (json lines) appeared."""
        events: Counter[str] = Counter()
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    events["traceback"] += 1
                continue
            if isinstance(record, dict):
                events[str(record.get("event", "?"))] += 1
        return events


def run_audit(dsn: str, timeout: float = AUDIT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """`python -m service audit --database-url DSN`: passed, and what it printed."""
    started = time.monotonic()
    try:
        result = subprocess.run(  # noqa: S603  # why: our own interpreter and module
            [sys.executable, "-m", "service", "audit", "--database-url", dsn],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {
            "passed": False,
            "returncode": None,
            "output": f"timed out after {timeout:.0f}s",
            "seconds": round(time.monotonic() - started, 2),
        }
    output = (result.stdout + result.stderr).strip()
    return {
        "passed": result.returncode == 0,
        "returncode": result.returncode,
        "output": output[-4000:],
        "seconds": round(time.monotonic() - started, 2),
    }
