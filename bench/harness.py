"""The benchmark: the real service as a subprocess, on a throwaway database.

    python -m bench [--scale X] [--requests N] [--workers N] [--only NAME]
                    [--batch-size N] [--json PATH] [--database-url DSN] [--seed N]

1. PostgreSQL: the server named by --database-url or DATABASE_URL, on which a
   fresh database `tokenledger_bench_<pid>` is created (and dropped at the end);
   otherwise a throwaway server from tests.pg.start_server().
2. The service: `python -m service` with DATABASE_URL, TOKENLEDGER_PORT (a free
   port on 127.0.0.1), TOKENLEDGER_LOG_LEVEL=warning and
   TOKENLEDGER_POOL_MAX_SIZE=40, ready when GET /readyz answers 200.
3. Scenarios, each with a request count (times --scale) and a time cap; the
   data they need is set up through the API first and is not timed. The
   reserve_capture scenarios count reserve+capture pairs instead: one op is
   one pair (two requests), and their ops/s are pairs/s. The usage scenarios
   count usage events: usage_single sends one per request, usage_batch_500
   --batch-size (500) per POST /v1/usage:batch; their ops/s are events/s
   (events answered `recorded`), their latencies per request.
4. The audit (`python -m service audit`), and arithmetic checks of the
   balances against the successful answers.

The machine is shared and noisy: compare figures measured in one run (the
ratio shared/spread), not absolute numbers across runs. All traffic goes to
127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_JSON = RESULTS_DIR / "latest.json"

HOST = "127.0.0.1"
POOL_MAX_SIZE = 40
READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 15.0
AUDIT_TIMEOUT_SECONDS = 120.0
DEPARTMENT = "bench"
# Setup requests run this many at a time.
SETUP_CONCURRENCY = 8
# Pages of a list read back for a check, at most.
MAX_PAGES = 200
# Reservation scenarios: each pair holds RESERVE_AMOUNT, then captures
# 1..RESERVE_AMOUNT, or OVER_CAPTURE_AMOUNT (more than held, the excess from
# available credits) on one pair in OVER_CAPTURE_EVERY.
RESERVE_AMOUNT = 10
OVER_CAPTURE_AMOUNT = 12
OVER_CAPTURE_EVERY = 10
# Events per POST /v1/usage:batch in usage_batch_500 (--batch-size).
USAGE_BATCH_SIZE_DEFAULT = 500


# --- PostgreSQL ---------------------------------------------------------------


def dsn_for(dsn: str, database: str) -> str:
    """The same server and credentials, connected to another database."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn[:40]!r}")
    return urlunsplit(parts._replace(path="/" + database))


def redact(dsn: str) -> str:
    """The DSN without its password, for reports."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Database:
    """A fresh database of our own on some PostgreSQL server."""

    dsn: str
    admin_dsn: str
    name: str
    source: str
    server_version: str
    settings: dict[str, str]
    server: Any = None  # a tests.pg.Server when we started the server ourselves

    async def drop(self) -> None:
        """Drop the database, then stop the server if it was ours."""
        try:
            conn = await asyncpg.connect(self.admin_dsn, timeout=30)
            try:
                await conn.execute(
                    f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', timeout=60
                )
            finally:
                await conn.close(timeout=10)
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)


async def provision(admin_dsn: str | None, name: str) -> Database:
    """Create database `name` on admin_dsn's server, or on a throwaway server
    from tests.pg when admin_dsn is None."""
    server = None
    source = "database-url"
    if admin_dsn is None:
        from tests.pg import start_server

        server = await asyncio.to_thread(start_server)
        admin_dsn = server.dsn
        source = f"tests.pg:{server.kind}"
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=30)
        try:
            version = str(await conn.fetchval("SELECT version()"))
            settings = {}
            for setting in (
                "server_version",
                "fsync",
                "synchronous_commit",
                "max_connections",
                "shared_buffers",
            ):
                settings[setting] = str(await conn.fetchval(f"SHOW {setting}"))
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
            await conn.execute(f'CREATE DATABASE "{name}"', timeout=60)
        finally:
            await conn.close(timeout=10)
    except BaseException:
        if server is not None:
            await asyncio.to_thread(server.stop)
        raise
    return Database(
        dsn=dsn_for(admin_dsn, name),
        admin_dsn=admin_dsn,
        name=name,
        source=source,
        server_version=version,
        settings=settings,
        server=server,
    )


# --- The service ----------------------------------------------------------------


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


# --- HTTP -----------------------------------------------------------------------


def make_client(base_url: str, concurrency: int, token: str | None = None) -> httpx.AsyncClient:
    """HTTP/1.1 keep-alive, one connection per concurrent worker, explicit timeouts.
    trust_env=False: proxies from the environment never see our traffic."""
    size = max(1, concurrency) + 2
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=base_url,
        http1=True,
        http2=False,
        limits=httpx.Limits(
            max_connections=size, max_keepalive_connections=size, keepalive_expiry=60
        ),
        timeout=httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=30.0),
        headers=headers,
        trust_env=False,
    )


def problem_code(response: httpx.Response) -> str | None:
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


class SetupError(RuntimeError):
    """A setup request did not answer as expected."""


async def expect(response: Awaitable[httpx.Response], *statuses: int) -> dict[str, Any]:
    r = await response
    if r.status_code not in statuses:
        raise SetupError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")
    body = r.json()
    assert isinstance(body, dict)
    return body


async def bounded_gather(limit: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


class Api:
    """Setup through the API: departments, employees, grants, balances."""

    def __init__(self, client: httpx.AsyncClient, run_id: str) -> None:
        self.c = client
        self.run_id = run_id
        self._n = 0

    def key(self, label: str) -> dict[str, str]:
        self._n += 1
        return {"Idempotency-Key": f"{self.run_id}-{label}-{self._n}"}

    async def department(self, dept: str = DEPARTMENT) -> None:
        await expect(self.c.put(f"/v1/departments/{dept}", json={"name": dept.title()}), 200, 201)

    async def employees(self, ids: Sequence[str], dept: str = DEPARTMENT) -> None:
        def job(emp: str) -> Callable[[], Awaitable[Any]]:
            body = {"name": emp, "email": f"{emp}@bench.example", "department": dept}
            return lambda: expect(self.c.put(f"/v1/employees/{emp}", json=body), 200, 201)

        await bounded_gather(SETUP_CONCURRENCY, [job(e) for e in ids])

    async def grants(self, amounts: dict[str, int]) -> None:
        def job(emp: str, amount: int) -> Callable[[], Awaitable[Any]]:
            body = {
                "employee": emp,
                "amount": amount,
                "reason": "adjustment",
                "memo": "bench setup",
            }
            headers = self.key("setup-grant")
            return lambda: expect(self.c.post("/v1/grants", json=body, headers=headers), 201)

        await bounded_gather(SETUP_CONCURRENCY, [job(e, a) for e, a in amounts.items()])

    async def account(self, address: str) -> dict[str, Any]:
        return await expect(self.c.get(f"/v1/accounts/{address}"), 200)

    async def posted(self, address: str) -> int:
        return int((await self.account(address))["posted"])

    async def transactions(self, address: str, kind: str) -> list[dict[str, Any]]:
        """Every transaction of `kind` touching `address`, all pages (bounded)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"account": address, "kind": kind, "limit": 500}
            if cursor is not None:
                params["cursor"] = cursor
            page = await expect(self.c.get("/v1/transactions", params=params), 200)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items
        raise SetupError(f"GET /v1/transactions?account={address}: over {MAX_PAGES} pages")


# --- Measuring ------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def latency_summary(lat: Sequence[float]) -> dict[str, float | None]:
    """Percentiles, mean and max of an ascending list of seconds, in ms."""
    return {
        "p50": ms(percentile(lat, 50)),
        "p95": ms(percentile(lat, 95)),
        "p99": ms(percentile(lat, 99)),
        "mean": ms(sum(lat) / len(lat)) if lat else None,
        "max": ms(lat[-1]) if lat else None,
    }


@dataclass
class Stats:
    """What one scenario saw. `ok` answers are the expected 2xx (`ok_status`,
    or the status a request was sent expecting); `allowed` statuses (409 for
    transfers) are business rejections, not errors; everything else,
    transport failures included, is an error. An op is one request, unless
    the scenario counts its ops itself (`ops_done`, in `op_unit`s: a
    reserve+capture pair is one op of two requests)."""

    name: str
    workers: int
    planned: int
    time_cap: float
    ok_status: int
    allowed: frozenset[int] = frozenset()
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    transport: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    capped: bool = False
    setup_error: str | None = None
    check: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None
    op_unit: str = "request"
    ops_done: int | None = None
    ok_answers: int = 0
    # Latencies by request kind, for scenarios that send more than one kind.
    latencies_by: dict[str, list[float]] = field(default_factory=dict)

    def record(
        self,
        response: httpx.Response,
        seconds: float,
        expected: int | None = None,
        label: str | None = None,
    ) -> None:
        status = response.status_code
        self.statuses[status] += 1
        self.latencies.append(seconds)
        if label is not None:
            self.latencies_by.setdefault(label, []).append(seconds)
        if status == (self.ok_status if expected is None else expected):
            self.ok_answers += 1
        else:
            code = problem_code(response)
            self.codes[f"{status} {code}"] += 1
            if status not in self.allowed and len(self.samples) < 5:
                self.samples.append(
                    {
                        "status": status,
                        "path": response.request.url.path,
                        "body": response.text[:500],
                        "retry_after": response.headers.get("Retry-After"),
                    }
                )

    def record_transport(self, exc: Exception) -> None:
        self.transport[type(exc).__name__] += 1
        if len(self.samples) < 5:
            self.samples.append({"transport_error": f"{type(exc).__name__}: {exc}"[:300]})

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def requests(self) -> int:
        return self.answered + sum(self.transport.values())

    @property
    def ok(self) -> int:
        return self.ok_answers

    @property
    def ops(self) -> int:
        return self.ok if self.ops_done is None else self.ops_done

    @property
    def rejected(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in self.allowed)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def errors(self) -> int:
        return self.requests - self.ok - self.rejected

    @property
    def passed(self) -> bool:
        return (
            self.setup_error is None
            and self.errors == 0
            and (self.check is None or bool(self.check.get("passed", True)))
        )

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        elapsed = self.elapsed or float("nan")
        return {
            "name": self.name,
            "workers": self.workers,
            "op": self.op_unit,
            "planned": self.planned,
            "requests": self.requests,
            "ok": self.ok,
            "ops": self.ops,
            "rejected_409": self.rejected,
            "errors": self.errors,
            "server_errors_5xx": self.server_errors,
            "transport_errors": dict(self.transport),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "error_codes": dict(self.codes),
            "elapsed_s": round(self.elapsed, 3),
            "ops_per_s": round(self.ops / elapsed, 1) if self.elapsed else None,
            "req_per_s": round(self.requests / elapsed, 1) if self.elapsed else None,
            "latency_ms": latency_summary(lat),
            "latency_ms_by_request": {
                label: latency_summary(sorted(values))
                for label, values in self.latencies_by.items()
            },
            "time_cap_s": self.time_cap,
            "capped": self.capped,
            "setup_error": self.setup_error,
            "check": self.check,
            "cpu": self.cpu,
            "samples": self.samples,
            "passed": self.passed,
        }


Request = tuple[str, str, dict[str, Any] | None, dict[str, str] | None]


def split(total: int, workers: int) -> list[int]:
    """`total` requests over `workers`, as evenly as possible."""
    base, extra = divmod(total, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


async def run_workers(
    ctx: Context,
    stats: Stats,
    per_worker: Sequence[int],
    step: Callable[[int, int], Awaitable[None]],
) -> None:
    """Run workers, each doing its count of steps one after the other, until
    done or the scenario's time cap (a step begun before the cap finishes)."""
    before = await ctx.probe.snapshot() if ctx.probe else None
    started = time.monotonic()
    deadline = started + stats.time_cap

    async def worker(w: int, count: int) -> None:
        for i in range(count):
            if time.monotonic() >= deadline:
                stats.capped = True
                return
            await step(w, i)

    await asyncio.gather(*(worker(w, n) for w, n in enumerate(per_worker)))
    stats.elapsed = time.monotonic() - started
    if ctx.probe and before:
        stats.cpu = ctx.probe.delta(before, await ctx.probe.snapshot())


async def send(
    ctx: Context,
    stats: Stats,
    request: Request,
    expected: int | None = None,
    label: str | None = None,
) -> httpx.Response | None:
    """One timed request, recorded in stats; None after a transport error."""
    method, path, body, headers = request
    t0 = time.perf_counter()
    try:
        r = await ctx.client.request(method, path, json=body, headers=headers)
    except httpx.TransportError as exc:
        stats.record_transport(exc)
        return None
    stats.record(r, time.perf_counter() - t0, expected, label)
    return r


async def drive(
    ctx: Context,
    stats: Stats,
    per_worker: Sequence[int],
    make: Callable[[int, int], Request],
) -> None:
    """Run workers, each sending its count of requests one after the other,
    until done or the scenario's time cap."""

    async def step(w: int, i: int) -> None:
        await send(ctx, stats, make(w, i))

    await run_workers(ctx, stats, per_worker, step)


# --- Scenarios ------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuProbe:
    """Where the CPU went during a scenario: the service process, its
    PostgreSQL backends, this client, and the whole machine (whose busy share
    minus ours is the noise of other tenants). Linux /proc only; figures are
    in cores (1.0 = one core busy for the whole scenario)."""

    def __init__(self, service_pid: int, dsn: str) -> None:
        self.service_pid = service_pid
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.conn = await asyncpg.connect(
            self.dsn, timeout=10, server_settings={"application_name": "tokenledger-bench"}
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close(timeout=10)

    async def snapshot(self) -> dict[str, Any]:
        pids: list[int] = []
        if self.conn is not None:
            rows = await self.conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'tokenledger'",
                timeout=10,
            )
            pids = [int(r["pid"]) for r in rows]
        backends = {pid: process_cpu_seconds(pid) for pid in pids}
        return {
            "t": time.monotonic(),
            "service": process_cpu_seconds(self.service_pid),
            "client": time.process_time(),
            "postgres": {pid: v for pid, v in backends.items() if v is not None},
            "machine": machine_ticks(),
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(b["t"] - a["t"], 1e-9)

        def cores(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds / wall, 3)

        service = None
        if a["service"] is not None and b["service"] is not None:
            service = b["service"] - a["service"]
        # Backends that appeared during the scenario count from zero.
        pg = sum(v - a["postgres"].get(pid, 0.0) for pid, v in b["postgres"].items())
        busy = None
        if a["machine"] and b["machine"]:
            d_busy, d_total = (b["machine"][0] - a["machine"][0], b["machine"][1] - a["machine"][1])
            if d_total > 0:
                busy = round(d_busy / d_total * (os.cpu_count() or 1), 3)
        ours = (service or 0.0) + pg + (b["client"] - a["client"])
        return {
            "service_cores": cores(service),
            "postgres_cores": cores(pg),
            "client_cores": cores(b["client"] - a["client"]),
            "machine_busy_cores": busy,
            "others_cores": None if busy is None else round(max(0.0, busy - ours / wall), 3),
        }


@dataclass
class Options:
    scale: float = 1.0
    requests: int | None = None  # overrides each scenario's default count
    workers: int | None = None  # overrides the concurrent scenarios' workers
    only: tuple[str, ...] = ()
    json_path: Path = DEFAULT_JSON
    database_url: str | None = None
    seed: int = 1
    time_cap_scale: float = 1.0
    batch_size: int = USAGE_BATCH_SIZE_DEFAULT  # events per POST /v1/usage:batch


@dataclass
class Context:
    client: httpx.AsyncClient
    api: Api
    opts: Options
    run_id: str
    probe: CpuProbe | None = None
    # Credits that went to system:usage (successful debits and captures), per
    # scenario, for the system:usage check; None once an outcome is unknown
    # (a transport error).
    debited: dict[str, int | None] = field(default_factory=dict)

    def count(self, default: int) -> int:
        base = self.opts.requests if self.opts.requests is not None else default
        return max(1, round(base * self.opts.scale))

    def workers(self, default: int) -> int:
        return max(1, self.opts.workers or default)

    def key(self, scenario: str, w: int, i: int | str) -> dict[str, str]:
        return {"Idempotency-Key": f"{self.run_id}-{scenario}-{w}-{i}"}


def debits_known(stats: Stats) -> int | None:
    """Credits debited by a scenario of 1-credit debits, if every outcome is known."""
    return stats.ok if not stats.transport else None


async def balance_check(ctx: Context, address: str, expected: int | None) -> dict[str, Any]:
    actual = await ctx.api.posted(address)
    if expected is None:
        return {
            "account": address,
            "posted": actual,
            "passed": True,
            "skipped": "a transport error left some outcome unknown",
        }
    return {
        "account": address,
        "expected_posted": expected,
        "posted": actual,
        "passed": actual == expected,
    }


async def grant_latency(ctx: Context) -> Stats:
    """Single client, sequential POST /v1/grants of 1 credit."""
    n = ctx.count(300)
    stats = Stats("grant_latency", 1, n, 60 * ctx.opts.time_cap_scale, 201)
    emp = "lat-grant"
    await ctx.api.employees([emp])

    def make(w: int, i: int) -> Request:
        body = {"employee": emp, "amount": 1, "reason": "spot_bonus"}
        return "POST", "/v1/grants", body, ctx.key(stats.name, w, i)

    await drive(ctx, stats, [n], make)
    expected = stats.ok if not stats.transport else None
    stats.check = await balance_check(ctx, f"employee:{emp}", expected)
    return stats


async def debit_latency(ctx: Context) -> Stats:
    """Single client, sequential POST /v1/debits of 1 credit from one funded wallet."""
    n = ctx.count(300)
    stats = Stats("debit_latency", 1, n, 60 * ctx.opts.time_cap_scale, 201)
    emp, funded = "lat-debit", n + 100
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: funded})
    address = f"employee:{emp}"

    def make(w: int, i: int) -> Request:
        return "POST", "/v1/debits", {"account": address, "amount": 1}, ctx.key(stats.name, w, i)

    await drive(ctx, stats, [n], make)
    known = debits_known(stats)
    ctx.debited[stats.name] = known
    stats.check = await balance_check(ctx, address, None if known is None else funded - known)
    return stats


async def read_latency(ctx: Context) -> Stats:
    """Single client, sequential GET /v1/accounts/employee:... of a funded wallet."""
    n = ctx.count(300)
    stats = Stats("read_latency", 1, n, 60 * ctx.opts.time_cap_scale, 200)
    emp = "lat-read"
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: 1000})
    path = f"/v1/accounts/employee:{emp}"
    await drive(ctx, stats, [n], lambda w, i: ("GET", path, None, None))
    return stats


async def _debits(ctx: Context, name: str, shared: bool) -> Stats:
    workers = ctx.workers(32)
    total = ctx.count(800)
    per_worker = split(total, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 201)
    if shared:
        wallets = [f"{name.replace('_', '-')}-0"]
        funding = {wallets[0]: total + 100}
    else:
        wallets = [f"{name.replace('_', '-')}-{w}" for w in range(workers)]
        funding = {wallets[w]: per_worker[w] + 100 for w in range(workers)}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)

    def make(w: int, i: int) -> Request:
        wallet = wallets[0] if shared else wallets[w]
        body = {"account": f"employee:{wallet}", "amount": 1}
        return "POST", "/v1/debits", body, ctx.key(name, w, i)

    await drive(ctx, stats, per_worker, make)
    known = debits_known(stats)
    ctx.debited[name] = known
    if known is None:
        stats.check = {"passed": True, "skipped": "a transport error left some outcome unknown"}
    else:
        posted = {w: await ctx.api.posted(f"employee:{w}") for w in wallets}
        expected_total = sum(funding.values()) - known
        stats.check = {
            "wallets": len(wallets),
            "expected_posted_sum": expected_total,
            "posted_sum": sum(posted.values()),
            "passed": sum(posted.values()) == expected_total,
        }
    return stats


async def debit_spread(ctx: Context) -> Stats:
    """32 workers, each debiting 1 credit at a time from a wallet of its own."""
    return await _debits(ctx, "debit_spread_32", shared=False)


async def debit_shared(ctx: Context) -> Stats:
    """32 workers, all debiting 1 credit at a time from one shared wallet."""
    return await _debits(ctx, "debit_shared_32", shared=True)


@dataclass
class PairLog:
    """What the workers of a reservation scenario learned, for its checks."""

    created: dict[str, str] = field(default_factory=dict)  # reservation id -> wallet
    captured: dict[str, int] = field(default_factory=dict)  # reservation id -> amount
    capture_answers: Counter[str] = field(default_factory=Counter)  # id -> 200 answers
    over_captures: int = 0
    unknown_reserves: int = 0  # transport errors: a hold may exist that we do not know
    unknown_captures: int = 0  # transport errors: a capture may have happened


async def _reserve_capture(ctx: Context, name: str, shared: bool) -> Stats:
    """Workers each doing sequential pairs: reserve RESERVE_AMOUNT, then
    capture 1..RESERVE_AMOUNT of it, or now and then OVER_CAPTURE_AMOUNT.
    One op = one pair (both answers 2xx); latencies are per request."""
    workers = ctx.workers(32)
    total = ctx.count(800)  # pairs
    per_worker = split(total, workers)
    stats = Stats(
        name, workers, total, 90 * ctx.opts.time_cap_scale, 201, op_unit="reserve+capture pair"
    )
    stats.ops_done = 0
    # Enough for every pair to over-capture, and for every worker's hold at once.
    margin = 100 + workers * OVER_CAPTURE_AMOUNT
    if shared:
        # One team wallet (an employee wallet) that every worker spends from.
        wallets = [f"{name.replace('_', '-')}-team"]
        funding = {wallets[0]: total * OVER_CAPTURE_AMOUNT + margin}
    else:
        wallets = [f"{name.replace('_', '-')}-{w}" for w in range(workers)]
        funding = {wallets[w]: per_worker[w] * OVER_CAPTURE_AMOUNT + margin for w in range(workers)}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    usage_before = await ctx.api.posted("system:usage")
    rngs = [random.Random(ctx.opts.seed * 1000 + w) for w in range(workers)]  # noqa: S311  # why: load shape, not security
    log = PairLog()

    async def step(w: int, i: int) -> None:
        wallet = wallets[0] if shared else wallets[w]
        reserve = {"account": f"employee:{wallet}", "amount": RESERVE_AMOUNT}
        r = await send(
            ctx,
            stats,
            ("POST", "/v1/reservations", reserve, ctx.key(name, w, f"{i}-reserve")),
            201,
            "reserve",
        )
        if r is None:
            log.unknown_reserves += 1
            return
        if r.status_code != 201:
            return
        rid = str(r.json()["id"])
        log.created[rid] = wallet
        over = (w + i) % OVER_CAPTURE_EVERY == 0
        amount = OVER_CAPTURE_AMOUNT if over else rngs[w].randint(1, RESERVE_AMOUNT)
        c = await send(
            ctx,
            stats,
            (
                "POST",
                f"/v1/reservations/{rid}/capture",
                {"amount": amount},
                ctx.key(name, w, f"{i}-capture"),
            ),
            200,
            "capture",
        )
        if c is None:
            log.unknown_captures += 1
            return
        if c.status_code == 200:
            log.capture_answers[rid] += 1
            log.captured[rid] = amount
            log.over_captures += int(over)
            stats.ops_done = (stats.ops_done or 0) + 1

    await run_workers(ctx, stats, per_worker, step)
    captured_sum = sum(log.captured.values())
    ctx.debited[name] = None if log.unknown_captures else captured_sum
    stats.check = await pair_check(ctx, stats, log, wallets, funding, usage_before)
    return stats


async def pair_check(
    ctx: Context,
    stats: Stats,
    log: PairLog,
    wallets: Sequence[str],
    funding: dict[str, int],
    usage_before: int,
) -> dict[str, Any]:
    """After a reservation scenario: no 5xx; every reservation the workers
    created got exactly one successful capture (by its answers, and by the
    capture transactions on the wallets); every wallet's `reserved` is 0;
    system:usage gained, and the wallets lost, exactly the captured credits."""
    captured_sum = sum(log.captured.values())
    accounts = {w: await ctx.api.account(f"employee:{w}") for w in wallets}
    usage_gain = await ctx.api.posted("system:usage") - usage_before
    # Capture transactions, by the reservation they captured (details.reservation_id).
    txn_count: Counter[str] = Counter()
    txn_amount: dict[str, int] = {}
    for w in wallets:
        for txn in await ctx.api.transactions(f"employee:{w}", "capture"):
            rid = str((txn.get("details") or {}).get("reservation_id"))
            txn_count[rid] += 1
            txn_amount[rid] = sum(
                int(e["amount"]) for e in txn["entries"] if e["account"] == "system:usage"
            )
    not_captured = [rid for rid in log.created if log.capture_answers[rid] != 1]
    txn_not_once = [rid for rid in log.created if txn_count[rid] != 1]
    txn_unexpected = [rid for rid in txn_count if rid not in log.created]
    amount_wrong = [rid for rid, amount in log.captured.items() if txn_amount.get(rid) != amount]
    reserved = {w: int(a["reserved"]) for w, a in accounts.items() if int(a["reserved"]) != 0}
    posted_sum = sum(int(a["posted"]) for a in accounts.values())
    expected_posted = sum(funding.values()) - captured_sum
    check: dict[str, Any] = {
        "wallets": len(wallets),
        "server_errors_5xx": stats.server_errors,
        "reservations_created": len(log.created),
        "captures_ok": len(log.captured),
        "over_captures_ok": log.over_captures,
        "not_captured_exactly_once": not_captured[:10],
        "capture_transactions": sum(txn_count.values()),
        "capture_transactions_not_once": txn_not_once[:10],
        "capture_transactions_unexpected": txn_unexpected[:10],
        "capture_amount_mismatch": amount_wrong[:10],
        "reserved_nonzero": dict(list(reserved.items())[:10]),
        "captured_sum": captured_sum,
        "usage_gain": usage_gain,
        "expected_posted_sum": expected_posted,
        "posted_sum": posted_sum,
    }
    check["passed"] = (
        stats.server_errors == 0
        and not not_captured
        and not txn_not_once
        and not txn_unexpected
        and not amount_wrong
        and not reserved
        and usage_gain == captured_sum
        and posted_sum == expected_posted
    )
    if log.unknown_reserves or log.unknown_captures:
        # As the other scenarios: with an outcome unknown, the arithmetic
        # cannot be checked (the transport errors already fail the scenario).
        check["passed"] = True
        check["skipped"] = (
            f"transport errors left {log.unknown_reserves} reserve(s) and "
            f"{log.unknown_captures} capture(s) unknown"
        )
    return check


async def reserve_capture_spread(ctx: Context) -> Stats:
    """32 workers, each doing reserve-then-capture pairs on a wallet of its own."""
    return await _reserve_capture(ctx, "reserve_capture_spread_32", shared=False)


async def reserve_capture_shared(ctx: Context) -> Stats:
    """32 workers, all doing reserve-then-capture pairs on one shared team wallet."""
    return await _reserve_capture(ctx, "reserve_capture_shared_32", shared=True)


async def transfer_pairs(ctx: Context) -> Stats:
    """16 workers transferring 1..5 credits between random pairs of 32 wallets."""
    workers = ctx.workers(16)
    n_wallets = 2 * workers
    total = ctx.count(640)
    per_worker = split(total, workers)
    stats = Stats(
        "transfer_pairs",
        workers,
        total,
        90 * ctx.opts.time_cap_scale,
        201,
        allowed=frozenset({409}),
    )
    wallets = [f"pair-{k}" for k in range(n_wallets)]
    funding = {w: 10_000 for w in wallets}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    rngs = [random.Random(ctx.opts.seed * 1000 + w) for w in range(workers)]  # noqa: S311  # why: load shape, not security

    def make(w: int, i: int) -> Request:
        a, b = rngs[w].sample(range(n_wallets), 2)
        body = {
            "from": f"employee:{wallets[a]}",
            "to": f"employee:{wallets[b]}",
            "amount": rngs[w].randint(1, 5),
        }
        return "POST", "/v1/transfers", body, ctx.key(stats.name, w, i)

    await drive(ctx, stats, per_worker, make)
    # Transfers move credits between these wallets only: their sum never changes.
    posted = [await ctx.api.posted(f"employee:{w}") for w in wallets]
    stats.check = {
        "wallets": n_wallets,
        "expected_posted_sum": sum(funding.values()),
        "posted_sum": sum(posted),
        "min_posted": min(posted),
        "passed": sum(posted) == sum(funding.values()) and min(posted) >= 0,
    }
    return stats


# --- Usage events -----------------------------------------------------------------

# The usage scenarios charge events of one bench model, priced from
# USAGE_PRICE_FROM, spread round-robin over USAGE_WALLETS funded wallets.
# Token counts vary per event (a seeded generator), so costs vary and some
# round up; the expected cost of each is service.pricing.usage_cost.
USAGE_MODEL = "bench-model"
USAGE_SOURCE = "bench"
USAGE_PRICE_FROM = "2024-01-01T00:00:00Z"
USAGE_RATES = {"input_per_mtok": 3_000, "cached_input_per_mtok": 300, "output_per_mtok": 15_000}
USAGE_WALLETS = 32
# A second send of events already recorded (the duplicate check), at most.
USAGE_RESEND_MAX = 500
USAGE_SINGLE_RESEND_SINGLY = 16


@dataclass
class UsageEvent:
    body: dict[str, Any]
    cost: int  # expected, by service.pricing.usage_cost

    @property
    def event_id(self) -> str:
        return str(self.body["event_id"])

    @property
    def wallet(self) -> str:
        return str(self.body["account"])


@dataclass
class UsageLog:
    """What the workers of a usage scenario learned, for its checks."""

    recorded: dict[str, int] = field(default_factory=dict)  # event id -> expected cost
    answers: Counter[str] = field(default_factory=Counter)  # event statuses (and codes)
    cost_mismatch: list[dict[str, Any]] = field(default_factory=list)
    order_mismatch: int = 0
    sent: int = 0  # events sent (answered or not)


async def usage_price(ctx: Context) -> Any:
    """The bench model's price version (created once; the same version again
    answers the existing one), as rates for usage_cost."""
    from service.pricing import PriceRates

    body = {"model": USAGE_MODEL, "effective_from": USAGE_PRICE_FROM, **USAGE_RATES}
    price = await expect(
        ctx.client.post("/v1/prices", json=body, headers=ctx.api.key("setup-price")), 200, 201
    )
    rates = {k: int(price[k]) for k in USAGE_RATES}
    if rates != USAGE_RATES:
        raise SetupError(f"POST /v1/prices answered other rates: {rates} != {USAGE_RATES}")
    return PriceRates(**rates)


def usage_events(
    ctx: Context, name: str, wallets: Sequence[str], total: int, rates: Any
) -> list[UsageEvent]:
    """`total` events with unique ids, round-robin over `wallets`."""
    from service.pricing import usage_cost

    rng = random.Random(ctx.opts.seed * 7919 + len(name))  # noqa: S311  # why: load shape, not security
    events: list[UsageEvent] = []
    for k in range(total):
        input_tokens = rng.randint(100, 4000)
        cached = rng.randint(0, input_tokens // 2) if k % 3 else 0
        output_tokens = rng.randint(10, 1000)
        body: dict[str, Any] = {
            "source": USAGE_SOURCE,
            "event_id": f"{ctx.run_id}-{name}-{k}",
            "account": f"employee:{wallets[k % len(wallets)]}",
            "model": USAGE_MODEL,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        if cached:  # else left out: the default 0
            body["cached_input_tokens"] = cached
        events.append(UsageEvent(body, usage_cost(input_tokens, cached, output_tokens, rates)))
    return events


async def usage_setup(
    ctx: Context, name: str, total: int
) -> tuple[list[str], dict[str, int], list[UsageEvent]]:
    """Untimed: the price, USAGE_WALLETS wallets each funded with the expected
    cost of its events plus a margin, and the events."""
    rates = await usage_price(ctx)
    wallets = [f"{name.replace('_', '-')}-{k}" for k in range(USAGE_WALLETS)]
    events = usage_events(ctx, name, wallets, total, rates)
    funding = {w: 100 for w in wallets}
    for e in events:
        funding[e.wallet.removeprefix("employee:")] += e.cost
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    return wallets, funding, events


def note_answer(log: UsageLog, event: UsageEvent, status: str, cost: Any, code: Any) -> None:
    log.answers[status if code is None else f"{status} {code}"] += 1
    if status != "recorded":
        return
    log.recorded[event.event_id] = event.cost
    if cost != event.cost and len(log.cost_mismatch) < 10:
        log.cost_mismatch.append({"event_id": event.event_id, "cost": cost, "expected": event.cost})


async def resend_batch(ctx: Context, events: Sequence[UsageEvent]) -> dict[str, Any]:
    """Untimed: events already recorded, sent again as one batch: every one
    must answer duplicate (with its cost)."""
    r = await ctx.client.post("/v1/usage:batch", json={"events": [e.body for e in events]})
    answers: Counter[str] = Counter()
    wrong: list[Any] = []
    if r.status_code == 200:
        results = r.json().get("results") or []
        for e, res in zip(events, results, strict=False):
            answers[str(res.get("status"))] += 1
            if res.get("status") != "duplicate" or res.get("event_id") != e.event_id:
                if len(wrong) < 5:
                    wrong.append(res)
        if len(results) != len(events):
            wrong.append(f"{len(results)} results for {len(events)} events")
    else:
        wrong.append(f"{r.status_code} {r.text[:300]}")
    return {
        "events": len(events),
        "answers": dict(answers),
        "wrong": wrong,
        "passed": not wrong and answers["duplicate"] == len(events),
    }


async def usage_check(
    ctx: Context,
    stats: Stats,
    log: UsageLog,
    wallets: Sequence[str],
    funding: dict[str, int],
    usage_before: int,
    resend: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """After a usage scenario: every event sent answered recorded with its
    expected cost; system:usage gained, and the wallets lost, exactly the
    expected costs; a second send answers duplicate and charges nothing."""
    expected_gain = sum(log.recorded.values())
    usage_gain = await ctx.api.posted("system:usage") - usage_before
    posted_sum = sum([await ctx.api.posted(f"employee:{w}") for w in wallets])
    expected_posted = sum(funding.values()) - expected_gain
    check: dict[str, Any] = {
        "wallets": len(wallets),
        "events_sent": log.sent,
        "events_recorded": len(log.recorded),
        "event_answers": dict(log.answers),
        "cost_mismatch": log.cost_mismatch,
        "results_out_of_order": log.order_mismatch,
        "expected_usage_gain": expected_gain,
        "usage_gain": usage_gain,
        "expected_posted_sum": expected_posted,
        "posted_sum": posted_sum,
    }
    if stats.transport:
        check["passed"] = True
        check["skipped"] = "a transport error left some outcome unknown"
        return check
    duplicate = await resend()
    resend_gain = await ctx.api.posted("system:usage") - usage_before - usage_gain
    posted_after = sum([await ctx.api.posted(f"employee:{w}") for w in wallets])
    duplicate["usage_gain"] = resend_gain
    duplicate["posted_change"] = posted_after - posted_sum
    duplicate["passed"] = duplicate["passed"] and resend_gain == 0 and posted_after == posted_sum
    check["second_send"] = duplicate
    check["passed"] = (
        stats.server_errors == 0
        and len(log.recorded) == log.sent
        and not log.cost_mismatch
        and not log.order_mismatch
        and usage_gain == expected_gain
        and posted_sum == expected_posted
        and duplicate["passed"]
    )
    return check


async def usage_single(ctx: Context) -> Stats:
    """16 workers, each posting single POST /v1/usage events (unique ids)
    against 32 funded wallets. One op = one event = one request."""
    name = "usage_single"
    workers = ctx.workers(16)
    total = ctx.count(800)
    per_worker = split(total, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 201, op_unit="event")
    stats.ops_done = 0
    wallets, funding, events = await usage_setup(ctx, name, total)
    starts = [sum(per_worker[:w]) for w in range(workers)]
    usage_before = await ctx.api.posted("system:usage")
    log = UsageLog()

    async def step(w: int, i: int) -> None:
        event = events[starts[w] + i]
        log.sent += 1
        r = await send(ctx, stats, ("POST", "/v1/usage", event.body, None))
        if r is None:
            return
        if r.status_code in (200, 201):
            body = r.json()
            status = str(body.get("status"))
            if r.status_code == 201 and status == "recorded":
                stats.ops_done = (stats.ops_done or 0) + 1
            note_answer(log, event, status, body.get("cost"), None)
        else:
            log.answers[f"{r.status_code} {problem_code(r)}"] += 1

    await run_workers(ctx, stats, per_worker, step)
    ctx.debited[name] = None if stats.transport else sum(log.recorded.values())
    sent = [e for e in events if e.event_id in log.recorded]

    async def resend() -> dict[str, Any]:
        # A few singly (200 duplicate each), then up to USAGE_RESEND_MAX as one batch.
        singly: Counter[str] = Counter()
        for e in sent[:USAGE_SINGLE_RESEND_SINGLY]:
            r = await ctx.client.post("/v1/usage", json=e.body)
            ok = r.status_code == 200 and r.json().get("status") == "duplicate"
            ok = ok and r.json().get("cost") == e.cost
            singly["duplicate" if ok else f"{r.status_code} {r.text[:100]}"] += 1
        batch = await resend_batch(ctx, sent[:USAGE_RESEND_MAX])
        batch["singly"] = dict(singly)
        n = min(len(sent), USAGE_SINGLE_RESEND_SINGLY)
        batch["passed"] = batch["passed"] and singly["duplicate"] == n
        return batch

    stats.check = await usage_check(ctx, stats, log, wallets, funding, usage_before, resend)
    return stats


async def usage_batch(ctx: Context) -> Stats:
    """A few workers (2), each posting POST /v1/usage:batch of --batch-size (500)
    events (unique ids, spread over the same 32 wallets). The count is of
    events; one op is one event recorded, latencies are per request."""
    name = "usage_batch_500"
    size = max(1, ctx.opts.batch_size)
    total = ctx.count(20_000)  # events
    batches = math.ceil(total / size)
    workers = min(ctx.workers(2), batches)
    per_worker = split(batches, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 200, op_unit="event")
    stats.ops_done = 0
    wallets, funding, events = await usage_setup(ctx, name, total)
    chunks = [events[b * size : (b + 1) * size] for b in range(batches)]
    starts = [sum(per_worker[:w]) for w in range(workers)]
    usage_before = await ctx.api.posted("system:usage")
    log = UsageLog()
    sent_chunks: list[list[UsageEvent]] = []

    async def step(w: int, i: int) -> None:
        chunk = chunks[starts[w] + i]
        log.sent += len(chunk)
        body = {"events": [e.body for e in chunk]}
        r = await send(ctx, stats, ("POST", "/v1/usage:batch", body, None))
        if r is None:
            return
        if r.status_code != 200:
            log.answers[f"{r.status_code} {problem_code(r)}"] += len(chunk)
            return
        sent_chunks.append(chunk)
        results = r.json().get("results") or []
        if len(results) != len(chunk):
            log.order_mismatch += 1
        for e, res in zip(chunk, results, strict=False):
            if res.get("event_id") != e.event_id:
                log.order_mismatch += 1
                continue
            note_answer(log, e, str(res.get("status")), res.get("cost"), res.get("code"))
            if res.get("status") == "recorded":
                stats.ops_done = (stats.ops_done or 0) + 1

    await run_workers(ctx, stats, per_worker, step)
    ctx.debited[name] = None if stats.transport else sum(log.recorded.values())

    async def resend() -> dict[str, Any]:
        if not sent_chunks:
            return {"events": 0, "wrong": ["no batch answered 200"], "passed": False}
        return await resend_batch(ctx, sent_chunks[0])

    stats.check = await usage_check(ctx, stats, log, wallets, funding, usage_before, resend)
    stats.check["batch_size"] = size
    stats.check["batches"] = batches
    return stats


SCENARIOS: dict[str, Callable[[Context], Awaitable[Stats]]] = {
    "grant_latency": grant_latency,
    "debit_latency": debit_latency,
    "read_latency": read_latency,
    "debit_spread_32": debit_spread,
    "debit_shared_32": debit_shared,
    "transfer_pairs": transfer_pairs,
    "reserve_capture_spread_32": reserve_capture_spread,
    "reserve_capture_shared_32": reserve_capture_shared,
    "usage_single": usage_single,
    "usage_batch_500": usage_batch,
}

# Ratios of ops/s, shared over spread, reported when both scenarios ran.
RATIOS = {
    "shared_over_spread": ("debit_spread_32", "debit_shared_32"),
    "reserve_capture_shared_over_spread": (
        "reserve_capture_spread_32",
        "reserve_capture_shared_32",
    ),
    # Events per second, batch over single.
    "usage_batch_over_single": ("usage_single", "usage_batch_500"),
}


async def warm_up(ctx: Context, concurrency: int) -> dict[str, Any]:
    """Untimed: open the client's connections and the service's pool, and let
    PostgreSQL plan the functions once per connection."""
    emp = "warm-up"
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: 10 * concurrency + 100})
    stats = Stats("warm_up", concurrency, 2 * concurrency, 60, 201)

    def make(w: int, i: int) -> Request:
        if i == 0:
            return (
                "POST",
                "/v1/debits",
                {"account": f"employee:{emp}", "amount": 1},
                ctx.key("warm", w, i),
            )
        return "GET", f"/v1/accounts/employee:{emp}", None, None

    await drive(ctx, stats, [2] * concurrency, make)
    debits_ok = stats.statuses[201]
    ctx.debited["warm_up"] = debits_ok if not stats.transport else None
    return {
        "requests": stats.requests,
        "statuses": {str(k): v for k, v in stats.statuses.items()},
        "seconds": round(stats.elapsed, 2),
    }


# --- Running and reporting ------------------------------------------------------------


def machine_facts(db: Database | None) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": affinity,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if db is not None:
        facts["postgres"] = db.server_version
        facts["postgres_settings"] = db.settings
        facts["postgres_source"] = db.source
    return facts


def git_commit() -> str | None:
    """HEAD of the checkout (read-only), so a result names the code it measured."""
    try:
        result = subprocess.run(  # noqa: S603  # why: fixed read-only git command
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def selected(only: Sequence[str]) -> list[str]:
    names = list(SCENARIOS)
    if not only:
        return names
    unknown = [n for n in only if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}"
        )
    return [n for n in names if n in only]


async def run_bench(opts: Options) -> dict[str, Any]:
    """Provision, start the service, run the scenarios, audit, tear down."""
    names = selected(opts.only)
    run_id = f"b{os.getpid()}-{int(time.time())}"
    started_at = datetime.now(UTC)
    result: dict[str, Any] = {
        "tool": "tokenledger bench",
        "started_at": started_at.isoformat(),
        "git_commit": git_commit(),
        "options": {
            "scale": opts.scale,
            "requests": opts.requests,
            "workers": opts.workers,
            "only": list(opts.only),
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "pool_max_size": POOL_MAX_SIZE,
            "auth": "bootstrap admin service key; rate limits raised out of reach",
        },
        "scenarios": [],
        "ratios": {},
        "checks": {},
    }
    db = await provision(opts.database_url, f"tokenledger_bench_{os.getpid()}")
    result["database"] = {"source": db.source, "dsn": redact(db.dsn)}
    result["machine"] = machine_facts(db)
    log_path = opts.json_path.with_suffix(".service.log")
    service = Service(db.dsn, log_path)
    result["service_log"] = str(log_path)
    try:
        service.start()
        result["service_ready_s"] = round(await service.wait_ready(), 2)
        concurrency = max(opts.workers or 32, 1)
        async with make_client(service.base_url, concurrency, service.admin_key) as client:
            ctx = Context(client, Api(client, run_id), opts, run_id)
            if sys.platform.startswith("linux") and service.proc is not None:
                ctx.probe = CpuProbe(service.proc.pid, db.dsn)
                await ctx.probe.open()
            await ctx.api.department()
            result["warm_up"] = await warm_up(ctx, concurrency)
            usage_before = await ctx.api.posted("system:usage")
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                try:
                    stats = await SCENARIOS[name](ctx)
                except (SetupError, httpx.TransportError) as exc:
                    stats = Stats(name, 0, 0, 0, 0)
                    stats.setup_error = f"{type(exc).__name__}: {exc}"[:1000]
                result["scenarios"].append(stats.summary())
                if not service.alive():
                    result["checks"]["service_died"] = service.log_tail()
                    break
            if ctx.probe is not None:
                await ctx.probe.close()
            # Everything debited or captured since the baseline went to system:usage.
            debits = [v for k, v in ctx.debited.items() if k != "warm_up"]
            usage_after = await ctx.api.posted("system:usage")
            if any(v is None for v in debits):
                result["checks"]["system_usage"] = {
                    "passed": True,
                    "skipped": "a transport error left some debit unknown",
                }
            else:
                expected = sum(v for v in debits if v is not None)
                result["checks"]["system_usage"] = {
                    "expected_gain": expected,
                    "gain": usage_after - usage_before,
                    "passed": usage_after - usage_before == expected,
                }
    finally:
        result["service_stop"] = await asyncio.to_thread(service.stop)
        events = service.log_events()
        result["service_log_events"] = dict(events)
        result["service_unhandled_exceptions"] = dict(service.unhandled_exceptions())
        try:
            result["checks"]["audit"] = await asyncio.to_thread(run_audit, db.dsn)
            result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            await db.drop()
    by_name = {s["name"]: s for s in result["scenarios"]}
    for ratio, (spread_name, shared_name) in RATIOS.items():
        spread, shared = by_name.get(spread_name), by_name.get(shared_name)
        if spread and shared and spread["ops_per_s"] and shared["ops_per_s"] is not None:
            result["ratios"][ratio] = round(shared["ops_per_s"] / spread["ops_per_s"], 3)
    result["finished_at"] = datetime.now(UTC).isoformat()
    result["passed"] = (
        all(s["passed"] for s in result["scenarios"])
        and len(result["scenarios"]) == len(names)
        and all(c.get("passed", False) for c in result["checks"].values() if isinstance(c, dict))
        and "service_died" not in result["checks"]
        and result["service_log_events"].get("unhandled_error", 0) == 0
    )
    return result


def fmt(value: Any, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rjust(width)
    return str(value).rjust(width)


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'scenario':<26}{'workers':>8}{'requests':>9}{'ok':>7}{'errors':>7}{'5xx':>6}"
        f"{'ops/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in result["scenarios"]:
        lat = s["latency_ms"]
        note = "  (capped)" if s["capped"] else ""
        note += f"  SETUP FAILED: {s['setup_error'][:80]}" if s["setup_error"] else ""
        note += "" if s["check"] is None or s["check"].get("passed") else "  CHECK FAILED"
        lines.append(
            f"{s['name']:<26}{fmt(s['workers'], 8)}{fmt(s['requests'], 9)}{fmt(s['ok'], 7)}"
            f"{fmt(s['errors'], 7)}{fmt(s['server_errors_5xx'], 6)}{fmt(s['ops_per_s'], 9)}"
            f"{fmt(lat['p50'], 9, 2)}{fmt(lat['p95'], 9, 2)}{fmt(lat['p99'], 9, 2)}"
            f"{fmt(lat['mean'], 9, 2)}{note}"
        )
    units = sorted({s["op"] for s in result["scenarios"] if s.get("op", "request") != "request"})
    for unit in units:
        names = ", ".join(s["name"] for s in result["scenarios"] if s.get("op") == unit)
        lines.append(f"ops/s of {names}: {unit}s per second (latencies per request)")
    lines.append("")
    if any(s.get("cpu") for s in result["scenarios"]):
        lines.append(
            f"{'cpu, in cores':<26}{'service':>9}{'postgres':>9}{'client':>9}"
            f"{'others':>9}{'machine':>9}  (of {os.cpu_count()})"
        )
        for s in result["scenarios"]:
            c = s.get("cpu") or {}
            lines.append(
                f"{s['name']:<26}{fmt(c.get('service_cores'), 9, 2)}"
                f"{fmt(c.get('postgres_cores'), 9, 2)}{fmt(c.get('client_cores'), 9, 2)}"
                f"{fmt(c.get('others_cores'), 9, 2)}{fmt(c.get('machine_busy_cores'), 9, 2)}"
            )
        lines.append("")
    ratio = result["ratios"].get("shared_over_spread")
    if ratio is not None:
        lines.append(f"ratio shared/spread (ops/s): {ratio:.3f}")
    ratio = result["ratios"].get("reserve_capture_shared_over_spread")
    if ratio is not None:
        lines.append(f"ratio reserve_capture shared/spread (pairs/s): {ratio:.3f}")
    ratio = result["ratios"].get("usage_batch_over_single")
    if ratio is not None:
        lines.append(f"ratio usage batch/single (events/s): {ratio:.3f}")
    for name, check in result["checks"].items():
        if isinstance(check, dict):
            verdict = "pass" if check.get("passed") else "FAIL"
            extra = f" ({check['skipped']})" if check.get("skipped") else ""
            lines.append(f"check {name}: {verdict}{extra}")
            if name == "audit" and not check.get("passed"):
                lines.append("  " + check.get("output", "").replace("\n", "\n  "))
        else:
            lines.append(f"check {name}: FAIL\n{check}")
    events = result.get("service_log_events", {})
    if events:
        lines.append(
            "service log events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items()))
        )
    for exc, n in result.get("service_unhandled_exceptions", {}).items():
        lines.append(f"  500 x{n}: {exc}")
    m = result.get("machine", {})
    lines.append(
        f"machine: nproc={m.get('nproc')} python={m.get('python')} "
        f"postgres={m.get('postgres_settings', {}).get('server_version')} "
        f"loadavg start={m.get('loadavg_start')} end={m.get('loadavg_end')}"
    )
    lines.append("result: " + ("PASS" if result["passed"] else "FAIL"))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every scenario's request count (default 1)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="request count of every scenario before --scale (default: each "
        "scenario's own: 300 sequential, 800 debits, 640 transfers); for the "
        "reserve_capture scenarios, the count of reserve+capture pairs (800); for "
        "the usage scenarios, the count of events (800 single, 20000 in batches)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers of the concurrent scenarios (default 32, transfers and "
        "usage_single 16, usage_batch_500 2, at most one per batch)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this scenario (repeatable, or comma-separated): " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        dest="json_path",
        help=f"write the JSON result here (default {DEFAULT_JSON.relative_to(REPO)})",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL server to create the bench database on "
        "(default DATABASE_URL; unset: a throwaway server)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=USAGE_BATCH_SIZE_DEFAULT,
        help=f"events per POST /v1/usage:batch in usage_batch_500, 1..1000 "
        f"(default {USAGE_BATCH_SIZE_DEFAULT})",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.workers is not None and not 1 <= args.workers <= 256:
        parser.error("--workers must be 1..256")
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size must be 1..1000")
    only = tuple(n.strip() for item in args.only for n in item.split(",") if n.strip())
    return Options(
        scale=args.scale,
        requests=args.requests,
        workers=args.workers,
        only=only,
        json_path=args.json_path.resolve(),
        database_url=args.database_url,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def run_async(coro: Awaitable[Any]) -> Any:
    """Run on uvloop when it is installed (less client CPU taken from the
    service on a small machine), else on asyncio's loop."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    selected(opts.only)  # fail fast on a typo
    result = run_async(run_bench(opts))
    write_json(result, opts.json_path)
    print(table(result))
    print(json.dumps(result, indent=2))
    print(f"bench: wrote {opts.json_path}", file=sys.stderr)
    return 0 if result["passed"] else 1
