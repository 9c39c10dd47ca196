"""Browser fixtures: the service on a real port over a real PostgreSQL, and one
headless Debian Chromium driven by Playwright for the module's tests.

The browser is the system's (`/usr/bin/chromium`, `.ci/run` installs it);
Playwright never downloads one. A missing Chromium fails these tests with a
clear message: it is not a skip.

Every browser context routes every request: one to the service's own origin
goes through, any other is aborted and recorded, and the module's last test
asserts that none was recorded (`site.outside`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import uvicorn
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from service.app import create_app
from service.auth import new_key
from service.config import Config
from tests.api.conftest import JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET, FakeClock
from tests.pg import Server, cloned_database

CHROMIUM = os.environ.get("TOKENLEDGER_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent.parent / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# A file for the request log of the service timed apart (service_apart):
# each request's latency_seconds as the service measured it.
SERVICE_LOG = os.environ.get("TOKENLEDGER_PAGES_SERVICE_LOG", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    """The running service: its base URL, an admin client, its clock, and the
    requests that tried to leave its origin."""

    base: str
    admin: httpx.Client
    admin_key: str
    clock: FakeClock
    database_url: str
    outside: list[str] = field(default_factory=list)

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


T = TypeVar("T")


def off_loop(fn: Callable[[], T]) -> T:
    """fn() in a thread of its own, where it may run an event loop of its own
    (tests.pg's helpers do) whatever runs in the test's thread."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001  # why: re-raised in the caller
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@pytest.fixture(scope="module")
def site(pg_server: Server, template_database: str) -> Iterator[Site]:
    """The service (create_app, served by uvicorn on a free port in a thread of
    its own) on a database of this module's own."""
    clone = cloned_database(pg_server, template_database)
    dsn = off_loop(clone.__enter__)
    try:
        admin_key = new_key().secret
        clock = FakeClock()
        config = Config(
            database_url=dsn,
            apply_schema=False,
            background_enabled=False,
            pool_min_size=1,
            pool_max_size=10,
            pool_acquire_timeout_seconds=5,
            connect_timeout_seconds=2,
            log_format="json",
            log_level="warning",
            environment="development",
            bootstrap_admin_key=admin_key,
            jwt_issuer=JWT_ISSUER,
            jwt_audience=JWT_AUDIENCE,
            jwt_hs256_secret=JWT_SECRET,
            jwt_allowed_roles="employee,hr,finance",
            usage_max_age_seconds=5 * 365 * 86_400,
            rate_limits="",
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, clock=clock),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
            )
        )
        thread = threading.Thread(target=server.run, name="tokenledger-pages", daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "the service did not start"
            assert time.monotonic() < deadline, "the service did not start within 30 s"
            time.sleep(0.05)
        admin = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )
        try:
            yield Site(base, admin, admin_key, clock, dsn)
        finally:
            admin.close()
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        off_loop(lambda: clone.__exit__(None, None, None))


@contextlib.contextmanager
def service_apart(site: Site) -> Iterator[str]:
    """The service as it is deployed, for timing pages: `python -m service
    serve` in processes of its own (its default worker count, one per core;
    uvloop and httptools) on the module's database, with the same employee
    tokens and no rate limits; yields its base URL. The `site` fixture's
    service runs in a thread of the test process, where every request waits
    its turn for the interpreter lock with Playwright's client, and its
    answers are timed the slower for it; a real service has its processes
    to itself."""
    port = free_port()
    env = os.environ | {
        "TOKENLEDGER_DATABASE_URL": site.database_url,
        "TOKENLEDGER_APPLY_SCHEMA": "false",
        "TOKENLEDGER_ENVIRONMENT": "development",
        "TOKENLEDGER_HOST": "127.0.0.1",
        "TOKENLEDGER_PORT": str(port),
        "TOKENLEDGER_LOG_LEVEL": "info" if SERVICE_LOG else "warning",
        "TOKENLEDGER_RATE_LIMITS": "",
        # The site's own admin key: a bootstrap key replaces the one before.
        "TOKENLEDGER_BOOTSTRAP_ADMIN_KEY": site.admin_key,
        "TOKENLEDGER_JWT_ISSUER": JWT_ISSUER,
        "TOKENLEDGER_JWT_AUDIENCE": JWT_AUDIENCE,
        "TOKENLEDGER_JWT_HS256_SECRET": JWT_SECRET,
        "TOKENLEDGER_JWT_ALLOWED_ROLES": "employee,hr,finance",
    }
    # Its output in a file, read back if it fails: a pipe nobody reads would
    # stop the service once full.
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def said(last: int = 3000) -> str:
        output.seek(0)
        return output.read().decode(errors="replace")[-last:]

    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, said()
            assert time.monotonic() < deadline, "the service did not answer /readyz within 60 s"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        # The whole process group: the supervisor and its workers.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if SERVICE_LOG:
            Path(SERVICE_LOG).write_text(said(10_000_000))
        output.close()


# The browser fixtures and tests run in one event loop per module
# (pytest-asyncio loop_scope="module"): Playwright's async API lives in it,
# and between the tests it is not running, so the rest of the suite (which
# starts event loops of its own in this thread) is not disturbed, as it would
# be by the sync API's loop, which keeps running for as long as Playwright does.


def chromium() -> str | None:
    """The Chromium to drive: TOKENLEDGER_TEST_CHROMIUM, else Debian's."""
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(template_database: str) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, one for the module's tests. Root (CI, this
    box) needs --no-sandbox."""
    path = chromium()
    assert path, (
        f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install -y chromium`, as "
        ".ci/run does) or set TOKENLEDGER_TEST_CHROMIUM"
    )
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        await browser.close()


async def guarded_context(browser: Browser, site: Site, **options: Any) -> BrowserContext:
    """A browser context in which only the service's origin is reachable;
    every other request is aborted and recorded in site.outside."""
    context = await browser.new_context(accept_downloads=True, **options)

    async def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(site.base + "/") or url.startswith(("data:", "blob:")):
            await r.continue_()
        else:
            site.outside.append(url)
            await r.abort()

    await context.route("**/*", route)
    return context


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser, site: Site) -> AsyncIterator[BrowserContext]:
    ctx = await guarded_context(browser, site, viewport=DESKTOP)
    yield ctx
    await ctx.close()


def watch(page: Page) -> list[str]:
    """Console errors of the page (a CSP violation is one), to assert none."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems
