// Finance's page: usage over a chosen period by department, model and
// employee (GET /v1/reports/usage), the top spenders, and each department's
// spend against its funding in the period (GET /v1/reports/funding). Each table's CSV button downloads the API's own
// CSV of exactly that report (same period, same grouping), so the file is
// what the table shows, byte for byte what the API answers.
"use strict";

import { api, credits, el, setStatus, explain, requireSignIn, wireHeader, table, ApiError } from "./common.js";
import { barChart } from "./chart.js";

const GROUPS = ["department", "model", "employee"];
const TOP = 10;

function defaultPeriod() {
  const now = new Date();
  const from = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const to = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
  return { from: from.toISOString().slice(0, 10), to: to.toISOString().slice(0, 10) };
}

function period() {
  const params = new URLSearchParams(location.search);
  const d = defaultPeriod();
  const valid = (s) => /^\d{4}-\d{2}-\d{2}$/.test(s || "");
  return {
    from: valid(params.get("from")) ? params.get("from") : d.from,
    to: valid(params.get("to")) ? params.get("to") : d.to,
  };
}

function fundingPath(p) {
  const q = new URLSearchParams({ from: p.from + "T00:00:00Z", to: p.to + "T00:00:00Z" });
  return "/v1/reports/funding?" + q.toString();
}

function reportPath(group, p) {
  const q = new URLSearchParams({ from: p.from + "T00:00:00Z", to: p.to + "T00:00:00Z", group_by: group });
  return "/v1/reports/usage?" + q.toString();
}

function label(group, item) {
  const v = item[group];
  return v === null || v === undefined ? (group === "employee" ? "(department accounts)" : "(none)") : v;
}

function renderGroup(group, items) {
  const section = document.querySelector(`section[data-group="${group}"]`);
  const chartBox = section.querySelector(".chart-box");
  const tableBox = section.querySelector(".table-box");
  if (items.length === 0) {
    chartBox.replaceChildren();
    tableBox.replaceChildren(el("p", { text: "No usage in this period." }));
    return;
  }
  const bars = [...items].sort((a, b) => b.credits - a.credits).slice(0, 15)
    .map((i) => ({ label: label(group, i), value: i.credits }));
  chartBox.replaceChildren(barChart(bars, { title: `Credits by ${group}, largest first` }));
  // The table lists the report's rows in the API's order, as the CSV has them.
  tableBox.replaceChildren(table(
    [{ label: group[0].toUpperCase() + group.slice(1) }, { label: "Events", numeric: true },
      { label: "Input tokens", numeric: true }, { label: "Cached input", numeric: true },
      { label: "Output tokens", numeric: true }, { label: "Credits", numeric: true }],
    items.map((i) => [label(group, i), credits(i.events), credits(i.input_tokens),
      credits(i.cached_input_tokens), credits(i.output_tokens), credits(i.credits)]),
  ));
}

function renderTop(items) {
  const top = items.filter((i) => i.employee).sort((a, b) => b.credits - a.credits).slice(0, TOP);
  const box = document.getElementById("top");
  if (top.length === 0) {
    box.replaceChildren(el("p", { text: "No employee spent anything in this period." }));
    return;
  }
  box.replaceChildren(table(
    [{ label: "#" }, { label: "Employee" }, { label: "Credits", numeric: true }],
    top.map((i, n) => [String(n + 1), i.employee, credits(i.credits)]),
  ));
}

// Each department's funding in the period (transfers and grants into its
// account, less their reversals) against what it spent in the period (its
// account and its employees' wallets): GET /v1/reports/funding, every
// department, as its CSV has them.
function renderFunding(items) {
  const box = document.getElementById("funding");
  if (items.length === 0) {
    box.replaceChildren(el("p", { text: "There are no departments yet." }));
    return;
  }
  const active = items.filter((i) => i.funded !== 0 || i.spent !== 0);
  box.replaceChildren(
    active.length === 0
      ? el("p", { text: "No department was funded or spent anything in this period." })
      : barChart(active.map((i) => ({ label: i.department, value: i.spent, of: Math.max(0, i.funded) })),
        { title: "Spent in the period against funded in the period, per department" }),
    table(
      [{ label: "Department" }, { label: "Funded in period", numeric: true }, { label: "Spent in period", numeric: true }],
      items.map((i) => [i.department, credits(i.funded), credits(i.spent)]),
    ),
  );
}

async function download(group) {
  const p = period();
  try {
    const funding = group === "funding";
    const csv = await api(funding ? fundingPath(p) : reportPath(group, p), { accept: "text/csv" });
    const blob = new Blob([csv], { type: "text/csv" });
    const name = funding ? `funding-${p.from}-to-${p.to}.csv` : `usage-by-${group}-${p.from}-to-${p.to}.csv`;
    const a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return requireSignIn();
    setStatus(explain(e), "error");
  }
}

async function load() {
  const p = period();
  document.getElementById("from").value = p.from;
  document.getElementById("to").value = p.to;
  let reports, funding;
  try {
    [funding, ...reports] = await Promise.all([api(fundingPath(p)), ...GROUPS.map((g) => api(reportPath(g, p)))]);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return requireSignIn();
    if (e instanceof ApiError && e.status === 403) {
      setStatus("These reports are for the finance and hr roles; your sign-in has neither.", "error");
      return;
    }
    setStatus(explain(e), "error");
    return;
  }
  GROUPS.forEach((g, n) => renderGroup(g, reports[n].items));
  renderTop(reports[2].items);
  renderFunding(funding.items);
  setStatus("");
  document.getElementById("report").hidden = false;
  document.body.dataset.ready = "true";
}

wireHeader();
for (const button of document.querySelectorAll("button.csv")) {
  button.addEventListener("click", () => download(button.dataset.group));
}
load();
