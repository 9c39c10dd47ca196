// What every page shares: the caller's token, calls to the /v1 API, number
// and date formatting, and the page's status line.
//
// The token lives in sessionStorage: it is gone when the tab closes, never
// sent anywhere but in the Authorization header of this origin's API calls,
// and never put in a URL. Behind the company's SSO proxy there is no token
// here at all: the proxy adds the employee's JWT to every request
// (TOKENLEDGER_PAGES_TOKEN_HEADER) and the calls below go without one.
"use strict";

const TOKEN_KEY = "tokenledger.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// An API answer that is not a success: status, the problem's code and detail.
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || "HTTP " + status);
    this.status = status;
    this.code = problem && problem.code;
    this.problem = problem;
  }
}

// A JSON call a page's first script already started (window.tokenledgerStarted,
// see wallet-calls.js), taken once: asking the same path again fetches anew.
function started(path, accept) {
  const calls = window.tokenledgerStarted;
  const pending = accept === "application/json" && calls ? calls.get(path) : undefined;
  if (pending) calls.delete(path);
  return pending;
}

export async function api(path, { accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  let response;
  try {
    response = await (started(path, accept) ||
      fetch(path, { headers, credentials: "same-origin", cache: "no-store" }));
  } catch (e) {
    throw new ApiError(0, { code: "network", detail: "The service did not answer." });
  }
  if (!response.ok) {
    let problem = null;
    try {
      problem = await response.json();
    } catch (e) {
      problem = null;
    }
    throw new ApiError(response.status, problem);
  }
  return accept === "application/json" ? response.json() : response.text();
}

// The same call, or null when the API says the thing is not there (404):
// for parts of a page that light up once another part of the service exists.
export async function optional(path) {
  try {
    return await api(path);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) return null;
    throw e;
  }
}

// "1,234,567": an amount with its thousands grouped as en-US writes them.
// Not Intl.NumberFormat: its first use in a new renderer process loads the
// locale data, 20 to 130 ms in a fresh browser context on the shared 2-core
// box, on the wallet's first render (every number the API answers is an
// integer).
export function credits(n) {
  const [whole, fraction] = String(n).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+$)/g, ",");
  return fraction === undefined ? grouped : grouped + "." + fraction;
}

// "2026-12-31 23:59:59 UTC" from the API's RFC 3339 UTC times: exact, and the
// same for every reader whatever their browser's time zone.
export function utc(iso) {
  return iso.replace("T", " ").replace(/(\.\d+)?Z$/, "") + " UTC";
}

export function day(iso) {
  return iso.slice(0, 10);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) node.append(c);
  return node;
}

export function setStatus(message, kind = "info") {
  const status = document.getElementById("status");
  status.textContent = message;
  status.dataset.kind = kind;
  status.hidden = !message;
}

// What a failed call means for the person looking at the page.
export function explain(e) {
  if (!(e instanceof ApiError)) return "Something went wrong: " + e.message;
  if (e.status === 401) return "Your sign-in is missing or has expired.";
  if (e.status === 503 || e.status === 0)
    return "The ledger cannot be reached right now (its database is unavailable). Try again in a moment.";
  if (e.status === 429) return "Too many requests; wait a moment and reload.";
  return e.message;
}

// Called by every page when a call answers 401: off to sign in, coming back
// to this page afterwards (a path of this origin, never a token, in the URL).
export function requireSignIn() {
  const next = location.pathname + location.search;
  location.assign("/sign-in?next=" + encodeURIComponent(next));
}

export function wireHeader() {
  const out = document.getElementById("sign-out");
  if (out) {
    out.hidden = !token();
    out.addEventListener("click", () => {
      signOut();
      location.assign("/sign-in");
    });
  }
}

// A table in a box that scrolls sideways on a narrow screen; the box takes
// keyboard focus so that its overflow can be scrolled without a mouse.
export function table(headers, rows, { caption, label } = {}) {
  const box = el("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": label || caption || headers.map((h) => h.label).join(", ") });
  const t = el("table");
  box.append(t);
  if (caption) t.append(el("caption", { text: caption }));
  const head = el("tr");
  for (const h of headers) {
    head.append(el("th", { scope: "col", class: h.numeric ? "num" : null, text: h.label }));
  }
  t.append(el("thead", {}, head));
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    row.forEach((cell, i) => {
      tr.append(el("td", { class: headers[i].numeric ? "num" : null, text: cell }));
    });
    body.append(tr);
  }
  t.append(body);
  return box;
}
