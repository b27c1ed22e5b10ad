// GPU Scout dashboard: reads the REST API every 2 s and redraws.
// Vanilla JS, no build step. Every value from the API is put in the page as
// text (never as HTML), since job names and commands come from users.
"use strict";

const API = "/api/v1";
const REFRESH_MS = 2000;
const state = { selected: null, token: localStorage.getItem("gpuscout.token") || "" };

const $ = (sel) => document.querySelector(sel);

// el("td", {class: "num"}, "text", childNode, ...)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

class Unauthorized extends Error {}

async function get(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${response.status} ${JSON.stringify(detail)}`);
  }
  return response.json();
}

// --- formatting ------------------------------------------------------------------

function money(value) {
  if (value === null || value === undefined) return "-";
  return Math.abs(value) < 1 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
}
const percent = (v) => (v === null || v === undefined ? "-" : `${Math.round(v * 100)}%`);
const orDash = (v) => (v === null || v === undefined || v === "" ? "-" : v);
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "-");

function badge(status) {
  return el("span", { class: `badge s-${status}` }, status);
}

function progressBar(job) {
  const { step, total_steps: total } = job.progress;
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  return el("div", { class: "progress", title: total ? `${pct.toFixed(1)}%` : "" },
    el("div", { class: "bar" }, el("div", { class: "fill", style: `width:${pct}%` })),
    el("span", { class: "steps" }, total ? `${step} / ${total}` : String(step)));
}

function offerLabel(id) {
  // provider:zone:type:capacity -> "type capacity (zone)"; the demo's own
  // offers (provider "demo") -> "type capacity (zone, demo)"
  if (!id) return "-";
  const parts = id.split(":");
  const where = parts[0] === "demo" ? `${parts[1]}, demo` : parts[1];
  return parts.length === 4 ? `${parts[2]} ${parts[3]} (${where})` : id;
}

function fillBody(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows);
}

// --- sections ------------------------------------------------------------------------

function renderSummary(jobs) {
  const live = jobs.filter((j) => !["completed", "failed", "cancelled"].includes(j.status));
  const cost = jobs.reduce((sum, j) => sum + j.cost_usd, 0);
  const savings = jobs.reduce((sum, j) => sum + j.savings_usd, 0);
  const card = (label, value) => el("div", { class: "card" },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  $("#summary").replaceChildren(
    card("Jobs", `${jobs.length}`), card("Live", `${live.length}`),
    card("Cost so far", money(cost)), card("Saved", money(savings)));
}

function renderJobs(jobs) {
  fillBody($("#jobs"), jobs.map((job) => el("tr", {
    class: job.id === state.selected ? "selected" : "",
    "data-job-id": job.id,
    onclick: () => select(job.id),
  },
    el("td", {}, el("div", { class: "name" }, job.name), el("div", { class: "id" }, job.id)),
    el("td", {}, badge(job.status)),
    el("td", {}, progressBar(job)),
    el("td", { class: "num" }, money(job.cost_usd)),
    el("td", { class: "num saved" }, money(job.savings_usd)),
    el("td", { title: orDash(job.offer_id) }, offerLabel(job.offer_id)),
  )));
  $("#jobs-empty").hidden = jobs.length > 0;
}

function renderJob(job, migrations, events, decisions) {
  $("#job").hidden = false;
  $("#job-title").replaceChildren(el("span", {}, job.name), " ", badge(job.status));
  const details = [
    ["Id", job.id],
    ["Offer", orDash(job.offer_id)],
    ["Instance", orDash(job.instance_id)],
    ["Step", `${job.progress.step}${job.progress.total_steps ? " / " + job.progress.total_steps : ""}`],
    ["Loss", job.progress.loss === null ? "-" : job.progress.loss.toPrecision(6)],
    ["Cost", `${money(job.cost_usd)} (saved ${money(job.savings_usd)})`],
    ["Budget", money(job.spec.budget_usd)],
    ["Endpoint", el("a", { href: job.endpoint }, job.endpoint)],
    ["Command", el("code", {}, job.spec.command)],
    ["Started", time(job.started_at)],
  ];
  if (job.error) details.push(["Error", el("span", { class: "err" }, job.error)]);
  $("#job-details").replaceChildren(...details.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

  const d = decisions[decisions.length - 1];
  // The reason already names the best other offer and the saving.
  $("#job-decision").replaceChildren(d
    ? el("span", { class: d.move ? "move" : "" }, `Scout: ${d.move ? "move" : "stay"} — ${d.reason}`)
    : el("span", { class: "muted" }, "Scout: no decision yet"));

  fillBody($("#migrations"), migrations.slice().reverse().map((m) => el("tr", {},
    el("td", {}, time(m.started_at)),
    el("td", {}, m.reason),
    el("td", {}, badge(m.status), m.status === "in_progress" ? ` ${m.phase}` : "",
      m.error ? el("div", { class: "err" }, m.error) : null),
    el("td", {}, offerLabel(m.from_offer_id), el("span", { class: "arrow" }, " → "), offerLabel(m.to_offer_id)),
    el("td", { class: "num" }, percent(m.expected_savings)),
    el("td", { class: "num" }, orDash(m.checkpoint_step)),
    el("td", { class: "num" }, orDash(m.resume_step)),
    el("td", { class: "num" }, m.downtime_s === null ? "-" : `${m.downtime_s.toFixed(2)} s`),
  )));
  $("#migrations-empty").hidden = migrations.length > 0;

  $("#events").replaceChildren(...events.slice().reverse().map((e) => el("li", {},
    el("time", {}, time(e.time)), el("span", { class: "kind" }, e.kind),
    el("span", {}, e.message))));
}

function renderOffers(offers, jobs) {
  // Cheapest per unit of work first, the unavailable ones last; offers that
  // live jobs run on are tagged.
  const inUse = new Set(jobs.filter((j) => j.offer_id && !["completed", "failed", "cancelled"].includes(j.status))
    .map((j) => j.offer_id));
  const sorted = offers.slice().sort((a, b) =>
    (b.available - a.available) || (a.cost_per_work_hour - b.cost_per_work_hour) || a.id.localeCompare(b.id));
  fillBody($("#offers"), sorted.map((o) => el("tr", { class: o.available ? "" : "unavailable" },
    el("td", { title: o.id }, o.instance_type, inUse.has(o.id) ? el("span", { class: "in-use" }, "in use") : null),
    el("td", {}, o.capacity),
    el("td", {}, o.provider === "demo" ? `${o.zone} (demo)` : o.zone),
    el("td", {}, o.gpus ? `${o.gpus} × ${o.gpu_type}` : "0"),
    el("td", { class: "num" }, o.price_per_hour.toFixed(4)),
    el("td", { class: "num" }, o.cost_per_work_hour.toFixed(4)),
    el("td", {}, o.available ? el("span", { class: "yes" }, "yes") : el("span", { class: "no" }, "no")),
  )));
}

// --- refresh loop ----------------------------------------------------------------------

function select(jobId) {
  state.selected = jobId;
  history.replaceState(null, "", `#job=${encodeURIComponent(jobId)}`);
  refresh();
}

async function refresh() {
  try {
    const [health, jobs, offers] = await Promise.all([
      get("/healthz"), get(`${API}/jobs`), get(`${API}/offers`)]);
    $("#market").textContent = `market: ${health.market} · scout every ${health.scout_interval_s} s · threshold ${percent(health.savings_threshold)}`;
    renderSummary(jobs.data);
    if (!state.selected && jobs.data.length) state.selected = jobs.data[jobs.data.length - 1].id;
    renderJobs(jobs.data);
    renderOffers(offers.data, jobs.data);
    if (state.selected && jobs.data.some((j) => j.id === state.selected)) {
      const id = encodeURIComponent(state.selected);
      const [job, migrations, events, decisions] = await Promise.all([
        get(`${API}/jobs/${id}`), get(`${API}/jobs/${id}/migrations`),
        get(`${API}/jobs/${id}/events?limit=30`), get(`${API}/jobs/${id}/decisions`)]);
      renderJob(job, migrations.data, events.data, decisions.data);
    } else {
      $("#job").hidden = true;
    }
    $("#auth").hidden = true;
    $("#error").hidden = true;
    $("#refresh").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error instanceof Unauthorized) {
      $("#auth").hidden = false;
    } else {
      $("#error").hidden = false;
      $("#error").textContent = `Cannot read the API: ${error.message}`;
    }
  }
}

$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("#auth-token").value.trim();
  localStorage.setItem("gpuscout.token", state.token);
  refresh();
});

const fromHash = /^#job=(.+)$/.exec(location.hash);
if (fromHash) state.selected = decodeURIComponent(fromHash[1]);
refresh();
setInterval(refresh, REFRESH_MS);
