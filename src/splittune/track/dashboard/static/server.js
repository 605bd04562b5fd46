// The operator's page: polls /api/server (what the served process holds now).
"use strict";

const history = [];  // [t, bytes_in, bytes_out] per poll, for the traffic chart

function chainText(chain) {
  if (!chain) return "–";
  const codec = t => [...new Set(Object.values(t).filter(v => v && v.name).map(v => v.name))].join("/") || "raw";
  const side = terms => terms.map(t => t.name === "codec" ? codec(t) : t.name).join(" → ") || "raw";
  return "up: " + side(chain.up) + " · down: " + side(chain.down);
}

function defensesText(list) {
  return list && list.length ? list.map(d => d.name + Object.entries(d).filter(([k]) => k !== "name").map(([k, v]) => " " + k + "=" + v).join("")).join("; ") : "none";
}

function sessionColumns(now) {
  return [["client id", s => s.client_id], ["client", s => s.client == null ? "–" : s.client + (s.clients ? " of " + s.clients : "")],
    ["run", s => s.run ? s.run.slice(0, 12) : "–"], ["step", s => s.step + (s.steps ? " / " + s.steps : "")],
    ["last seen", s => fmtAgo(now - s.last_seen)], ["last message", s => s.last_kind || "hello"],
    ["bytes in", s => fmtBytes(s.bytes_in)], ["bytes out", s => fmtBytes(s.bytes_out)], ["errors", s => s.errors],
    ["agreed chain", s => chainText(s.chain)], ["announced defenses", s => defensesText(s.defenses) + (s.secure_aggregation ? "; secure aggregation" : "")],
    ["connected", s => s.connected ? "yes" : "no"]];
}

poll("/api/server", data => {
  const now = data.now;
  setText("uptime", "up " + fmtNum(data.uptime_s / 60, 1) + " min · " + data.sessions_opened + " sessions opened");
  setText("session-count", data.sessions.length);
  setText("inference-count", data.inference_sessions.length);
  setText("messages", data.messages);
  setText("bytes-in", fmtBytes(data.bytes_in));
  setText("bytes-out", fmtBytes(data.bytes_out));
  setText("refused", data.refused);
  setText("pending", data.pending);
  fillTable("sessions", sessionColumns(now), data.sessions, "no client connected");
  fillTable("runs", [["clients", r => r.clients], ["joined", r => r.joined], ["schedule", r => r.schedule], ["steps", r => r.steps]],
    data.runs, "no run yet");
  fillTable("refusals", [["status", r => r.code], ["count", r => r.count], ["last reason", r => r.reason], ["when", r => fmtAgo(now - r.t)]],
    data.refused_by_reason, "nothing refused");
  fillTable("inference", [["client id", s => s.client_id], ["model", s => s.model], ["opened", s => fmtAgo(now - s.opened)],
    ["last seen", s => fmtAgo(now - s.last_seen)], ["messages", s => s.messages], ["bytes in", s => fmtBytes(s.bytes_in)],
    ["bytes out", s => fmtBytes(s.bytes_out)]], data.inference_sessions, "no inference session");
  fillTable("inference-totals", [["", r => r[0]], ["", r => r[1]]], [["KV caches", fmtBytes(data.inference.inference_bytes)],
    ["models loaded", data.inference.inference_models]]);
  const m = data.memory;
  fillTable("memory", [["", r => r[0]], ["", r => fmtBytes(r[1])]], [["resident now", m.rss_now_bytes], ["peak resident", m.rss_bytes]]
    .concat(m.device_bytes != null ? [["peak on the device", m.device_bytes]] : []));
  fillTable("tap", [["observer", r => r[0]], ["recorded", r => fmtBytes(r[1].bytes)], ["cap", r => fmtBytes(r[1].max_bytes)], ["records dropped", r => r[1].dropped]],
    data.tap ? Object.entries(data.tap.observers) : [], "not recording (serve --record-tap DIR)");
  fillTable("ended", sessionColumns(now).filter(c => !["connected", "agreed chain"].includes(c[0])).concat([["ended", s => fmtAgo(now - s.ended)]]),
    data.ended, "none");
  history.push([now, data.bytes_in, data.bytes_out]);
  if (history.length > 600) history.shift();
  const rate = k => history.slice(1).map((h, i) => [h[0] - history[0][0], (h[k] - history[i][k]) / Math.max(h[0] - history[i][0], 1e-3)]);
  chart("chart-traffic", [{ name: "in", points: rate(1) }, { name: "out", points: rate(2) }],
    { xlabel: "seconds", fmt: v => (Math.abs(v) < 10 ? v.toFixed(1) + " B" : fmtBytes(Math.round(v))) + "/s", zero: true, empty: "two polls make a rate" });
}, 2000);
