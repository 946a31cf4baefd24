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

function drawRevenue(rows, now) {
  const box = $("chart-revenue");
  const legend = $("revenue-legend");
  if (!rows.length) {
    legend.replaceChildren();
    return empty(box, "no paid orders yet");
  }
  const days = [...new Set([...lastDays(now, 14), ...rows.map((r) => r.day)])].sort();
  const regions = [...new Set(rows.map((r) => r.region))].sort();
  const color = (region) => COLORS[regions.indexOf(region) % COLORS.length];
  const totals = days.map((d) => rows.filter((r) => r.day === d).reduce((s, r) => s + Math.max(0, r.net_cents), 0));
  if (Math.max(...totals) <= 0) {
    legend.replaceChildren();
    return empty(box, "no paid orders yet");
  }
  const W = 900, H = 260, L = 70, B = 24, T = 10;
  const root = canvas(box, W, H);
  const max = niceMax(Math.max(...totals) / 100) * 100;
  const slot = (W - L - 8) / days.length;
  const bar = Math.min(60, slot * 0.7);
  const y = (cents) => T + (1 - cents / max) * (H - T - B);
  for (const v of [0, max / 2, max]) {
    root.append(svg("line", { x1: L, x2: W - 8, y1: y(v), y2: y(v), stroke: "#e3e6ec" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, euros(v)));
  }
  days.forEach((day, i) => {
    const cx = L + slot * i + slot / 2;
    let base = 0;
    for (const region of regions) {
      const row = rows.find((r) => r.day === day && r.region === region);
      if (!row) continue;
      const h = Math.max(0, row.net_cents);
      const rect = svg("rect", {
        x: (cx - bar / 2).toFixed(1), width: bar.toFixed(1),
        y: y(base + h).toFixed(1), height: (y(base) - y(base + h)).toFixed(1),
        fill: color(region), "data-day": day, "data-region": region, "data-cents": row.net_cents,
      });
      rect.append(svg("title", {}, `${region} ${day}: ${euros(row.net_cents)} EUR`));
      root.append(rect);
      base += h;
    }
    root.append(svg("text", { x: cx, y: H - 6, "text-anchor": "middle" }, day.slice(5)));
  });
  legend.replaceChildren(...regions.map((region) => {
    const total = rows.filter((r) => r.region === region).reduce((s, r) => s + r.net_cents, 0);
    const item = document.createElement("span");
    item.dataset.region = region;
    item.dataset.cents = total;
    item.innerHTML = `<i style="background:${color(region)}"></i>`;
    item.append(`${region} ${euros(total)}`);
    return item;
  }));
}

function drawStatuses(rows) {
  const box = $("chart-status");
  if (!rows.length) return empty(box, "no orders yet");
  const W = 420, row = 28, L = 90, H = rows.length * row + 6;
  const root = canvas(box, W, H);
  const max = Math.max(...rows.map((r) => r.orders), 1);
  rows.forEach((r, i) => {
    const y = 4 + i * row;
    const w = ((W - L - 60) * r.orders) / max;
    root.append(svg("text", { x: L - 8, y: y + 16, "text-anchor": "end" }, r.status));
    root.append(svg("rect", { x: L, y, width: w.toFixed(1), height: row - 8, rx: 3, fill: COLORS[i % COLORS.length], "data-status": r.status, "data-count": r.orders }));
    root.append(svg("text", { x: L + w + 6, y: y + 16, class: "value-label" }, count(r.orders)));
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
  const models = data.read_models;
  $("domain").hidden = !models;
  if (models) {
    drawRevenue(models.revenue_by_region_day, new Date(data.generated_at));
    drawStatuses(models.orders_by_status);
    fillTable("top-customers", models.top_customers, (c) => [
      [c.customer_id, "", { customer: c.customer_id }], [c.name], [euros(c.net_cents), "num", { cents: c.net_cents }],
    ]);
  }
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
