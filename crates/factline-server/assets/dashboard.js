// The factline dashboard: polls /dashboard/data and draws its figures as
// SVG. No libraries: everything it needs is here.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e0803a", "#3aa676", "#a35bd1", "#d1495b", "#1fa2b8", "#8c8c3a", "#6b7385"];

const $ = (id) => document.getElementById(id);
const euros = (cents) => (cents / 100).toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const count = (n) => Number(n).toLocaleString("en");

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function canvas(container, width, height) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  container.replaceChildren(root);
  return root;
}

function empty(container, message) {
  const p = document.createElement("div");
  p.className = "empty";
  p.textContent = message;
  container.replaceChildren(p);
}

// A round upper bound for an axis.
function niceMax(value) {
  if (value <= 0) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function drawRate(series) {
  const box = $("chart-rate");
  if (!series.length) return empty(box, "no samples yet");
  const W = 900, H = 160, L = 48, B = 20, T = 10;
  const root = canvas(box, W, H);
  const max = niceMax(Math.max(...series.map((s) => s.events_per_second)));
  const t0 = series[0].t, t1 = series[series.length - 1].t;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 8);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  for (const v of [0, max / 2, max]) {
    root.append(svg("line", { x1: L, x2: W - 8, y1: y(v), y2: y(v), stroke: "#e3e6ec" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, count(Math.round(v))));
  }
  const points = series.map((s) => `${x(s.t).toFixed(1)},${y(s.events_per_second).toFixed(1)}`).join(" ");
  root.append(svg("polyline", { points, fill: "none", stroke: COLORS[0], "stroke-width": 2, "data-samples": series.length }));
  root.append(svg("text", { x: L, y: H - 4 }, `${Math.round((t1 - t0) / 1000)} s ago`));
  root.append(svg("text", { x: W - 8, y: H - 4, "text-anchor": "end" }, "now"));
}

// The last `n` UTC days up to `now`, as YYYY-MM-DD.
function lastDays(now, n) {
  const days = [];
  for (let i = n - 1; i >= 0; i--) days.push(new Date(now.getTime() - i * 86400000).toISOString().slice(0, 10));
  return days;
}

// A value as the panel shows it: cents as an amount, numbers grouped.
function shown(panel, column, value) {
  if (value === null || value === undefined) return "–";
  if (panel.cents.includes(column)) return euros(value);
  return typeof value === "number" ? count(value) : String(value);
}

// Stacked bars per day: `y` per day `x`, one colour per `series`, over the
// last 14 days and any day the rows have.
function drawStacked(box, panel, now) {
  const rows = panel.rows, x = panel.x, y = panel.y, series = panel.series;
  const days = [...new Set([...lastDays(now, 14), ...rows.map((r) => String(r[x]))])].sort();
  const names = [...new Set(rows.map((r) => String(r[series])))].sort();
  const color = (name) => COLORS[names.indexOf(name) % COLORS.length];
  const totals = days.map((d) => rows.filter((r) => String(r[x]) === d).reduce((s, r) => s + Math.max(0, r[y]), 0));
  const legend = document.createElement("div");
  legend.className = "legend";
  if (!rows.length || Math.max(...totals) <= 0) return empty(box, "nothing yet");
  const W = 900, H = 260, L = 70, B = 24, T = 10;
  const root = canvas(box, W, H);
  const max = niceMax(Math.max(...totals));
  const slot = (W - L - 8) / days.length;
  const bar = Math.min(60, slot * 0.7);
  const top = (v) => T + (1 - v / max) * (H - T - B);
  for (const v of [0, max / 2, max]) {
    root.append(svg("line", { x1: L, x2: W - 8, y1: top(v), y2: top(v), stroke: "#e3e6ec" }));
    root.append(svg("text", { x: L - 6, y: top(v) + 4, "text-anchor": "end" }, shown(panel, y, v)));
  }
  days.forEach((day, i) => {
    const cx = L + slot * i + slot / 2;
    let base = 0;
    for (const name of names) {
      const row = rows.find((r) => String(r[x]) === day && String(r[series]) === name);
      if (!row || row[y] <= 0) continue;
      const rect = svg("rect", {
        x: (cx - bar / 2).toFixed(1), width: bar.toFixed(1),
        y: top(base + row[y]).toFixed(1), height: (top(base) - top(base + row[y])).toFixed(1),
        fill: color(name), "data-day": day, "data-series": name, "data-value": row[y],
      });
      rect.append(svg("title", {}, `${name} ${day}: ${shown(panel, y, row[y])}`));
      root.append(rect);
      base += row[y];
    }
    root.append(svg("text", { x: cx, y: H - 6, "text-anchor": "middle" }, day.slice(5)));
  });
  legend.replaceChildren(...names.map((name) => {
    const item = document.createElement("span");
    item.dataset.series = name;
    item.innerHTML = `<i style="background:${color(name)}"></i>`;
    item.append(name);
    return item;
  }));
  box.append(legend);
}

// Horizontal bars: `y` per `x`.
function drawBars(box, panel) {
  const rows = panel.rows, x = panel.x, y = panel.y;
  if (!rows.length) return empty(box, "nothing yet");
  const W = 420, row = 28, L = 110, H = rows.length * row + 6;
  const root = canvas(box, W, H);
  const max = Math.max(...rows.map((r) => Math.abs(r[y])), 1);
  rows.forEach((r, i) => {
    const top = 4 + i * row;
    const w = ((W - L - 70) * Math.max(0, r[y])) / max;
    root.append(svg("text", { x: L - 8, y: top + 16, "text-anchor": "end" }, String(r[x])));
    root.append(svg("rect", { x: L, y: top, width: w.toFixed(1), height: row - 8, rx: 3, fill: COLORS[i % COLORS.length], "data-label": String(r[x]), "data-value": r[y] }));
    root.append(svg("text", { x: L + w + 6, y: top + 16, class: "value-label" }, shown(panel, y, r[y])));
  });
}

// A line of `y` over `x` (one per `series` when given).
function drawLine(box, panel) {
  const rows = panel.rows, x = panel.x, y = panel.y, series = panel.series;
  if (!rows.length) return empty(box, "nothing yet");
  const xs = [...new Set(rows.map((r) => String(r[x])))].sort();
  const names = series ? [...new Set(rows.map((r) => String(r[series])))].sort() : [""];
  const W = 900, H = 200, L = 70, B = 24, T = 10;
  const root = canvas(box, W, H);
  const max = niceMax(Math.max(...rows.map((r) => r[y]), 1));
  const px = (v) => L + (xs.length > 1 ? (xs.indexOf(v) / (xs.length - 1)) * (W - L - 8) : (W - L - 8) / 2);
  const py = (v) => T + (1 - v / max) * (H - T - B);
  for (const v of [0, max / 2, max]) {
    root.append(svg("line", { x1: L, x2: W - 8, y1: py(v), y2: py(v), stroke: "#e3e6ec" }));
    root.append(svg("text", { x: L - 6, y: py(v) + 4, "text-anchor": "end" }, shown(panel, y, v)));
  }
  names.forEach((name, i) => {
    const points = rows.filter((r) => !series || String(r[series]) === name);
    root.append(svg("polyline", { points: points.map((r) => `${px(String(r[x])).toFixed(1)},${py(r[y]).toFixed(1)}`).join(" "), fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2 }));
    for (const r of points) {
      const dot = svg("circle", { cx: px(String(r[x])).toFixed(1), cy: py(r[y]).toFixed(1), r: 3, fill: COLORS[i % COLORS.length], "data-x": String(r[x]), "data-series": name, "data-value": r[y] });
      dot.append(svg("title", {}, `${name} ${r[x]}: ${shown(panel, y, r[y])}`));
      root.append(dot);
    }
  });
  root.append(svg("text", { x: L, y: H - 4 }, xs[0]));
  root.append(svg("text", { x: W - 8, y: H - 4, "text-anchor": "end" }, xs[xs.length - 1]));
}

function drawNumber(box, panel) {
  const value = panel.rows.length ? panel.rows[0][panel.y] : null;
  const big = document.createElement("div");
  big.className = "big";
  big.dataset.value = value ?? "";
  big.textContent = shown(panel, panel.y, value);
  box.replaceChildren(big);
}

function drawTable(box, panel) {
  const columns = panel.columns.length ? panel.columns : Object.keys(panel.rows[0] || {});
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c;
    head.append(th);
  }
  table.createTHead().append(head);
  const body = table.createTBody();
  for (const r of panel.rows) {
    const tr = document.createElement("tr");
    for (const c of columns) {
      const td = document.createElement("td");
      td.textContent = shown(panel, c, r[c]);
      td.dataset.column = c;
      td.dataset.value = r[c] ?? "";
      if (typeof r[c] === "number") td.className = "num";
      tr.append(td);
    }
    body.append(tr);
  }
  if (!panel.rows.length) return empty(box, "nothing yet");
  box.replaceChildren(table);
}

// The domains' panels, declared with their read models.
function drawPanels(panels, now) {
  const group = $("domain");
  group.hidden = !panels.length;
  const ids = panels.map((p) => `${p.read_model}/${p.query}/${p.title}`);
  for (const section of [...group.children]) if (!ids.includes(section.dataset.panel)) section.remove();
  panels.forEach((panel, i) => {
    let section = [...group.children].find((s) => s.dataset.panel === ids[i]);
    if (!section) {
      section = document.createElement("section");
      const wide = panel.chart === "stacked_bars_per_day" || panel.chart === "line";
      section.className = wide ? "panel wide" : "panel";
      section.dataset.panel = ids[i];
      section.dataset.chart = panel.chart;
      const h2 = document.createElement("h2");
      h2.textContent = panel.title;
      const box = document.createElement("div");
      box.className = "chart";
      section.append(h2, box);
      group.append(section);
    }
    const box = section.querySelector(".chart");
    if (panel.error) return empty(box, `cannot be read: ${panel.error}`);
    ({
      number: () => drawNumber(box, panel),
      table: () => drawTable(box, panel),
      bar: () => drawBars(box, panel),
      stacked_bars_per_day: () => drawStacked(box, panel, now),
      line: () => drawLine(box, panel),
    }[panel.chart] || (() => empty(box, `no chart ${panel.chart}`)))();
  });
}

function fillTable(id, rows, cells) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    for (const [text, cls, data] of cells(r)) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      for (const [k, v] of Object.entries(data || {})) td.dataset[k] = v;
      tr.append(td);
    }
    return tr;
  }));
}

function render(data) {
  $("events-total").textContent = count(data.head_position);
  $("events-total").dataset.value = data.head_position;
  const events = data.events;
  $("streams-total").textContent = count(events.streams);
  $("streams-total").dataset.value = events.streams;
  // On a large store the counts catch up over a few answers.
  $("counted").textContent = events.counted_to < data.head_position ? `counting… ${count(events.counted_to)}` : "";
  fillTable("categories", events.categories, (c) => [
    [c.category, "", { category: c.category }], [count(c.streams), "num", { streams: c.streams }], [count(c.events), "num", { events: c.events }],
  ]);
  fillTable("event-types", events.event_types, (t) => [
    [t.event_type, "", { type: t.event_type }], [count(t.events), "num", { events: t.events }],
  ]);
  $("append-rate").textContent = count(Math.round(data.append_rate.events_per_second));
  const outbox = data.outbox;
  $("outbox-backlog").textContent = outbox ? count(outbox.backlog) : "off";
  $("outbox-backlog").dataset.value = outbox ? outbox.backlog : "";
  $("outbox-oldest").textContent = outbox ? outbox.oldest_age_s.toFixed(1) : "–";
  $("parked-total").textContent = count(data.parked_total);
  $("parked-total").dataset.value = data.parked_total;
  drawRate(data.append_rate.series);
  drawPanels(data.panels || [], new Date(data.generated_at));
  $("notice").hidden = !data.read_models_error;
  $("notice").textContent = data.read_models_error ? `The read models cannot be read: ${data.read_models_error}` : "";
  $("projections-empty").hidden = data.projections.length > 0;
  const relays = outbox ? outbox.relays : [];
  $("relays-empty").hidden = relays.length > 0;
  $("relays-empty").textContent = outbox ? "no relay is running" : "this server has no outbox";
  fillTable("relays", relays, (r) => [
    [r.relay, "", { relay: r.relay }], [count(r.lanes), "num", { lanes: r.lanes }], [new Date(r.seen_at).toLocaleTimeString()],
  ]);
  fillTable("projections", data.projections, (p) => [
    [p.name, "", { projection: p.name }], [p.state, `state-${p.state}`],
    [p.active_version ?? "–", "num"], [count(p.checkpoint), "num"],
    [count(p.lag_events), "num", { lag: p.lag_events }], [p.lag_seconds.toFixed(1), "num"],
    [count(p.parked), "num", { parked: p.parked }],
    [p.rebuild ? `v${p.rebuild.version} ${p.rebuild.state} ${p.rebuild.done}/${p.rebuild.total}` : ""],
  ]);
  $("updated").textContent = new Date().toLocaleTimeString();
  document.body.dataset.loaded = "true";
}

let token = sessionStorage.getItem("factline-token") || "";

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("factline-token", token);
  $("login").hidden = true;
  poll();
});

async function poll() {
  const status = $("status");
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch("/dashboard/data", { headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      status.textContent = "this server needs a token with admin scope";
      status.className = "status error";
      $("login").hidden = false;
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    status.textContent = "live";
    status.className = "status";
  } catch (err) {
    status.textContent = `not reachable (${err.message}); retrying`;
    status.className = "status error";
  }
  setTimeout(poll, POLL_MS);
}

poll();
