"""The status page: what `predictord status` shows, in a browser, refreshing itself, with charts people can read.

One self-contained HTML document (no CDN, no vendored library: the machine may be offline, and the charts need
little: about 120 lines of SVG drawing below, where uPlot, the smallest well-kept choice, is 45 KB). It polls ``GET
/`` for JSON every two seconds and builds everything with ``textContent`` and SVG, so a string from a predictor (a
name, an error) can never become markup.

- Per API: its figures over the last minute, its errors (load, crash, last request error, health) with file:line
  and time, and two charts over the last ten minutes: requests/s, and p50 and p99 latency. Every chart has a time
  axis, units, a legend and values on hover, and all the APIs' charts of one metric share one scale. "details"
  opens the versions wanted and serving, the replicas by worker and device, the settings, and charts of the batch
  size, the requests outstanding and the 5xx rate.
- Devices with utilization and memory bars (ours, others', free); rebalancing decisions; events, filterable by
  API, that stack into readable blocks on a phone.
"""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>predictord</title>
<style>
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1f2328;max-width:1600px}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
nav a{margin-right:10px;font-size:13px;color:#2563eb}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px;align-items:start}
.card{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:10px;overflow-wrap:anywhere;min-width:0}
.badge{font-size:12px;padding:1px 6px;border-radius:9px;margin-left:6px;color:#fff;background:#6b7280}
.ready{background:#17803d}.loading{background:#a15c00}.failed{background:#b42318}.unhealthy{background:#c2410c}
.err{color:#b42318;font-size:12px;margin-top:4px}.muted{color:#5f6b7a;font-size:12px}
.figs{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;margin:4px 0}.figs b{font-weight:600}
.chart{margin-top:6px}.legend{font-size:11px;color:#5f6b7a;display:flex;gap:10px;flex-wrap:wrap}
.sw{display:inline-block;width:10px;height:3px;vertical-align:middle;margin-right:3px}
svg.plot{width:100%;height:auto;display:block;background:#fbfcfd;border:1px solid #eef0f3;border-radius:4px}
svg text{font:9px system-ui,sans-serif;fill:#5f6b7a}
button{font:12px system-ui;border:1px solid #c9d1da;background:#fff;border-radius:4px;padding:1px 8px;cursor:pointer}
.details{border-top:1px solid #eef0f3;margin-top:8px;padding-top:6px}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f3}
th{font-weight:600;color:#5f6b7a;white-space:nowrap}.nowrap{white-space:nowrap}
.details table{table-layout:fixed;font-size:12px}.details td{overflow-wrap:anywhere}
.details table.kv td:first-child{width:76px;color:#5f6b7a}
.bar{display:flex;height:12px;border-radius:3px;overflow:hidden;background:#e5e7eb;margin:3px 0}
.bar span{display:block;height:100%}.ours{background:#2563eb}.others{background:#f59e0b}.util{background:#10b981}
.dev{margin-bottom:10px}
select{font:13px system-ui}
@media (max-width:640px){
  body{padding:8px}.grid{grid-template-columns:1fr}
  table.stack tr{display:block;border-bottom:1px solid #eef0f3;padding:4px 0}
  table.stack td,table.stack th{display:block;border:0;padding:1px 4px}
  table.stack td.nowrap{display:inline-block;color:#5f6b7a}
  table.stack td[data-label]:not(.nowrap)::before{content:attr(data-label) ": ";color:#5f6b7a}
  table.stack tr.head{display:none}
}
</style></head><body>
<h1>predictord <span id="summary" class="muted"></span></h1>
<nav><a href="#apis-h">APIs</a><a href="#workers-h">Workers</a><a href="#devices-h">Devices</a>
<a href="#decisions-h">Rebalancing</a><a href="#events-h">Events</a></nav>
<h2 id="apis-h">APIs</h2>
<div class="muted">Charts: the last ten minutes; every API's chart of one metric has the same scale. Hover for
values.</div>
<div id="apis" class="grid"></div>
<h2 id="workers-h">Workers</h2><div class="card"><table id="workers" class="stack"></table></div>
<h2 id="devices-h">Devices</h2><div class="card" id="devices"></div>
<h2 id="decisions-h">Rebalancing</h2><div class="card"><table id="decisions" class="stack"></table></div>
<h2 id="events-h">Recent events</h2>
<div class="card"><label class="muted">API <select id="filter"><option value="">all</option></select></label>
<table id="events" class="stack"></table></div>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg", WINDOW = 600;
const COL = {rps: 1, p99: 2, p50: 3, errors: 4, batch: 5, queue: 6};
const open = new Set();
let hovering = false, last = null;
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function sv(tag, attrs, text) { const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text; return e; }
function nice(v) { if (!(v > 0)) return 1; const e = Math.pow(10, Math.floor(Math.log10(v))), f = v / e;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * e; }
function fmt(v, unit) { if (v === null || v === undefined) return "-";
  const n = Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  return n + " " + unit; }
function num(v) { return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1).replace(/\.0$/, "") :
  String(Number(v.toFixed(2))); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function ago(t) { const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : clock(t); }
// A chart: lines of [time, value] over the last WINDOW seconds, a y scale from 0 to max, axes with units, a legend,
// and the values under the pointer.
function chart(title, unit, lines, max, now) {
  const W = 320, H = 112, L = 34, R = 8, T = 14, B = 18, box = el("div", undefined, "chart");
  const legend = el("div", undefined, "legend"); legend.appendChild(el("b", title));
  for (const l of lines) {
    const s = el("span"), sw = el("span", undefined, "sw"); sw.style.background = l.color;
    s.appendChild(sw); s.appendChild(document.createTextNode(l.label)); legend.appendChild(s);
  }
  box.appendChild(legend);
  const svg = sv("svg", {viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img",
                         "aria-label": title + " (" + unit + ")"});
  const x = t => L + (W - L - R) * (1 - (now - t) / WINDOW), y = v => T + (H - T - B) * (1 - v / max);
  for (const f of [0, 0.5, 1]) { const v = max * f;
    svg.appendChild(sv("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e5e7eb"}));
    svg.appendChild(sv("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"}, num(v))); }
  svg.appendChild(sv("text", {x: 2, y: 8, "font-weight": 600}, unit));
  for (const [t, label, anchor] of [[now - WINDOW, "-10 min", "start"], [now - WINDOW / 2, "-5 min", "middle"],
                                     [now, "now", "end"]])
    svg.appendChild(sv("text", {x: x(t), y: H - 5, "text-anchor": anchor}, label));
  let count = 0, newest = null;
  for (const l of lines) { let d = "";
    const pts = l.points.filter(p => p[0] >= now - WINDOW);
    pts.forEach((p, i) => {
      if (p[1] === null || p[1] === undefined) return;
      d += (d && pts[i - 1] && pts[i - 1][1] !== null ? " L" : " M") + x(p[0]).toFixed(1) + "," +
        y(Math.min(p[1], max)).toFixed(1);
    });
    if (d) svg.appendChild(sv("path", {d, fill: "none", stroke: l.color, "stroke-width": 1.6,
                                       "vector-effect": "non-scaling-stroke"}));
    if (l === lines[0]) { const v = pts.filter(p => p[1] !== null && p[1] !== undefined);
      count = v.length; newest = v.length ? v[v.length - 1][1] : null; } }
  svg.dataset.chart = title; svg.dataset.points = String(count);
  svg.dataset.last = newest === null ? "" : String(newest);
  svg.dataset.max = String(max);
  const cursor = sv("line", {y1: T, y2: H - B, stroke: "#9ca3af", visibility: "hidden"}),
        tip = sv("text", {x: L + 4, y: T + 8, "font-weight": 600});
  svg.appendChild(cursor); svg.appendChild(tip);
  const show = e => { const r = svg.getBoundingClientRect(), px = (e.clientX - r.left) * W / r.width;
    const t = now - WINDOW * (1 - (px - L) / (W - L - R)); let near = null, parts = [];
    for (const l of lines) { let best = null;
      for (const p of l.points)
        if (p[1] !== null && p[1] !== undefined && (best === null || Math.abs(p[0] - t) < Math.abs(best[0] - t)))
          best = p;
      if (best) { near = near || best; parts.push(l.label + " " + fmt(best[1], unit)); } }
    if (!near) return; cursor.setAttribute("x1", x(near[0])); cursor.setAttribute("x2", x(near[0]));
    cursor.setAttribute("visibility", "visible"); tip.textContent = clock(near[0]) + "  " + parts.join(" · ");
    svg.dataset.hover = tip.textContent; };
  svg.addEventListener("pointermove", e => { hovering = true; show(e); });
  svg.addEventListener("pointerleave", () => {
    hovering = false; cursor.setAttribute("visibility", "hidden"); tip.textContent = "";
  });
  box.appendChild(svg); return box;
}
function col(series, c) { return series.map(p => [p[0], p[c]]); }
function seriesMax(data, c) {
  let m = 0;
  for (const s of Object.values(data.series || {})) for (const p of s) if (p[c] > m) m = p[c];
  return nice(m);
}
function row(table, cells, head, labels) { const tr = el("tr", undefined, head ? "head" : "");
  cells.forEach((c, i) => {
    const td = el(head ? "th" : "td", c); if (i < 2 && !head && !labels) td.className = "nowrap";
    if (labels) td.dataset.label = labels[i]; tr.appendChild(td);
  });
  table.appendChild(tr); return tr; }
function kv(table, k, v) { const tr = el("tr"); tr.appendChild(el("td", k)); tr.appendChild(el("td", v));
  table.appendChild(tr); }
function where(e) { return (e.file ? e.file + (e.line ? ":" + e.line : "") + ": " : "") + e.message; }
function card(name, a, data, now, scale) {
  const s = a.stats || {}, c = el("div", undefined, "card"), series = (data.series || {})[name] || [];
  c.setAttribute("data-api", name);
  const head = el("div"); head.appendChild(el("b", name)); head.appendChild(el("span", a.state, "badge " + a.state));
  const more = el("button", open.has(name) ? "hide details" : "details"); more.style.float = "right";
  more.addEventListener("click", () => { open.has(name) ? open.delete(name) : open.add(name); render(last); });
  head.appendChild(more); c.appendChild(head);
  const figs = el("div", undefined, "figs");
  for (const [k, v] of [["req/s", (s.rps || 0).toFixed(1)], ["p50", fmt(s.p50_ms, "ms")],
                        ["p99", fmt(s.p99_ms, "ms")], ["5xx", String(s.errors || 0)]]) {
    const f = el("span"); f.appendChild(el("b", v)); f.appendChild(document.createTextNode(" " + k));
    figs.appendChild(f);
  }
  figs.appendChild(el("span", "(last minute)", "muted")); c.appendChild(figs);
  c.appendChild(el("div", "version " + (a.version.serving.join(", ") || a.version.wanted || "-") + " on " +
    (a.replicas.map(r => r.device + "#" + r.worker).join(", ") || "no replica"), "muted"));
  if (a.check) c.appendChild(el("div", a.check, "muted"));
  for (const [what, e] of [["", a.error], ["crash: ", a.crash], ["last request error" + (a.request_errors > 1 ?
      " (" + a.request_errors + " since start)" : "") + ": ", a.request_error], ["health: ", a.health]])
    if (e) c.appendChild(el("div", what + where(e) + (e.at ? " (" + ago(e.at) + ")" : ""), "err"));
  c.appendChild(chart("requests", "req/s", [{label: "requests/s", color: "#2563eb", points: col(series, COL.rps)}],
                      scale.rps, now));
  c.appendChild(chart("latency", "ms", [{label: "p99", color: "#c2410c", points: col(series, COL.p99)},
    {label: "p50", color: "#7c3aed", points: col(series, COL.p50)}], scale.p99, now));
  if (open.has(name)) c.appendChild(details(a, series, now));
  return c;
}
function details(a, series, now) {
  const d = el("div", undefined, "details"), t = el("table", undefined, "kv");
  const loaded = a.version.loaded_at || {};
  kv(t, "versions", "wanted " + (a.version.wanted || "-") + "; serving " + (a.version.serving.map(v =>
    v + (loaded[v] ? " (loaded " + ago(loaded[v]) + ")" : "")).join(", ") || "none"));
  const o = a.serving || {};
  kv(t, "settings", "device " + (o.device || "-") + ", replicas " + (o.replicas ?? "-") + ", threads " +
    (o.threads ?? "-") + ", batch " + (o.max_batch_size ?? "-") + " / " + (o.batch_wait_ms ?? "-") + " ms, timeout " +
    (o.timeout ?? "-") + " s, isolation " + (o.isolation || "-"));
  if (a.environment) kv(t, "environment", a.environment.key + ": " + a.environment.phase);
  d.appendChild(t);
  const r = el("table"); row(r, ["worker", "device", "pid", "version", "health"], true);
  for (const x of a.replicas) row(r, ["#" + x.worker, x.device, String(x.pid), x.version, "ok"]);
  for (const x of a.unhealthy || [])
    row(r, ["#" + x.worker, x.device, String(x.pid), x.version || "-", "unhealthy: " + x.problem.message]);
  if (!a.replicas.length && !(a.unhealthy || []).length) row(r, ["-", "no replica", "", "", ""]);
  d.appendChild(el("div", "replicas", "muted")); d.appendChild(r);
  const batch = col(series, COL.batch), queue = col(series, COL.queue), errs = col(series, COL.errors);
  const m = (pts) => nice(Math.max(0, ...pts.map(p => p[1] || 0)));
  d.appendChild(chart("batch size", "req", [{label: "mean per predict()", color: "#0891b2", points: batch}],
                      m(batch), now));
  d.appendChild(chart("outstanding", "req", [{label: "queued or running", color: "#4b5563", points: queue}],
                      m(queue), now));
  d.appendChild(chart("errors", "5xx/s", [{label: "5xx/s", color: "#b42318", points: errs}], m(errs), now));
  return d;
}
function bar(parts) { const b = el("div", undefined, "bar");
  for (const [cls, frac, label] of parts) {
    const s = el("span", undefined, cls); s.style.width = (100 * Math.max(0, Math.min(1, frac))).toFixed(1) + "%";
    s.title = label; b.appendChild(s);
  }
  return b;
}
const GiB = 2 ** 30;
function device(d) { const box = el("div", undefined, "dev");
  box.appendChild(el("b", d.name + " "));
  box.appendChild(el("span", d.state + ", " + d.workers + " worker(s)", "muted"));
  const theirs = d.kind === "gpu" ? ", others' " + (d.foreign_util || 0).toFixed(0) + "%" : "";
  box.appendChild(el("div", "utilization " + d.util.toFixed(0) + "%" + theirs, "muted"));
  box.appendChild(bar([["util", d.util / 100, "utilization"]]));
  let total, ours, others;
  total = d.memory_total;
  if (d.kind === "gpu") { others = d.foreign_memory || 0; ours = Math.max(0, d.memory_used - others); }
  else { ours = d.memory_ours || 0; others = Math.max(0, total - d.memory_available - ours); }
  const free = Math.max(0, total - ours - others);
  box.appendChild(el("div", "memory: ours " + (ours / GiB).toFixed(1) + " GiB, others' " + (others / GiB).toFixed(1) +
    " GiB, free " + (free / GiB).toFixed(1) + " of " + (total / GiB).toFixed(1) + " GiB", "muted"));
  box.appendChild(bar([["ours", ours / total, "ours"], ["others", others / total, "others'"]]));
  return box; }
function render(data) {
  if (!data) return; last = data;
  const now = Math.max(Date.now() / 1000,
                       ...Object.values(data.series || {}).map(s => s.length ? s[s.length - 1][0] : 0));
  const names = Object.keys(data.apis).sort(), failed = names.filter(n => data.apis[n].state === "failed").length;
  document.getElementById("summary").textContent = names.length + " APIs, " + failed + " failed, " +
    (data.workers || []).length + " model workers; " + (data.daemon && data.daemon.ready ? "ready" : "not ready") +
    "; updated " + new Date().toLocaleTimeString();
  const scale = {rps: seriesMax(data, COL.rps), p99: seriesMax(data, COL.p99)};
  const apis = document.getElementById("apis"); apis.replaceChildren();
  for (const n of names) apis.appendChild(card(n, data.apis[n], data, now, scale));
  const workers = document.getElementById("workers"); workers.replaceChildren();
  const heads = ["worker", "pid", "device", "APIs", "restarts", "busy"];
  row(workers, heads, true);
  for (const w of data.workers || []) row(workers, ["#" + w.slot, String(w.pid), w.device,
    (Object.keys(w.apis).join(", ") || "-") +
      (w.dedicated ? " (dedicated" + (w.env ? ", own environment" : "") + ")" : ""),
    String(w.restarts || 0), w.busy === null || w.busy === undefined ? "-" : (100 * w.busy).toFixed(0) + "%"], false,
    heads);
  const devices = document.getElementById("devices"); devices.replaceChildren();
  const devs = data.devices || [];
  if (!devs.some(d => d.kind === "gpu")) devices.appendChild(el("div", "No GPUs: running on the CPU.", "muted"));
  for (const d of devs) devices.appendChild(device(d));
  const decisions = document.getElementById("decisions"); decisions.replaceChildren();
  const made = (data.decisions || []).slice(-15).reverse();
  if (!made.length) row(decisions, ["-", "no rebalancing decisions yet"]);
  for (const e of made) row(decisions, [clock(e.at), e.text]);
  const filter = document.getElementById("filter"), chosen = filter.value, seen = new Set(names);
  for (const e of data.events || []) if (e.api) seen.add(e.api);
  filter.replaceChildren(el("option", "all")); filter.firstChild.value = "";
  for (const n of [...seen].sort()) { const o = el("option", n); o.value = n; filter.appendChild(o); }
  filter.value = chosen;
  const events = document.getElementById("events"); events.replaceChildren();
  row(events, ["time", "kind", "what"], true);
  for (const e of (data.events || []).filter(e => !chosen || e.api === chosen).slice(-20).reverse())
    row(events, [clock(e.at), e.kind, e.text]).dataset.api = e.api || "";
}
document.getElementById("filter").addEventListener("change", () => render(last));
async function refresh() {
  if (hovering) return;
  try { const r = await fetch("/", {headers: {"Accept": "application/json"}}); render(await r.json()); }
  catch (e) { document.getElementById("summary").textContent = "cannot reach the daemon: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>"""
