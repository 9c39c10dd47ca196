"""The web pages in a real browser (issue 15): Debian's Chromium, headless,
driven by Playwright against the running service on a real PostgreSQL, with
every request outside the service's origin blocked."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.api.test_auth import employee_token
from tests.pages.conftest import (
    DESKTOP,
    PHONE,
    SCREENSHOTS,
    Site,
    service_apart,
    watch,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DAY = timedelta(days=1)
HISTORY_DAYS = 12
# The wallet of the render timing: 2,000 entries in the suite (seeded in
# about 3 s); `make bench-pages` runs the same test with 10,000 and the
# issue's 200 ms target.
BIG_WALLET_ENTRIES = int(os.environ.get("TOKENLEDGER_PAGES_BENCH_ENTRIES", "2000"))
RENDER_MS_MAX = float(os.environ.get("TOKENLEDGER_PAGES_RENDER_MS_MAX", "1000"))
# Loads timed: this many cold (a new browser context each), and this many
# cached (one context, after its first load); the medians are compared.
RENDER_COLD_RUNS = int(os.environ.get("TOKENLEDGER_PAGES_RENDER_COLD_RUNS", "3"))
RENDER_CACHED_RUNS = int(os.environ.get("TOKENLEDGER_PAGES_RENDER_CACHED_RUNS", "3"))
WINDOW_SETTLE_SECONDS = 1.5


def ok(r: Any, *statuses: int) -> Any:
    assert r.status_code in (statuses or (200, 201)), r.text
    return r.json()


@pytest.fixture(scope="module")
def seeded(site: Site) -> dict[str, Any]:
    """Departments, employees, grants, a price, and twelve days of spending by
    ada (e-1), written at instants in the past through the service's clock."""
    a = site.admin
    n = iter(range(10_000))

    def key() -> dict[str, str]:
        return {"Idempotency-Key": f"seed-{next(n)}"}

    for dept in ("eng", "sales"):
        ok(a.put(f"/v1/departments/{dept}", json={"name": dept.title()}))
    people = {"e-1": "eng", "e-2": "eng", "e-3": "sales", "e-4": "sales"}
    for emp, dept in people.items():
        body = {"name": emp, "email": f"{emp}@example.com", "department": dept}
        ok(a.put(f"/v1/employees/{emp}", json=body))
    now = datetime.now(UTC)
    start = now - HISTORY_DAYS * DAY
    site.clock.set(start)
    soonest = (now + 9 * DAY).replace(microsecond=0)
    ok(
        a.post(
            "/v1/grants",
            json={"employee": "e-1", "amount": 40_000, "reason": "monthly_allotment"}
            | {"expires_at": soonest.isoformat()},
            headers=key(),
        )
    )
    ok(
        a.post(
            "/v1/grants",
            json={"employee": "e-1", "amount": 25_000, "reason": "signing_bonus"}
            | {"expires_at": (now + 200 * DAY).isoformat()},
            headers=key(),
        )
    )
    ok(
        a.post(
            "/v1/grants",
            json={"employee": "e-2", "amount": 9_999, "reason": "spot_bonus"},
            headers=key(),
        )
    )
    for dept, amount in (("eng", 500_000), ("sales", 200_000)):
        body = {"from": "system:issuance", "to": f"department:{dept}", "amount": amount}
        ok(a.post("/v1/transfers", json=body, headers=key()))
    for d in range(HISTORY_DAYS):
        for hour in (1, 13):
            site.clock.set(start + d * DAY + timedelta(hours=hour))
            body = {"account": "employee:e-1", "amount": 100 + d, "metadata": {"model": "gpt-x"}}
            ok(a.post("/v1/debits", json=body, headers=key()))
    site.clock.now = None
    # Today's spend without a model, and with one, whatever day of the month it is.
    ok(a.post("/v1/debits", json={"account": "employee:e-1", "amount": 25}, headers=key()))
    body = {"account": "employee:e-1", "amount": 50, "metadata": {"model": "gpt-x"}}
    ok(a.post("/v1/debits", json=body, headers=key()))
    price = {
        "model": "gpt-test",
        "effective_from": (now - 400 * DAY).isoformat(),
        "input_per_mtok": 1_000_000,
        "cached_input_per_mtok": 100_000,
        "output_per_mtok": 4_000_000,
    }
    ok(a.post("/v1/prices", json=price, headers=key()))
    ok(
        a.post(
            "/v1/grants",
            json={"employee": "e-3", "amount": 50_000, "reason": "spot_bonus"},
            headers=key(),
        )
    )
    events = []
    for i, (emp, project) in enumerate(
        [("e-1", "alpha"), ("e-1", "beta"), ("e-2", "alpha"), ("e-3", None), ("e-3", "gamma")]
    ):
        event = {
            "source": "gateway",
            "event_id": f"ev-{i}",
            "account": f"employee:{emp}",
            "model": "gpt-test",
            "input_tokens": 1000 * (i + 1),
            "output_tokens": 200,
        }
        if project:
            event["project"] = project
        events.append(event)
    results = ok(a.post("/v1/usage:batch", json={"events": events}))["results"]
    assert all(r["status"] == "recorded" for r in results), results
    return {"soonest": soonest, "start": start}


async def sign_in_dev(page: Page, site: Site, employee: str, role: str = "employee") -> None:
    """The development sign-in, as a person would use it (an accessible form)."""
    await page.goto(f"{site.base}/dev/sign-in")
    assert await serious(page) == []
    await page.fill("#employee", employee)
    await page.select_option("#role", role)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{site.base}/{'wallet' if role == 'employee' else 'finance'}")


async def use_token(context: BrowserContext, token: str) -> None:
    """A signed-in tab: the token in sessionStorage before any page script runs."""
    await context.add_init_script(f"sessionStorage.setItem('tokenledger.token', {token!r});")


def no_csp_errors(errors: list[str]) -> None:
    bad = [e for e in errors if "Content Security Policy" in e or "Refused to" in e]
    assert bad == [], bad


async def serious(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page."""
    results = await Axe().run(page)
    return [
        f"{v['id']}: {v['help']} ({len(v['nodes'])} nodes)"
        for v in results.response["violations"]
        if v.get("impact") in ("serious", "critical")
    ]


async def shot(page: Page, name: str) -> None:
    """docs/screenshots/NAME.png, the whole page (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


async def test_wallet_shows_balances_expiry_and_history(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """An employee signs in and sees their exact available credits, the
    soonest expiry with its exact date, and one chart point per day."""
    page = await context.new_page()
    errors = watch(page)
    await sign_in_dev(page, site, "e-1")
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=15_000)
    me = ok(site.admin.get("/v1/accounts/employee:e-1"))
    assert await page.inner_text("#available") == f"{me['available']:,}"
    assert await page.get_attribute("#available", "data-value") == str(me["available"])
    soonest = min(me["expiring"], key=lambda x: x["expires_at"])
    shown = await page.get_attribute("#soonest-date", "datetime")
    assert shown == soonest["expires_at"]
    assert seeded["soonest"].strftime("%Y-%m-%d %H:%M:%S UTC") == await page.inner_text(
        "#soonest-date"
    )
    # One point per day: the 30 UTC midnights up to today, each the API's value.
    points = page.locator("#chart circle.point")
    assert await points.count() == 30
    ats = [await points.nth(i).get_attribute("data-at") for i in range(30)]
    days = [datetime.fromisoformat(at.replace("Z", "+00:00")) for at in ats]  # type: ignore[union-attr]
    assert all(b - a == DAY for a, b in zip(days, days[1:], strict=False))
    assert days[-1].date() == datetime.now(UTC).date()
    series = ok(
        site.admin.get(
            "/v1/accounts/employee:e-1/series",
            params={"from": ats[0], "to": ats[-1], "interval": "day"},
        )
    )["items"]
    posted = [int(await points.nth(i).get_attribute("data-posted") or "") for i in range(30)]
    assert posted == [s["posted"] for s in series]
    # The history moved on each of the days with entries.
    assert len(set(posted[-HISTORY_DAYS:])) == HISTORY_DAYS
    # The month's spend by model and project, debits (gpt-x, and one without a
    # model) and usage alike: the rows of the API's /spend for the month.
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    tomorrow = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + DAY
    spend = ok(
        site.admin.get(
            "/v1/accounts/employee:e-1/spend",
            params={"from": month.isoformat(), "to": tomorrow.isoformat()},
        )
    )
    assert {m["model"] for m in spend["models"]} == {"gpt-test", "gpt-x", None}
    shown = [r.split("\t") for r in await page.locator("#spend tbody tr").all_inner_texts()]
    assert shown == [
        [
            "(no model)" if m["model"] is None else m["model"],
            m["project"] or "—",
            f"{m['events']:,}",
            f"{m['credits']:,}",
        ]
        for m in spend["models"]
    ]
    # The service's forecast: its burn rate and the day the credits run out.
    forecast = ok(site.admin.get("/v1/reports/forecast", params={"account": "employee:e-1"}))
    item = forecast["items"][0]
    assert item["depletes_at"] is not None
    assert await page.inner_text("#forecast") == (
        # Math.round: halves up (Python's round() rounds them to even).
        f"At this rate ({math.floor(item['burn_rate_per_day'] + 0.5):,} credits a day) your "
        f"credits run "
        f"out on {item['depletes_at'][:10]}."
    )
    # Entries: the newest first, paginated by 20.
    newest = ok(site.admin.get("/v1/accounts/employee:e-1/entries", params={"limit": 40}))
    assert len(newest["items"]) > 20
    rows = page.locator("#entries tbody tr")
    assert await rows.count() == 20
    assert (await rows.first.inner_text()).split("\t")[1] == newest["items"][0]["kind"]
    await page.click("#older")
    await expect(page.locator("#newer")).to_be_enabled()
    await expect(rows).to_have_count(len(newest["items"]) - 20)
    no_csp_errors(errors)
    await shot(page, "wallet-desktop")
    await page.set_viewport_size(PHONE)
    await shot(page, "wallet-phone")
    # A phone-width page does not scroll sideways.
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert await serious(page) == []


async def test_first_render_waits_for_no_chart_spend_or_forecast(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """The wallet's first render waits neither for the balance history nor
    for the month's spend or the forecast: with all three held back,
    balances, limits and entries are drawn and their places say they are
    loading; when they fail, each place says why and the rest stays."""
    page = await context.new_page()
    errors = watch(page)
    held: list[Any] = []
    release = asyncio.Event()

    async def hold_then_fail(route: Any) -> None:
        held.append(route.request.url)
        await release.wait()
        await route.fulfill(
            status=503,
            content_type="application/problem+json",
            body='{"code": "unavailable", "status": 503, "title": "Service Unavailable"}',
        )

    await page.route("**/v1/accounts/*/spend?*", hold_then_fail)
    await page.route("**/v1/accounts/*/series?*", hold_then_fail)
    await page.route("**/v1/reports/forecast?*", hold_then_fail)
    await use_token(page.context, employee_token("e-1"))
    await page.goto(f"{site.base}/wallet")
    await expect(page.locator("body[data-rendered=true]")).to_have_count(1, timeout=15_000)
    me = ok(site.admin.get("/v1/accounts/employee:e-1"))
    assert await page.inner_text("#available") == f"{me['available']:,}"
    assert await page.locator("#entries tbody tr").count() > 0
    assert await page.inner_text("#spend") == "Loading…"
    assert await page.inner_text("#forecast") == "Working out your burn rate…"
    assert await page.inner_text("#chart") == "Loading the balance history…"
    assert await page.get_attribute("body", "data-ready") is None
    assert len(held) == 3, held
    release.set()
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=15_000)
    unavailable = "The ledger cannot be reached right now"
    assert (await page.inner_text("#spend")).startswith(unavailable)
    assert (await page.inner_text("#forecast")).startswith(unavailable)
    assert (await page.inner_text("#chart")).startswith(unavailable)
    assert await page.inner_text("#available") == f"{me['available']:,}"
    assert await page.is_visible("#wallet")
    # The console reports the two failed calls; nothing else went wrong.
    assert [e for e in errors if "503" not in e] == []


async def test_another_wallet_is_not_reachable(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """Editing the URL to another employee's wallet shows nothing of it."""
    await use_token(context, employee_token("e-1"))
    page = await context.new_page()
    await page.goto(f"{site.base}/wallet?account=employee:e-2")
    await expect(page.locator("#status")).to_contain_text("no wallet employee:e-2")
    assert await page.locator("#wallet").is_hidden()
    assert "9,999" not in await page.content()
    await page.goto(f"{site.base}/wallet")
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=15_000)
    assert await page.inner_text("#title") == "Your credits"


async def test_empty_wallet_and_sign_in_redirect(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """A wallet with nothing says so; without a token the page asks to sign in."""
    page = await context.new_page()
    await page.goto(f"{site.base}/wallet")
    await page.wait_for_url(f"{site.base}/sign-in?next=%2Fwallet")
    assert await serious(page) == []
    await page.fill("#token", employee_token("e-4"))
    await page.click("#token-form button")
    await page.wait_for_url(f"{site.base}/wallet")
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=15_000)
    await expect(page.locator("#empty")).to_be_visible()
    assert await page.inner_text("#available") == "0"
    assert "Nothing of yours expires" in await page.inner_text("#soonest")
    assert await serious(page) == []


async def test_finance_page_and_its_csv(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """Finance sees usage by department, model and employee, the top spenders
    and spend against funding; each CSV download equals the API's report."""
    page = await context.new_page()
    errors = watch(page)
    await sign_in_dev(page, site, "e-2", role="finance")
    today = datetime.now(UTC).date()
    frm, to = (today - 40 * DAY).isoformat(), (today + DAY).isoformat()
    await page.goto(f"{site.base}/finance?from={frm}&to={to}")
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=15_000)
    token = await page.evaluate("sessionStorage.getItem('tokenledger.token')")
    api = site.client(token)
    for group in ("department", "model", "employee"):
        async with page.expect_download() as info:
            await page.click(f"button.csv[data-group={group}]")
        path = await (await info.value).path()
        downloaded = await asyncio.to_thread(Path(path).read_bytes)
        expected = api.get(
            "/v1/reports/usage",
            params={"from": f"{frm}T00:00:00Z", "to": f"{to}T00:00:00Z", "group_by": group},
            headers={"Accept": "text/csv"},
        )
        assert expected.status_code == 200
        assert downloaded == expected.content, group
        rows = await page.locator(f"section[data-group={group}] tbody tr").count()
        assert rows == len(expected.text.strip().splitlines()) - 1
    top = page.locator("#top tbody tr")
    assert (await top.first.inner_text()).split("\t")[1] == "e-3"
    assert "500,000" not in await page.inner_text("#top")
    # Each department's funding in the period against its spend in the period:
    # the table is the API's report, row for row, and so is the CSV.
    funding = api.get(
        "/v1/reports/funding", params={"from": f"{frm}T00:00:00Z", "to": f"{to}T00:00:00Z"}
    )
    items = ok(funding)["items"]
    assert {i["department"]: i["funded"] for i in items} == {"eng": 500_000, "sales": 200_000}
    assert all(i["spent"] > 0 for i in items)
    shown = [r.split("\t") for r in await page.locator("#funding tbody tr").all_inner_texts()]
    assert shown == [[i["department"], f"{i['funded']:,}", f"{i['spent']:,}"] for i in items]
    assert await page.locator("#funding svg g.bar").count() == len(items)
    async with page.expect_download() as info:
        await page.click("button.csv[data-group=funding]")
    path = await (await info.value).path()
    downloaded = await asyncio.to_thread(Path(path).read_bytes)
    expected = api.get(
        "/v1/reports/funding",
        params={"from": f"{frm}T00:00:00Z", "to": f"{to}T00:00:00Z"},
        headers={"Accept": "text/csv"},
    )
    assert downloaded == expected.content
    no_csp_errors(errors)
    await shot(page, "finance-desktop")
    await page.set_viewport_size(PHONE)
    await shot(page, "finance-phone")
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert await serious(page) == []


async def test_an_employee_cannot_read_finance(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """The finance page tells an employee it is not for them, and shows no numbers."""
    await use_token(context, employee_token("e-1"))
    page = await context.new_page()
    await page.goto(f"{site.base}/finance")
    await expect(page.locator("#status")).to_contain_text("finance and hr roles")
    assert await page.locator("#report").is_hidden()


async def test_docs_render_without_internet(site: Site, context: BrowserContext) -> None:
    """/schema renders Swagger UI with every operation from the service's own files."""
    page = await context.new_page()
    errors = watch(page)
    await page.goto(f"{site.base}/schema")
    await expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=20_000)
    await expect(page.locator(".opblock").first).to_be_visible()
    assert await page.locator(".opblock").count() > 30
    assert await page.get_by_text("/v1/accounts/{address}/spend").count() >= 1
    no_csp_errors(errors)


async def test_amounts_are_grouped_as_en_us_writes_them(
    site: Site, context: BrowserContext
) -> None:
    """The pages' number format (common.js credits(), written without
    Intl.NumberFormat, whose first use costs a new renderer its locale data)
    is exactly en-US's for every integer the API may answer."""
    page = await context.new_page()
    await page.goto(f"{site.base}/sign-in")
    mismatches = await page.evaluate(
        """async () => {
          const { credits } = await import('/static/js/common.js');
          const en = new Intl.NumberFormat('en-US');
          const values = [0, 7, -7, 999, 1000, -1000, 12345, 123456, -123456, 1234567,
                          10000000, -99999999, 2 ** 31, 2 ** 53 - 1, -(2 ** 53 - 1)];
          // + 0: no -0 (JSON has no such integer; en-US writes it "-0").
          for (let i = 0; i < 2000; i++) {
            values.push(Math.round((Math.random() - 0.5) * 10 ** (i % 16)) + 0);
          }
          const differ = values.filter((v) => credits(v) !== en.format(v));
          return differ.map((v) => [v, credits(v), en.format(v)]);
        }"""
    )
    assert mismatches == []


async def test_first_render_of_a_busy_wallet(
    site: Site, seeded: dict[str, Any], browser: Browser
) -> None:
    """A busy wallet renders in a browser quickly: the time from navigation to
    its first render (performance mark `wallet-rendered`: balances, expiry,
    limits and entries drawn) against a warmed-up service, cold (each
    load in a new browser context: an empty cache and new connections, as an
    employee opening the page sees it) and cached (the same context loading
    the page again, scripts from the cache). The time to `wallet-complete`
    (the chart, the month's spend and the forecast drawn too) is printed
    beside it."""
    await seed_busy_wallet(site, "e-2", BIG_WALLET_ENTRIES)
    token = employee_token("e-2")
    # Timed against the service in processes of its own, as deployed
    # (service_apart); one load first warms it up: its pools' connections
    # are open and its statements prepared, as on a service that has been
    # serving for a while. Not measured: a user never meets a service that
    # has just started.
    with service_apart(site) as base:
        await load_wallet(browser, base, token, loads=1)
        load_before = os.getloadavg()[0]
        cold = [
            (await load_wallet(browser, base, token, loads=1))[0] for _ in range(RENDER_COLD_RUNS)
        ]
        cached = (await load_wallet(browser, base, token, loads=RENDER_CACHED_RUNS + 1))[1:]
        load_after = os.getloadavg()[0]
    print(
        f"wallet first render, {BIG_WALLET_ENTRIES} entries, load average "
        f"{load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores:"
    )
    for name, renders in (("cold", cold), ("cached", cached)):
        for label, values in (
            ("first render painted", [r.ms for r in renders]),
            ("first render built", [r.built_ms for r in renders]),
            ("complete (built)", [r.complete_ms for r in renders]),
        ):
            print(
                f"  {name:6s} {label:20s} median {statistics.median(values):4.0f} ms, "
                f"p90 {p90(values):4.0f} ms of {[round(v) for v in values]}"
            )
    median_cold = sorted(cold, key=lambda c: c.ms)[len(cold) // 2]
    print("the median cold load, ms from navigation (start-end):")
    for name, begin, finish in sorted(median_cold.resources, key=lambda r: r[1]):
        print(f"  {begin:7.1f} {finish:7.1f}  {name}")
    cold_ms = statistics.median(c.ms for c in cold)
    cached_ms = statistics.median(c.ms for c in cached)
    # The target is 200 ms (README, Web pages; make bench-pages); in the suite
    # a loaded shared CI box gets slack.
    assert cold_ms < RENDER_MS_MAX, [c.ms for c in cold]
    assert cached_ms < RENDER_MS_MAX, [c.ms for c in cached]
    entries = ok(site.admin.get("/v1/accounts/employee:e-2/entries", params={"limit": 1}))
    assert entries["items"][0]["kind"] == "debit"


def p90(values: list[float]) -> float:
    """The 90th percentile by nearest rank: of 9 loads, the slowest."""
    ranked = sorted(values)
    return ranked[math.ceil(0.9 * len(ranked)) - 1]


@dataclass
class Render:
    """One load of the wallet: ms from navigation to its first render painted,
    to the `wallet-rendered` and `wallet-complete` marks, and each request of
    the page (path, start, end), in ms from navigation (RENDER_TIMINGS)."""

    ms: float
    built_ms: float
    complete_ms: float
    resources: list[tuple[str, float, float]]


async def load_wallet(browser: Browser, base: str, token: str, loads: int) -> list[Render]:
    """`loads` loads of the wallet in one new browser context: the first with
    an empty cache, the others as a reload would find it."""
    # No request routing here: Playwright turns the HTTP cache off in a
    # routed context. The pages' requests are the ones the other tests
    # watched with every outside request blocked.
    ctx = await browser.new_context(viewport=DESKTOP)
    try:
        await use_token(ctx, token)
        page = await ctx.new_page()
        # A new context is a new browser window, and headless Chromium builds
        # its window's own pages (the omnibox's WebUI renderer, about 350 ms
        # of CPU in a trace) right then; a user's browser has its window open
        # already. Let that finish first, so that the page is not timed
        # against it for the two cores.
        await page.goto("about:blank")
        await asyncio.sleep(WINDOW_SETTLE_SECONDS)
        renders = []
        for _ in range(loads):
            # Waited for from inside the page, not with a locator: Playwright
            # evaluates its own script (about 20 ms of the renderer's main
            # thread in a trace) in the page the first time a locator looks,
            # and after goto's load event that was often before the first
            # render, which then waited for it.
            await page.goto(f"{base}/wallet", wait_until="commit")
            await page.evaluate(UNTIL_COMPLETE)
            assert await page.get_attribute("#available", "data-value") is not None
            ms, built_ms, complete_ms, resources = await page.evaluate(RENDER_TIMINGS)
            paths = [(n.replace(base, ""), b, f) for n, b, f in resources]
            renders.append(Render(ms, built_ms, complete_ms, paths))
    finally:
        await ctx.close()
    return renders


# Resolves once the page has set its `wallet-complete` mark (15 s at most).
UNTIL_COMPLETE = """() => new Promise((resolve, reject) => {
  const done = () => performance.getEntriesByName('wallet-complete').length > 0;
  if (done()) return resolve();
  const observer = new PerformanceObserver(() => {
    if (done()) { observer.disconnect(); resolve(); }
  });
  observer.observe({ type: 'mark' });
  setTimeout(() => reject(new Error('no wallet-complete mark within 15 s')), 15000);
})"""


# The first render as painted: when the browser painted the available
# balance (Element Timing of `#available`, elementtiming="wallet-first-render":
# its text is drawn with the rest of the first render, in the same task); the
# `wallet-rendered` mark (that task's end, the DOM built but not yet laid out
# or painted); the `wallet-complete` mark; and, for the page's document and
# each request it made before the last, [path, start, end]; all in ms from
# navigation.
RENDER_TIMINGS = """async () => {
  const painted = await new Promise((resolve, reject) => {
    new PerformanceObserver((list, observer) => {
      const e = list.getEntries().find((e) => e.identifier === 'wallet-first-render');
      if (e) { observer.disconnect(); resolve(e.renderTime); }
    }).observe({ type: 'element', buffered: true });
    setTimeout(() => reject(new Error('the balance was not painted within 5 s')), 5000);
  });
  const mark = performance.getEntriesByName('wallet-rendered')[0].startTime;
  const complete = performance.getEntriesByName('wallet-complete')[0].startTime;
  const nav = performance.getEntriesByType('navigation')[0];
  const rows = [[nav.name, nav.startTime, nav.responseEnd]];
  rows.push(['(document: connect)', nav.connectStart, nav.connectEnd]);
  rows.push(['(document: request sent to first byte)', nav.requestStart, nav.responseStart]);
  rows.push(['(parsed to DOMContentLoaded)', nav.domInteractive, nav.domContentLoadedEventStart]);
  for (const p of performance.getEntriesByType('paint')) {
    rows.push(['(' + p.name + ')', p.startTime, p.startTime]);
  }
  for (const r of performance.getEntriesByType('resource')) {
    if (r.startTime < complete) {
      // Sent later than asked: a new connection, or a wait for one of the
      // six a browser opens to an HTTP/1.1 origin.
      const waited = r.requestStart - r.startTime;
      const name = waited >= 5 ? `${r.name} (sent at +${waited.toFixed(0)} ms)` : r.name;
      rows.push([name, r.startTime, r.responseEnd]);
    }
  }
  rows.push(['(wallet-rendered mark: first render built)', mark, mark]);
  rows.push(['(first render painted)', painted, painted]);
  rows.push(['(wallet-complete mark: chart, spend and forecast built)', complete, complete]);
  return [painted, mark, complete, rows];
}"""


async def seed_busy_wallet(site: Site, employee: str, entries: int) -> None:
    """`entries` debits in the wallet over the last 30 days, written by the
    ledger's own coalesced path (tl_execute_batch, 50 at a time, each batch at
    one instant of its own): 10,000 HTTP calls would take minutes."""
    site.clock.set(datetime.now(UTC) - 31 * DAY)
    try:
        ok(
            site.admin.post(
                "/v1/grants",
                json={"employee": employee, "amount": 10 * entries, "reason": "spot_bonus"},
                headers={"Idempotency-Key": f"busy-{employee}"},
            )
        )
    finally:
        site.clock.now = None
    batch = 50
    step_seconds = 29 * 86_400 // max(1, entries // batch)

    async def run() -> None:
        conn = await asyncpg.connect(site.database_url)
        try:
            for first in range(1, entries + 1, batch):
                await conn.execute(
                    """
                    SELECT tl_execute_batch(
                        array_agg('seed'::text), array_agg('busy-' || i),
                        array_agg(sha256(('busy-' || i)::bytea)), array_agg('debit'::text),
                        array_agg(201),
                        array_agg(jsonb_build_object(
                            'account', $1::text, 'amount', 1 + i % 7,
                            'metadata', jsonb_build_object('model', 'gpt-test'))),
                        array_agg(jsonb_build_object(
                            'actor', 'seed', 'request_id', 'seed', 'admin', false,
                            'now', now() - interval '30 days' + $4::int * interval '1 s')))
                    FROM generate_series($2::int, $3::int) i
                    """,
                    f"employee:{employee}",
                    first,
                    min(entries, first + batch - 1),
                    (first // batch) * step_seconds,
                )
        finally:
            await conn.close()

    await run()


async def test_database_down_shows_an_error(
    site: Site, seeded: dict[str, Any], context: BrowserContext
) -> None:
    """With its database unreachable the wallet says so instead of numbers."""

    base, _, name = site.database_url.rpartition("/")

    async def lock(allow: bool) -> None:
        # From another database: with connections refused, not even a
        # superuser reaches this one.
        conn = await asyncpg.connect(f"{base}/postgres")
        try:
            await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
        finally:
            await conn.close()

    await use_token(context, employee_token("e-1"))
    page = await context.new_page()
    await lock(False)
    try:
        await page.goto(f"{site.base}/wallet")
        await expect(page.locator("#status")).to_contain_text("cannot be reached", timeout=20_000)
        assert await page.locator("#wallet").is_hidden()
    finally:
        await lock(True)


async def test_no_request_left_the_origin(site: Site) -> None:
    """Across every page of the tests above (the module's last test), nothing
    was requested from outside the service."""
    assert site.outside == []
