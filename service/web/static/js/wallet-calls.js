// The wallet page's API calls, and the first render's calls started at once.
//
// This is the page's first script, a classic one that the parser waits for,
// so that the first render's three API calls leave as soon as this small
// file has arrived: without waiting for the stylesheet, the first paint, or
// the modules to be compiled and run (in a new browser profile that wait was
// 50 to 90 ms of the first render). It stays a file of its own: the pages'
// Content-Security-Policy allows no inline script. The module
// (wallet.js) builds every path with the functions below, and common.js's
// api() answers a call that was started here with its pending answer, so a
// path can never differ between the two: a call not started here is just
// made then.
//
// The token is read from sessionStorage exactly as common.js does; the calls
// carry it in the Authorization header, never in a URL.
"use strict";

window.tokenledgerWallet = (function () {
  const DAY_MS = 86400000;
  const ENTRIES_PAGE = 20;
  const TOKEN_KEY = "tokenledger.token";

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

  function accountPath(address, tail, params) {
    const q = params ? "?" + new URLSearchParams(params).toString() : "";
    return `/v1/accounts/${encodeURIComponent(address)}${tail}${q}`;
  }

  function seriesPath(address, range, nowMs) {
    const b = rangeBounds(range, nowMs);
    return accountPath(address, "/series", { from: b.from.toISOString(), to: b.to.toISOString(), interval: b.interval });
  }

  function entriesPath(address, cursor) {
    const params = { limit: ENTRIES_PAGE };
    if (cursor) params.cursor = cursor;
    return accountPath(address, "/entries", params);
  }

  // [from, to) as the API takes them: the UTC month so far (to tomorrow's
  // midnight), or the trailing 30 UTC days, today included.
  function spendPath(address, period, nowMs) {
    const tomorrow = new Date(startOfUtcDay(nowMs) + DAY_MS);
    const now = new Date(nowMs);
    const from = period === "month"
      ? new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1))
      : new Date(startOfUtcDay(nowMs) - 29 * DAY_MS);
    return accountPath(address, "/spend", { from: from.toISOString(), to: tomorrow.toISOString() });
  }

  // The first render's calls about `address` (`asked`: the ?account the page
  // was opened with, else the caller's own wallet through /v1/me): the
  // balances and what expires, the limits, the first page of entries.
  function firstCalls(address, asked) {
    return {
      account: asked ? accountPath(asked, "", null) : "/v1/me",
      policy: accountPath(address, "/policy", null),
      entries: entriesPath(address, null),
    };
  }

  // Asked once the first render is drawn, with the balance history (the
  // chart's own call, seriesPath): the month's spend by model and the
  // forecast, which each add up a month of the wallet's entries (30 to 40 ms
  // of PostgreSQL time apiece for 10,000 entries). Asked with the others
  // they held the first render back: every call more is a request more for
  // the service's workers and the browser on a busy machine, and the page
  // waits for the slowest answer.
  function laterCalls(address, nowMs) {
    return {
      spendMonth: spendPath(address, "month", nowMs),
      forecast: `/v1/reports/forecast?account=${encodeURIComponent(address)}`,
    };
  }

  // The wallet an employee token names (its `sub`), so that every call can
  // start at once instead of after /v1/me. Only a guess to save a round
  // trip: the API still decides what the token may read, and /v1/me (asked
  // at the same time) is what the page believes.
  function ownAddress(token) {
    if (!token || token.startsWith("tlk_")) return null;
    try {
      const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
      return typeof claims.sub === "string" ? "employee:" + claims.sub : null;
    } catch (e) {
      return null;
    }
  }

  const nowMs = Date.now();
  const token = sessionStorage.getItem(TOKEN_KEY);
  const asked = new URLSearchParams(location.search).get("account");
  const guess = asked || ownAddress(token);
  // path -> the pending fetch, taken (once) by common.js's api().
  const started = new Map();
  if (guess) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    for (const path of Object.values(firstCalls(guess, asked))) {
      const pending = fetch(path, { headers, credentials: "same-origin", cache: "no-store" });
      pending.catch(() => {});
      started.set(path, pending);
    }
  }
  window.tokenledgerStarted = started;

  return { DAY_MS, nowMs, asked, guess, rangeBounds, accountPath, seriesPath, entriesPath, spendPath, firstCalls, laterCalls };
})();
