// The employee's wallet: balances, what expires when, the balance history,
// this month's spend by model and project, the burn rate (or the forecast
// once the service has one), limits once spend policy exists, and the
// entries, newest first. Every number comes from the /v1 API with the
// caller's own token; an employee asking for someone else's wallet gets
// the API's 404 and sees nothing of it.
"use strict";

import { api, optional, credits, utc, day, el, setStatus, explain, requireSignIn, wireHeader, table, ApiError } from "./common.js";
import { lineChart } from "./chart.js";

// The paths of every call, and the first render's calls already started:
// the page's first script, wallet-calls.js.
const calls = window.tokenledgerWallet;
const DAY_MS = calls.DAY_MS;

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
    box.append(el("p", { text: "Nothing spent this month." }));
    return;
  }
  // Debits, usage and captures alike; what names no model is its own row.
  const rows = spend.models.map((m) => [m.model === null ? "(no model)" : m.model, m.project || "—", credits(m.events), credits(m.credits)]);
  box.append(table(
    [{ label: "Model" }, { label: "Project" }, { label: "Calls", numeric: true }, { label: "Credits", numeric: true }],
    rows,
  ));
}

const state = { address: null, cursors: [null], page: 0, range: "30d" };

// The rest of the first render (wallet-calls.js started these calls already
// when it knew the address): the limits and the first page of entries,
// asked at once.
function loadParts(address) {
  const first = calls.firstCalls(address, calls.asked);
  return Promise.all([
    optional(first.policy).catch(() => null),
    fetchEntries(address),
  ]);
}

// After the first render: the balance history, this month's spend by model
// and the forecast (wallet-calls.js, laterCalls), asked at once. Each fills
// its own place when it arrives; one that fails says why there.
async function loadLater(account) {
  const later = calls.laterCalls(account.address, calls.nowMs);
  const parts = [
    ["chart", fetchChart(account.address).then(renderChart)],
    ["spend", api(later.spendMonth).then(renderSpend)],
    ["forecast", forecastOrBurn(account.address, later.forecast).then(
      ({ forecast, spend30 }) => renderForecast(account, spend30, forecast),
    )],
  ];
  const outcomes = await Promise.allSettled(parts.map(([, p]) => p));
  for (const [i, o] of outcomes.entries()) {
    if (o.status !== "rejected") continue;
    if (o.reason instanceof ApiError && o.reason.status === 401) return requireSignIn();
    document.getElementById(parts[i][0]).textContent = explain(o.reason);
  }
  document.body.dataset.ready = "true";
  performance.mark("wallet-complete");
}

// The service's forecast, or, where it has none (an older service, or a
// caller it refuses), the trailing 30 days' spend to compute a burn rate
// from: asked only then, as it adds up the same 30 days of entries again.
async function forecastOrBurn(address, forecastPath) {
  const forecast = await optional(forecastPath).catch(() => null);
  const item = forecast && forecast.items && forecast.items[0];
  if (item) return { forecast: item, spend30: null };
  return { forecast: null, spend30: await api(calls.spendPath(address, "30d", Date.now())) };
}

function fetchEntries(address) {
  return api(calls.entriesPath(address, state.cursors[state.page]));
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

// The first render's chart is of the page's start (the call wallet-calls.js
// started); a range chosen later, of that moment.
async function fetchChart(address, nowMs = calls.nowMs) {
  const b = calls.rangeBounds(state.range, nowMs);
  const series = await api(calls.seriesPath(address, state.range, nowMs));
  return { b, series };
}

async function loadChart() {
  renderChart(await fetchChart(state.address, Date.now()));
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

async function load() {
  const { asked, guess } = calls;
  // With the address known, the account and everything else go together.
  const early = guess ? loadParts(guess) : null;
  if (early) early.catch(() => {});
  let account;
  try {
    account = await api(asked ? calls.accountPath(asked, "", null) : "/v1/me");
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
    const parts = early && guess === account.address ? early : loadParts(account.address);
    const [policy, entries] = await parts;
    state.address = account.address;
    renderEntries(entries);
    renderBalances(account);
    renderExpiry(account);
    renderLimits(policy);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return requireSignIn();
    setStatus(explain(e), "error");
    return;
  }
  setStatus("");
  document.getElementById("wallet").hidden = false;
  // The first render: balances, expiry, limits and entries drawn. The chart,
  // the month's spend and the forecast follow (data-ready, wallet-complete).
  document.body.dataset.rendered = "true";
  performance.mark("wallet-rendered");
  await loadLater(account);
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
