// splittune dashboards: what both pages share. Plain DOM and SVG, no library, nothing fetched but this server's JSON.
// Text goes in with textContent only: client ids and reasons are whatever a client chose.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function setText(id, text) {
  const node = document.getElementById(id);
  if (node) node.textContent = text == null ? "–" : String(text);
}

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function fmtNum(x, digits) {
  if (x == null || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits == null ? 4 : digits);
}

function fmtAgo(seconds) {
  if (seconds == null) return "–";
  if (seconds < 1) return "now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return (seconds / 3600).toFixed(1) + " h ago";
}

// A table body from rows: columns are [header, row => text].
function fillTable(id, columns, rows, empty) {
  const table = document.getElementById(id);
  if (!table) return;
  table.replaceChildren(el("thead", {}, el("tr", {}, ...columns.map(c => el("th", {}, c[0])))));
  const body = el("tbody");
  for (const row of rows) body.append(el("tr", {}, ...columns.map(c => el("td", {}, c[1](row)))));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: columns.length, class: "empty" }, empty || "none")));
  table.append(body);
}

// At most `max` points of a series, evenly picked (the last one kept): a long run stays quick to draw.
function thin(points, max) {
  if (points.length <= max) return points;
  const out = [], step = points.length / max;
  for (let i = 0; i < max; i++) out.push(points[Math.floor(i * step)]);
  out.push(points[points.length - 1]);
  return out;
}

// A line chart: series = [{name, points: [[x, y], ...]}]; opts.log: a log y axis; opts.bars: stacked bars instead.
function chart(id, series, opts) {
  opts = opts || {};
  const box = document.getElementById(id);
  if (!box) return;
  const W = 460, H = 200, L = 56, R = 10, T = 10, B = 26;
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  const pts = series.flatMap(s => s.points).filter(p => p[1] != null && Number.isFinite(p[1]) && (!opts.log || p[1] > 0));
  if (!pts.length) {
    box.replaceChildren(el("p", { class: "empty" }, opts.empty || "no data yet"));
    return;
  }
  const ty = y => (opts.log ? Math.log10(y) : y);
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => ty(p[1]))), y1 = Math.max(...pts.map(p => ty(p[1])));
  if (opts.bars) { y0 = 0; y1 = Math.max(...opts.bars); }
  if (opts.zero && !opts.log) y0 = Math.min(0, y0);
  if (opts.bars) { x0 -= 0.5; x1 += 0.5; }  // a bar's width either side of its step
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0 && y0 === 0) y1 = 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1; y1 += Math.abs(y1) * 0.1; }
  const digits = Math.max(0, Math.min(8, Math.ceil(-Math.log10((y1 - y0) / 4)) + 1));
  const tick = v => opts.log ? Number(v.toPrecision(3)).toString() : Math.abs(v) >= 1e5 ? v.toExponential(2) : v.toFixed(digits);
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {  // the grid and the y labels
    const v = y0 + (y1 - y0) * i / 4, y = T + (1 - i / 4) * (H - T - B);
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
    const label = opts.log ? Math.pow(10, v) : v;
    svg.append(el("svg:text", { x: L - 4, y: y + 4, class: "tick", "text-anchor": "end" }, opts.fmt ? opts.fmt(label) : tick(label)));
  }
  if (!opts.bars) {
    svg.append(el("svg:text", { x: L, y: H - 6, class: "tick" }, fmtNum(x0)));
    svg.append(el("svg:text", { x: W - R, y: H - 6, class: "tick", "text-anchor": "end" }, fmtNum(x1)));
  }
  if (opts.xlabel) svg.append(el("svg:text", { x: (L + W - R) / 2, y: H - 6, class: "tick", "text-anchor": "middle" }, opts.xlabel));
  series.forEach((s, k) => {
    const color = s.color || COLORS[k % COLORS.length];
    const good = thin(s.points.filter(p => p[1] != null && Number.isFinite(p[1]) && (!opts.log || p[1] > 0)), 600);
    if (s.stack) {  // bars: [x, bottom, top]
      const w = Math.max(1, (W - L - R) / Math.max(s.points.length, 1) * 0.8);
      for (const p of s.points) svg.append(el("svg:rect", { x: sx(p[0]) - w / 2, y: sy(p[2]), width: w, height: Math.max(0, sy(p[1]) - sy(p[2])), fill: color }));
    } else if (good.length === 1 || s.dots) {
      for (const p of good) svg.append(el("svg:circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color }));
    }
    if (!s.stack && good.length > 1) {
      const d = good.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
      svg.append(el("svg:path", { d, fill: "none", stroke: color, "stroke-width": 1.6 }));
    }
  });
  const legend = el("div", { class: "legend" }, ...series.map((s, k) =>
    el("span", {}, el("i", { class: "swatch", "data-color": k % COLORS.length }), s.name)));
  box.replaceChildren(svg, legend);
}

// Poll `url` every `ms`, handing each answer to `take`; a failed poll says so in #status and tries again.
function poll(url, take, ms) {
  let timer = null;
  async function once() {
    try {
      const reply = await fetch(typeof url === "function" ? url() : url, { credentials: "same-origin", cache: "no-store" });
      if (!reply.ok) throw new Error((await reply.json().catch(() => ({}))).error || reply.status);
      take(await reply.json());
      document.body.classList.remove("offline");
      setText("connection", "live · updated " + new Date().toLocaleTimeString());
    } catch (err) {
      document.body.classList.add("offline");
      setText("connection", "cannot reach the dashboard: " + err.message);
    }
    timer = setTimeout(once, ms);
  }
  once();
  return () => clearTimeout(timer);
}
