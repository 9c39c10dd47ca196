// Finance's page: usage over a chosen period by department, model and
// employee (GET /v1/reports/usage), the top spenders, and each department's
// spend against its funding. Each table's CSV button downloads the API's own
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

async function renderFunding(items) {
  const box = document.getElementById("funding");
  const depts = items.filter((i) => i.department);
  if (depts.length === 0) {
    box.replaceChildren(el("p", { text: "No department spent anything in this period." }));
    return;
  }
  // A department's funding is its budget account: what finance transferred
  // to it and it has not yet granted or spent. Shown beside the period's spend.
  const accounts = await Promise.all(depts.map((d) =>
    api(`/v1/accounts/${encodeURIComponent("department:" + d.department)}`).catch(() => null)));
  const rows = depts.map((d, n) => ({ dept: d.department, spent: d.credits, left: accounts[n] ? accounts[n].available : null }));
  box.replaceChildren(
    barChart(rows.map((r) => ({ label: r.dept, value: r.spent, of: r.left === null ? undefined : r.spent + Math.max(0, r.left) })),
      { title: "Spend in the period against spend plus the budget left" }),
    table(
      [{ label: "Department" }, { label: "Spent in period", numeric: true }, { label: "Budget left now", numeric: true }],
      rows.map((r) => [r.dept, credits(r.spent), r.left === null ? "—" : credits(r.left)]),
    ),
  );
}

async function download(group) {
  const p = period();
  try {
    const csv = await api(reportPath(group, p), { accept: "text/csv" });
    const blob = new Blob([csv], { type: "text/csv" });
    const a = el("a", { href: URL.createObjectURL(blob), download: `usage-by-${group}-${p.from}-to-${p.to}.csv` });
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
  let reports;
  try {
    reports = await Promise.all(GROUPS.map((g) => api(reportPath(g, p))));
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
  try {
    await renderFunding(reports[0].items);
  } catch (e) {
    setStatus(explain(e), "error");
    return;
  }
  setStatus("");
  document.getElementById("report").hidden = false;
  document.body.dataset.ready = "true";
}

wireHeader();
for (const button of document.querySelectorAll("button.csv")) {
  button.addEventListener("click", () => download(button.dataset.group));
}
load();
