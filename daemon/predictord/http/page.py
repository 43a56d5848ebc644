"""The status page: what `predictord status` shows, in a browser, refreshing itself, with small charts.

One self-contained HTML document (no CDN: the machine may be offline). It polls ``GET /`` for JSON every two
seconds and draws with the DOM's ``textContent`` and SVG, so a string from a predictor (a name, an error) can never
become markup.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>predictord</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 8px}h2{font-size:15px;margin:16px 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;overflow-wrap:anywhere}
.ready{color:#17803d}.loading{color:#a15c00}.failed{color:#b42318}
.err{color:#b42318;font-size:12px;margin-top:4px}.muted{color:#777;font-size:12px}
svg{width:100%;height:46px;background:#f4f6f8;border-radius:4px;margin-top:4px}
table{border-collapse:collapse;width:100%;font-size:13px}#events td:nth-child(-n+2){white-space:nowrap}
td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eee}
</style></head><body>
<h1>predictord <span id="summary" class="muted"></span></h1>
<div id="apis" class="grid"></div>
<h2>Workers</h2><div class="card"><table id="workers"></table></div>
<h2>Devices</h2><div class="card" id="devices"></div>
<h2>Rebalancing</h2><div class="card"><table id="decisions"></table></div>
<h2>Recent events</h2><div class="card"><table id="events"></table></div>
<script>
"use strict";
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function spark(points, index, label) {
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 100 40"); svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("data-chart", label);
  const values = points.map(p => p[index]).filter(v => v !== null && v !== undefined);
  svg.setAttribute("data-points", String(values.length));
  svg.setAttribute("data-last", values.length ? String(values[values.length - 1]) : "");
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9), line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", values.map((v, i) =>
      (i * 100 / (values.length - 1)).toFixed(1) + "," + (38 - v / max * 36).toFixed(1)).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", index === 1 ? "#2563eb" : "#c2410c");
    line.setAttribute("stroke-width", "1.5"); line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  }
  const title = document.createElementNS(ns, "title"); title.textContent = label; svg.appendChild(title);
  return svg;
}
function row(table, cells, head) { const tr = el("tr"); cells.forEach(c => tr.appendChild(el(head ? "th" : "td", c)));
  table.appendChild(tr); }
function render(data) {
  const apis = document.getElementById("apis"); apis.replaceChildren();
  const names = Object.keys(data.apis).sort();
  document.getElementById("summary").textContent = names.length + " APIs, " +
    (data.daemon && data.daemon.ready ? "all ready" : "not all ready") + ", updated " + new Date().toLocaleTimeString();
  for (const name of names) {
    const a = data.apis[name], s = a.stats || {}, card = el("div", undefined, "card");
    card.setAttribute("data-api", name);
    const head = el("div"); head.appendChild(el("b", name)); head.appendChild(el("span", " " + a.state, a.state));
    card.appendChild(head);
    card.appendChild(el("div", (s.rps || 0).toFixed(1) + " req/s, p50 " + (s.p50_ms ?? "-") + " ms, p99 " +
      (s.p99_ms ?? "-") + " ms, " + (s.errors || 0) + " errors (last minute)", "muted"));
    card.appendChild(el("div", "version " + (a.version.serving.join(", ") || a.version.wanted) + " on " +
      (a.replicas.map(r => r.device + "#" + r.worker).join(", ") || "-"), "muted"));
    if (a.check) card.appendChild(el("div", a.check, "muted"));
    for (const [what, e] of [["", a.error], ["crash: ", a.crash], ["last request error: ", a.request_error]])
      if (e) card.appendChild(el("div", what + (e.file ? e.file + (e.line ? ":" + e.line : "") + ": " : "") +
        e.message, "err"));
    const series = (data.series || {})[name] || [];
    card.appendChild(spark(series, 1, name + " requests/s"));
    card.appendChild(spark(series, 2, name + " p99 ms"));
    apis.appendChild(card);
  }
  const workers = document.getElementById("workers"); workers.replaceChildren();
  row(workers, ["worker", "pid", "device", "APIs", "restarts"], true);
  for (const w of data.workers || []) row(workers, [String(w.slot), String(w.pid), w.device,
    (Object.keys(w.apis).join(", ") || "-") + (w.dedicated ? " (dedicated)" : ""), String(w.restarts || 0)]);
  const devices = document.getElementById("devices"); devices.replaceChildren();
  const gpus = data.devices || [];
  if (!gpus.some(d => d.kind === "gpu")) devices.appendChild(el("div", "No GPUs: running on the CPU.", "muted"));
  for (const d of gpus) { devices.appendChild(el("div", d.name + ": " + d.text));
    devices.appendChild(spark(d.series || [], 1, d.name + " utilization %")); }
  const decisions = document.getElementById("decisions"); decisions.replaceChildren();
  const made = (data.decisions || []).slice(-15).reverse();
  if (!made.length) row(decisions, ["-", "no rebalancing decisions yet"]);
  for (const e of made) row(decisions, [new Date(e.at * 1000).toLocaleTimeString(), e.text]);
  const events = document.getElementById("events"); events.replaceChildren();
  for (const e of (data.events || []).slice(-15).reverse())
    row(events, [new Date(e.at * 1000).toLocaleTimeString(), e.kind, e.text]);
}
async function refresh() {
  try { const r = await fetch("/", {headers: {"Accept": "application/json"}}); render(await r.json()); }
  catch (e) { document.getElementById("summary").textContent = "cannot reach the daemon: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
