// The employee's wallet: balances, what expires when, the balance history,
// this month's spend by model and project, the burn rate (or the forecast
// once the service has one), limits once spend policy exists, and the
// entries, newest first. Every number comes from the /v1 API with the
// caller's own token; an employee asking for someone else's wallet gets
// the API's 404 and sees nothing of it.
"use strict";

import { api, token, optional, credits, utc, day, el, setStatus, explain, requireSignIn, wireHeader, table, ApiError } from "./common.js";
import { lineChart } from "./chart.js";

const DAY_MS = 86400000;
const ENTRIES_PAGE = 20;

function startOfUtcDay(ms) {
  return ms - (ms % DAY_MS);
}

function rangeBounds(range, nowMs) {
  if (range === "48h") {
    const to = nowMs - (nowMs % 3600000);
    return { from: new Date(to - 47 * 3600000), to: new Date(to), interval: "hour" };
  }
  const days = range === "90d" ? 90 : 30;
  const to = startOfUtcDay(nowMs);
  // One point per day: midnight UTC of each of the last `days` days, today included.
  return { from: new Date(to - (days - 1) * DAY_MS), to: new Date(to), interval: "day" };
}

function iso(d) {
  return d.toISOString();
}

function path(address, tail, params) {
  const q = params ? "?" + new URLSearchParams(params).toString() : "";
  return `/v1/accounts/${encodeURIComponent(address)}${tail}${q}`;
}

function text(id, value) {
  const node = document.getElementById(id);
  node.textContent = value;
  return node;
}

function renderBalances(account) {
  text("available", credits(account.available)).dataset.value = account.available;
  text("reserved", credits(account.reserved)).dataset.value = account.reserved;
  text("pending", credits(account.pending)).dataset.value = account.pending;
  document.getElementById("empty").hidden = !(account.posted === 0 && account.pending === 0);
}

function renderExpiry(account) {
  const list = document.getElementById("expiry");
  list.replaceChildren();
  const expiring = [...account.expiring].sort((a, b) => (a.expires_at < b.expires_at ? -1 : 1));
  if (expiring.length === 0) {
    text("soonest", "Nothing of yours expires.");
    return;
  }
  const first = expiring[0];
  const soonest = text("soonest", "");
  soonest.append(
    el("strong", { text: credits(first.amount) }),
    " credits expire first, on ",
    el("time", { datetime: first.expires_at, id: "soonest-date", text: utc(first.expires_at) }),
    ".",
  );
  for (const item of expiring) {
    list.append(
      el("li", {},
        el("time", { datetime: item.expires_at, text: utc(item.expires_at) }),
        el("span", { class: "amount", text: credits(item.amount) + " credits" }),
      ),
    );
  }
}

function renderForecast(account, spend30, forecast) {
  const node = document.getElementById("forecast");
  if (forecast && typeof forecast.burn_rate_per_day === "number") {
    const rate = credits(Math.round(forecast.burn_rate_per_day));
    node.textContent = forecast.depletes_at
      ? `At this rate (${rate} credits a day) your credits run out on ${utc(forecast.depletes_at).slice(0, 10)}.`
      : `At this rate (${rate} credits a day) your credits do not run out.`;
    return;
  }
  // Until the service forecasts: the trailing 30 days' spend from history.
  const perDay = spend30.credits / 30;
  node.dataset.burnRate = perDay.toFixed(2);
  if (perDay <= 0) {
    node.textContent = "You spent nothing in the last 30 days.";
    return;
  }
  const days = Math.floor(account.available / perDay);
  const out = new Date(Date.now() + days * DAY_MS).toISOString();
  node.textContent = `Burn rate over the last 30 days: ${credits(Math.round(perDay))} credits a day` +
    (account.available > 0 ? `; at this rate your available credits last until about ${out.slice(0, 10)}.` : ".");
}

function renderLimits(policy) {
  const card = document.getElementById("limits-card");
  const limits = (policy && policy.limits) || [];
  card.hidden = limits.length === 0;
  const list = document.getElementById("limits");
  list.replaceChildren();
  for (const l of limits) {
    const used = l.amount ? Math.min(100, Math.round((100 * (l.spent || 0)) / l.amount)) : 0;
    const meter = el("meter", { min: 0, max: l.amount, value: Math.min(l.spent || 0, l.amount), "aria-label": `${l.window} limit used` });
    list.append(
      el("li", {},
        el("span", { text: `${l.window} (${l.mode || "hard"}): ${credits(l.spent || 0)} of ${credits(l.amount)} used (${used}%)` }),
        meter,
        l.resets_at ? el("small", { text: ` resets ${utc(l.resets_at)}` }) : "",
      ),
    );
  }
}

function renderSpend(spend) {
  const box = document.getElementById("spend");
  box.replaceChildren();
  if (spend.models.length === 0) {
    box.append(el("p", { text: "No usage this month." }));
    return;
  }
  const rows = spend.models.map((m) => [m.model, m.project || "—", credits(m.events), credits(m.credits)]);
  box.append(table(
    [{ label: "Model" }, { label: "Project" }, { label: "Calls", numeric: true }, { label: "Credits", numeric: true }],
    rows,
  ));
}

const state = { address: null, cursors: [null], page: 0, range: "30d" };

// Everything the page shows about `address` but the account itself, asked at once.
function loadParts(address, nowMs, monthStart) {
  const since30 = new Date(startOfUtcDay(nowMs) - 29 * DAY_MS);
  const tomorrow = new Date(startOfUtcDay(nowMs) + DAY_MS);
  return Promise.all([
    api(path(address, "/spend", { from: iso(monthStart), to: iso(tomorrow) })),
    api(path(address, "/spend", { from: iso(since30), to: iso(tomorrow) })),
    optional(`/v1/reports/forecast?account=${encodeURIComponent(address)}`).catch(() => null),
    optional(path(address, "/policy", null)).catch(() => null),
    fetchChart(address),
    fetchEntries(address),
  ]);
}

function fetchEntries(address) {
  const cursor = state.cursors[state.page];
  const params = { limit: ENTRIES_PAGE };
  if (cursor) params.cursor = cursor;
  return api(path(address, "/entries", params));
}

async function loadEntries() {
  renderEntries(await fetchEntries(state.address));
}

function renderEntries(page) {
  const box = document.getElementById("entries");
  box.replaceChildren();
  if (page.items.length === 0) {
    box.append(el("p", { text: "No entries yet." }));
  } else {
    const rows = page.items.map((e) => [
      utc(e.created_at),
      e.kind,
      (e.metadata && e.metadata.model) || "",
      (e.metadata && (e.metadata.memo || e.metadata.reason)) || "",
      credits(e.amount),
      credits(e.balance_after),
    ]);
    box.append(table(
      [{ label: "When" }, { label: "Kind" }, { label: "Model" }, { label: "Memo" }, { label: "Amount", numeric: true }, { label: "Balance", numeric: true }],
      rows,
    ));
  }
  state.cursors[state.page + 1] = page.next_cursor;
  document.getElementById("older").disabled = !page.next_cursor;
  document.getElementById("newer").disabled = state.page === 0;
}

async function fetchChart(address) {
  const b = rangeBounds(state.range, Date.now());
  const series = await api(path(address, "/series", { from: iso(b.from), to: iso(b.to), interval: b.interval }));
  return { b, series };
}

async function loadChart() {
  renderChart(await fetchChart(state.address));
}

function renderChart({ b, series }) {
  const label = b.interval === "day" ? day : (at) => utc(at).slice(5, 16);
  const fig = document.getElementById("chart");
  fig.replaceChildren(
    lineChart(series.items, { title: `Balance, one point per ${b.interval}`, label }),
    el("figcaption", { text: `Posted balance at each ${b.interval === "day" ? "midnight UTC" : "hour"}, ${series.items.length} points.` }),
  );
  fig.dataset.points = series.items.length;
}

// The wallet an employee token names (its `sub`), so that every call of the
// page can start at once instead of after /v1/me. Only a guess to save a
// round trip: the API still decides what the token may read, and /v1/me
// (asked at the same time) is what the page believes.
function ownAddress() {
  const t = token();
  if (!t || t.startsWith("tlk_")) return null;
  try {
    const claims = JSON.parse(atob(t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.sub === "string" ? "employee:" + claims.sub : null;
  } catch (e) {
    return null;
  }
}

async function load() {
  const params = new URLSearchParams(location.search);
  const asked = params.get("account");
  const guess = asked || ownAddress();
  const nowMs = Date.now();
  const monthStart = new Date(Date.UTC(new Date(nowMs).getUTCFullYear(), new Date(nowMs).getUTCMonth(), 1));
  // With the address known, the account and everything else go together.
  const early = guess ? loadParts(guess, nowMs, monthStart) : null;
  if (early) early.catch(() => {});
  let account;
  try {
    account = asked ? await api(path(asked, "", null)) : await api("/v1/me");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return requireSignIn();
    if (e instanceof ApiError && e.status === 404) {
      setStatus(asked
        ? `There is no wallet ${asked} that you may see.`
        : "You are signed in without a wallet of your own (a service key). Add ?account=employee:ID to the address to look at an employee's wallet.", "error");
      return;
    }
    setStatus(explain(e), "error");
    return;
  }
  text("title", asked ? `Credits of ${account.address}` : "Your credits");
  try {
    const parts = early && guess === account.address ? early : loadParts(account.address, nowMs, monthStart);
    const [spendMonth, spend30, forecast, policy, series, entries] = await parts;
    state.address = account.address;
    renderChart(series);
    renderEntries(entries);
    renderBalances(account);
    renderExpiry(account);
    renderForecast(account, spend30, forecast);
    renderLimits(policy);
    renderSpend(spendMonth);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return requireSignIn();
    setStatus(explain(e), "error");
    return;
  }
  setStatus("");
  document.getElementById("wallet").hidden = false;
  document.body.dataset.ready = "true";
  performance.mark("wallet-rendered");
}

function wireControls() {
  document.getElementById("older").addEventListener("click", async () => {
    state.page += 1;
    await loadEntries().catch((e) => setStatus(explain(e), "error"));
  });
  document.getElementById("newer").addEventListener("click", async () => {
    state.page = Math.max(0, state.page - 1);
    await loadEntries().catch((e) => setStatus(explain(e), "error"));
  });
  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", async () => {
      state.range = button.dataset.range;
      for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b === button));
      await loadChart().catch((e) => setStatus(explain(e), "error"));
    });
  }
}

wireHeader();
wireControls();
load();
