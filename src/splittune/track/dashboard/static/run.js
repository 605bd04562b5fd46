// The run page: polls /api/run (state), /api/metrics (new step rows only) and /api/evals.
"use strict";

const KNOWN = new Set(["step", "client", "loss", "lr", "tokens", "bytes_up", "bytes_down", "step_s", "compute_s", "codec_s",
  "wait_s", "server_s", "wire_s", "bottom_s", "codec_error_up", "codec_error_down", "cache_hits", "cache_misses", "skipped"]);
const PARTS = ["compute_s", "codec_s", "wait_s"];
let rows = [], generation = -1, evals = [], run = null;

function byClient(key, cumulative) {
  const out = new Map();
  for (const r of rows) {
    if (r[key] == null) continue;
    const s = out.get(r.client) || { name: "client " + r.client, points: [], sum: 0 };
    s.sum += r[key];
    s.points.push([r.step, cumulative ? s.sum : r[key]]);
    out.set(r.client, s);
  }
  return [...out.values()];
}

// [step, mean over the clients' rows of that step]
function meanByStep(key) {
  const sums = new Map();
  for (const r of rows) if (r[key] != null) {
    const s = sums.get(r.step) || [0, 0];
    sums.set(r.step, [s[0] + r[key], s[1] + 1]);
  }
  return [...sums].map(([step, s]) => [step, s[0] / s[1]]);
}

function drawCharts() {
  const several = run && run.clients.length > 1;
  const loss = byClient("loss");
  chart("chart-loss", several ? loss : loss.map(s => ({ ...s, name: "loss" })), { xlabel: "step" });
  chart("chart-eval", [{ name: "eval loss", points: evals.map(e => [e.step, e.loss]), dots: true }],
    { xlabel: "step", empty: "no evaluation yet (one runs before training, every train.eval_every steps, and at the end)" });
  const up = byClient("bytes_up", true), down = byClient("bytes_down", true);
  chart("chart-bytes", [...up.map(s => ({ ...s, name: s.name + " up" })), ...down.map(s => ({ ...s, name: s.name + " down" }))],
    { xlabel: "step", fmt: fmtBytes, zero: true, empty: "no bytes: a centralized run sends none" });
  const last = rows.filter(r => r.compute_s != null).slice(-60);
  if (last.length) {
    let top = [];
    const series = PARTS.map(part => ({ name: part.replace("_s", ""), stack: true, points: [] }));
    last.forEach((r, i) => {
      let base = 0;
      PARTS.forEach((part, k) => { series[k].points.push([i, base, base + r[part]]); base += r[part]; });
      top.push(base);
    });
    chart("chart-time", series, { bars: top, xlabel: "last " + last.length + " client steps" });
  } else chart("chart-time", [], { empty: "no breakdown: only a split run times its cut" });
  chart("chart-codec", ["up", "down"].map(d => ({ name: d, points: meanByStep("codec_error_" + d) })).filter(s => s.points.length),
    { xlabel: "step", empty: "no lossy codec: what crosses is exact" });
  const extra = new Map();
  for (const r of rows) for (const [k, v] of Object.entries(r))
    if (!KNOWN.has(k) && typeof v === "number") (extra.get(k) || extra.set(k, []).get(k)).push([r.step, v]);
  chart("chart-extra", [...extra].map(([name, points]) => ({ name, points })), { xlabel: "step", empty: "no defense reports a per-step figure" });
}

function drawRun() {
  const c = run.config || {};
  setText("name", run.name);
  const badge = document.getElementById("status");
  badge.textContent = run.status;
  badge.className = "badge " + run.status;
  setText("plan", [c.model, c.mode, c.cuts ? "cuts " + JSON.stringify(c.cuts) : null, c.clients > 1 ? c.clients + " clients · " + c.schedule : null]
    .filter(Boolean).join(" · "));
  setText("step", run.step);
  setText("steps", run.steps);
  document.getElementById("progress").style.width = (run.steps ? Math.min(100, 100 * run.step / run.steps) : 0) + "%";
  const lastRow = rows[rows.length - 1];
  setText("loss", lastRow ? fmtNum(lastRow.loss) : null);
  const e = evals[evals.length - 1];
  setText("eval", e ? fmtNum(e.loss, 3) + " · " + fmtNum(e.ppl, 1) : null);
  setText("bytes-up", fmtBytes(run.bytes_up));
  setText("bytes-down", fmtBytes(run.bytes_down));
  setText("step-time", run.breakdown ? fmtNum(run.breakdown.step_s, 3) + " s" : null);
  fillTable("breakdown", [["part", r => r[0]], ["mean s (last steps)", r => fmtNum(r[1], 4)]],
    run.breakdown ? Object.entries(run.breakdown) : [], "no breakdown yet");
  fillTable("clients", [["client", r => r.client], ["step", r => r.step], ["steps taken", r => r.steps_taken], ["loss", r => fmtNum(r.loss)],
    ["lr", r => fmtNum(r.lr, 6)], ["tokens", r => r.tokens], ["bytes up", r => fmtBytes(r.bytes_up)], ["bytes down", r => fmtBytes(r.bytes_down)]],
    run.clients, "no step yet");
  const names = new Set([...Object.keys(run.privacy.planned), ...Object.keys(run.privacy.spent).map(k => k.replace(/_epsilon$/, ""))]);
  fillTable("privacy", [["defense", r => r], ["ε by the last step (planned)", r => fmtNum(run.privacy.planned[r], 3)],
    ["ε spent (at the end)", r => fmtNum(run.privacy.spent[r.replace(/-/g, "_") + "_epsilon"], 3)]], [...names], "no defense with an ε");
  setText("privacy-note", c.defenses && c.defenses.length ? "defenses: " + c.defenses.map(d => d.name).join(", ") : "");
  const codec = c.codec ? "up " + c.codec.up + " · down " + c.codec.down : null;
  fillTable("config", [["key", r => r[0]], ["value", r => r[1] == null ? "–" : typeof r[1] === "object" ? JSON.stringify(r[1]) : r[1]]],
    [["model", c.model], ["data", c.data], ["steps", c.steps], ["batch size", c.batch_size], ["seq len", c.seq_len], ["lr", c.lr],
     ["dtype", c.dtype], ["micro-batches", c.micro_batches], ["codec", codec], ["eval every", c.eval_every],
     ["defenses", (c.defenses || []).map(d => d.name).join(", ") || "none"], ["secure aggregation", c.secure_aggregation]]);
  fillTable("summary", [["", r => r[0]], ["value", r => fmtNum(r[1], 4)]], run.summary ? Object.entries(run.summary) : [],
    run.status === "finished" ? "no summary" : "the run has not finished");
}

poll(() => "/api/metrics?since=" + rows.length + "&generation=" + generation, data => {
  if (data.generation !== generation || data.from !== rows.length) rows = rows.slice(0, data.from);
  generation = data.generation;
  rows = rows.concat(data.rows);
  if (run) drawCharts();
}, 2000);
poll("/api/evals", data => { evals = data.rows; drawCharts(); if (run) drawRun(); }, 4000);
poll("/api/run", data => { run = data; drawRun(); drawCharts(); }, 2000);
