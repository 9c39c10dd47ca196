// Charts as SVG built from the API's JSON, no chart library: a balance line
// with one marker per point, and horizontal bars. SVG elements are part of
// the page (a screen reader reads their titles, a test counts the markers),
// scale to any width, and need no script or style but this file.
"use strict";

import { credits } from "./common.js";

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// points: [{at, posted}] in time order. label(at) names a point.
export function lineChart(points, { title, label }) {
  const W = 640, H = 220, L = 64, R = 12, T = 12, B = 28;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart line",
    role: "img",
    "aria-label": title,
    preserveAspectRatio: "none",
  });
  root.append(svg("title", {}, title));
  if (points.length === 0) return root;
  const values = points.map((p) => p.posted);
  let lo = Math.min(0, ...values), hi = Math.max(...values);
  if (hi === lo) hi = lo + 1;
  const x = (i) => L + (points.length === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (points.length - 1));
  const y = (v) => T + ((hi - v) * (H - T - B)) / (hi - lo);
  // Axes: the range's top and bottom, the first and last label.
  root.append(svg("line", { x1: L, y1: y(lo), x2: W - R, y2: y(lo), class: "axis" }));
  root.append(svg("text", { x: L - 6, y: y(hi) + 4, "text-anchor": "end", class: "tick" }, credits(hi)));
  root.append(svg("text", { x: L - 6, y: y(lo) + 4, "text-anchor": "end", class: "tick" }, credits(lo)));
  root.append(svg("text", { x: L, y: H - 8, class: "tick" }, label(points[0].at)));
  if (points.length > 1) {
    root.append(svg("text", { x: W - R, y: H - 8, "text-anchor": "end", class: "tick" }, label(points[points.length - 1].at)));
  }
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p.posted).toFixed(1)}`).join(" ");
  root.append(svg("path", { d: path, class: "series" }));
  const marks = svg("g", { class: "points" });
  points.forEach((p, i) => {
    const dot = svg("circle", {
      cx: x(i).toFixed(1),
      cy: y(p.posted).toFixed(1),
      r: points.length > 60 ? 1.5 : 3,
      class: "point",
      "data-at": p.at,
      "data-posted": p.posted,
    });
    dot.append(svg("title", {}, `${label(p.at)}: ${credits(p.posted)} credits`));
    marks.append(dot);
  });
  root.append(marks);
  return root;
}

// rows: [{label, value}] largest first; `of` (optional) draws each bar
// against a whole (spend against funding).
export function barChart(rows, { title }) {
  // Narrower than the line chart, so that labels stay legible on a phone.
  const rowH = 26, W = 440, L = 130, R = 80;
  const H = Math.max(rowH, rows.length * rowH);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart bars", role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  const max = Math.max(1, ...rows.map((r) => Math.max(r.value, r.of || 0)));
  rows.forEach((r, i) => {
    const y = i * rowH;
    const g = svg("g", { class: "bar" });
    g.append(svg("text", { x: L - 8, y: y + 17, "text-anchor": "end", class: "tick" }, r.label));
    if (r.of !== undefined) {
      g.append(svg("rect", { x: L, y: y + 4, width: ((W - L - R) * r.of) / max, height: rowH - 8, class: "whole" }));
    }
    g.append(svg("rect", { x: L, y: y + 4, width: Math.max(1, ((W - L - R) * r.value) / max), height: rowH - 8, class: "part" }));
    g.append(svg("text", { x: W - R + 6, y: y + 17, class: "tick" }, credits(r.value)));
    g.append(svg("title", {}, r.of === undefined
      ? `${r.label}: ${credits(r.value)} credits`
      : `${r.label}: ${credits(r.value)} of ${credits(r.of)} credits`));
    root.append(g);
  });
  return root;
}
