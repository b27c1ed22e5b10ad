// GPU Scout dashboard. Vanilla JS, no build step; charts by uPlot (installed
// by npm from the Makefile into ./vendor).
//
// Data: the REST API once per (re)connection, then the live stream
// (GET /api/v1/stream, server-sent events) pushes what changes: jobs,
// migrations, events, offers, the scout's decisions and history samples.
// Pages: #/ (jobs), #/jobs/ID, #/market, #/submit, #/signin.
//
// Every value from the API is put in the page as text (never as HTML):
// job names and commands come from users.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "gpuscout.token";
const LIVE = ["pending", "scouting", "provisioning", "running", "migrating", "recovering"];
const TERMINAL = ["completed", "failed", "cancelled"];

const state = {
  token: localStorage.getItem(TOKEN_KEY) || "",
  health: null,
  jobs: new Map(),
  offers: new Map(),
  decisions: new Map(),
  view: { name: "jobs", id: null },
  page: null, // the open job page: {id, migrations, events, instances, history, ...}
  stream: null,
  loading: false,
  buffered: [],
  dirty: new Set(),
  frame: 0,
};

const $ = (sel) => document.querySelector(sel);

// el("td", {class: "num"}, "text", childNode, ...)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// --- the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail !== undefined ? body.detail : body;
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) tokenRefused(error);
    throw error;
  }
  return data;
}
const get = (path) => api("GET", path);

function tokenRefused(error) {
  const wrong = /wrong/.test(error.message);
  showError(wrong
    ? "The API token is wrong. Sign in again with the token from $GPUSCOUT_HOME/api_token."
    : `This needs the API token: ${error.message}. Sign in first.`, "#/signin");
}

function showError(message, link) {
  const box = $("#error");
  box.replaceChildren(message, link ? " " : "", link ? el("a", { href: link }, "Sign in") : "");
  box.hidden = false;
}
function clearError() { $("#error").hidden = true; }

// --- formatting ---------------------------------------------------------------------

const isNum = (v) => typeof v === "number" && Number.isFinite(v);
function money(v) {
  if (!isNum(v)) return "-";
  const sign = v < 0 ? "-" : "";
  const a = Math.abs(v);
  return `${sign}$${a < 1 ? a.toFixed(4) : a.toFixed(2)}`;
}
const rate = (v) => (isNum(v) ? `$${v.toFixed(4)}` : "-");
const percent = (v) => (isNum(v) ? `${Math.round(v * 100)}%` : "-");
const orDash = (v) => (v === null || v === undefined || v === "" ? "-" : v);
const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "-");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
function seconds(s) {
  if (!isNum(s)) return "-";
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}
const between = (a, b) => (a && b ? (new Date(b) - new Date(a)) / 1000 : null);

function badge(status) { return el("span", { class: `badge s-${status}` }, status); }

function placement(offer, offerId) {
  if (offer) {
    const where = offer.provider === "demo" ? `${offer.zone}, demo` : offer.zone;
    return `${offer.instance_type} ${offer.capacity} (${where})`;
  }
  if (!offerId) return "-";
  const parts = offerId.split(":"); // provider:zone:type:capacity
  return parts.length === 4 ? `${parts[2]} ${parts[3]} (${parts[1]})` : offerId;
}

// The money view of a job: its offer's price, the work left, projected total.
function figures(job) {
  const offer = state.offers.get(job.offer_id);
  const live = !TERMINAL.includes(job.status);
  const { step, total_steps: total } = job.progress;
  const done = total ? Math.min(1, step / total) : null;
  const hours = job.spec.expected_duration_hours;
  let workLeftH = null;
  if (!live) workLeftH = 0;
  else if (done !== null) workLeftH = hours * (1 - done);
  else if (job.started_at) workLeftH = Math.max(0, hours - (Date.now() - new Date(job.started_at)) / 3.6e6);
  else workLeftH = hours;
  const perWorkH = offer ? offer.cost_per_work_hour : null;
  const projected = workLeftH === 0 ? job.cost_usd
    : (perWorkH !== null && workLeftH !== null ? job.cost_usd + workLeftH * perWorkH : null);
  const eta = live && offer && workLeftH !== null
    ? new Date(Date.now() + (workLeftH / offer.relative_speed) * 3.6e6) : null;
  const deadline = job.spec.deadline ? new Date(job.spec.deadline) : null;
  return {
    offer, live, done, workLeftH, projected, eta, deadline,
    perHour: offer ? offer.price_per_hour : null, perWorkH,
    overBudget: isNum(job.spec.budget_usd) && isNum(projected) && projected > job.spec.budget_usd,
    late: Boolean(eta && deadline && eta > deadline),
  };
}

// --- rendering, batched per animation frame ------------------------------------------

function invalidate(...what) {
  for (const w of what) state.dirty.add(w);
  if (!state.frame) state.frame = requestAnimationFrame(flush);
}

function flush() {
  state.frame = 0;
  const dirty = state.dirty;
  state.dirty = new Set();
  const view = state.view.name;
  if (view === "jobs" && (dirty.has("jobs") || dirty.has("offers"))) renderJobs();
  if (view === "job" && state.page) {
    if (dirty.has("jobs") || dirty.has("offers") || dirty.has("decisions")) renderJobHead();
    if (dirty.has("timeline")) renderTimeline();
    if (dirty.has("history") || dirty.has("timeline")) renderJobCharts();
  }
  if (view === "market" && (dirty.has("offers") || dirty.has("jobs"))) renderMarket();
  if (view === "market" && dirty.has("offer-history")) renderOfferChart();
  if (dirty.has("health")) renderHealth();
}

function renderHealth() {
  const h = state.health;
  if (!h) return;
  $("#market-line").textContent = `market: ${h.market}${h.manual_market && h.market !== "manual" ? " (manual changes on)" : ""} · ` +
    `provider: ${h.provider} · scout every ${h.scout_interval_s} s · ` +
    `moves at ${percent(h.savings_threshold)} cheaper per work hour`;
}

// --- jobs list ----------------------------------------------------------------------------

const rows = new Map(); // job id -> {tr, sig}
let shownOrder = "";

function jobRow(job) {
  const f = figures(job);
  const { step, total_steps: total } = job.progress;
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  const budget = job.spec.budget_usd;
  return [
    el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "name" }, job.name),
      el("div", { class: "id" }, job.id)),
    el("td", {}, badge(job.status)),
    el("td", { class: "placement" }, placement(f.offer, job.offer_id)),
    el("td", { class: "num" }, f.live ? rate(f.perHour) : "-"),
    el("td", { class: "num" }, f.live ? rate(f.perWorkH) : "-"),
    el("td", {}, el("div", { class: "progress", title: total ? `${pct.toFixed(1)}%` : "" },
      el("div", { class: "bar" }, el("div", { class: "fill", style: `width:${pct}%` })),
      el("span", { class: "steps" }, total ? `${step} / ${total}` : String(step)))),
    el("td", { class: "num cost" }, money(job.cost_usd)),
    el("td", { class: `num${f.overBudget ? " over" : ""}` }, money(f.projected),
      isNum(budget) ? ` / ${money(budget)}` : "",
      f.late ? el("div", { class: "over small" }, "misses deadline") : null),
    el("td", { class: "num saved" }, money(job.savings_usd)),
  ];
}

function rowSig(job) {
  const o = state.offers.get(job.offer_id);
  return [job.status, job.offer_id, job.progress.step, job.progress.total_steps, job.cost_usd,
    job.savings_usd, o ? o.price_per_hour : null, o ? o.available : null,
    TERMINAL.includes(job.status) ? 0 : Math.floor(Date.now() / 60000)].join("|");
}

function filteredJobs() {
  const filter = $("#status-filter").value;
  const all = [...state.jobs.values()];
  const shown = all.filter((j) => !filter || (filter === "live" ? LIVE.includes(j.status) : j.status === filter));
  shown.sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
  return { all, shown };
}

function renderJobs() {
  const { all, shown } = filteredJobs();
  const body = $("#jobs tbody");
  for (const job of shown) {
    let row = rows.get(job.id);
    const sig = rowSig(job);
    if (!row) {
      row = { tr: el("tr", { "data-job-id": job.id }), sig: null };
      rows.set(job.id, row);
    }
    if (row.sig !== sig) {
      row.tr.replaceChildren(...jobRow(job));
      row.tr.dataset.status = job.status;
      row.sig = sig;
    }
  }
  const order = shown.map((j) => j.id).join(",");
  if (order !== shownOrder) {
    body.replaceChildren(...shown.map((j) => rows.get(j.id).tr));
    shownOrder = order;
  }
  $("#jobs-empty").hidden = shown.length > 0;
  $("#jobs-count").textContent = `${shown.length} of ${all.length}`;
  renderSummary(all);
}

function renderSummary(jobs) {
  const live = jobs.filter((j) => LIVE.includes(j.status));
  const cost = jobs.reduce((sum, j) => sum + j.cost_usd, 0);
  const savings = jobs.reduce((sum, j) => sum + j.savings_usd, 0);
  const perHour = live.reduce((sum, j) => sum + (figures(j).perHour || 0), 0);
  const card = (label, value) => el("div", { class: "card" },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  $("#summary").replaceChildren(card("Jobs", `${jobs.length}`), card("Live", `${live.length}`),
    card("Spending now", `${rate(perHour)}/h`), card("Cost so far", money(cost)),
    card("Saved", money(savings)));
}

// --- one job ---------------------------------------------------------------------------------

async function openJob(id) {
  closeJob();
  const page = {
    id, migrations: new Map(), events: [], instances: [], history: [], charts: {},
    logAbort: null, artifactsFor: null,
  };
  state.page = page;
  $("#job-title").textContent = "";
  $("#timeline").replaceChildren();
  $("#log").textContent = "";
  $("#artifacts").replaceChildren();
  $("#cancel-confirm").hidden = true;
  $("#action-message").hidden = true;
  await loadJob(page);
}

function closeJob() {
  const page = state.page;
  if (!page) return;
  if (page.logAbort) page.logAbort.abort();
  for (const chart of Object.values(page.charts)) chart.destroy();
  state.page = null;
}

async function loadJob(page) {
  const id = encodeURIComponent(page.id);
  try {
    const [job, migrations, events, instances, decisions, history] = await Promise.all([
      get(`/jobs/${id}`), get(`/jobs/${id}/migrations`), get(`/jobs/${id}/events?limit=500`),
      get(`/instances?job_id=${id}`), get(`/jobs/${id}/decisions`), get(`/jobs/${id}/history`)]);
    if (state.page !== page) return;
    state.jobs.set(job.id, job);
    page.migrations = new Map(migrations.data.map((m) => [m.id, m]));
    page.events = events.data;
    page.instances = instances.data;
    page.history = history.data;
    for (const d of decisions.data) state.decisions.set(d.job_id, d);
    invalidate("jobs", "timeline", "history");
    loadArtifacts(page);
    followLog(page);
  } catch (error) {
    if (error.status === 404) showError(`No job ${page.id}.`);
    else if (error.status !== 401) showError(`Cannot read job ${page.id}: ${error.message}`);
  }
}

function renderJobHead() {
  const page = state.page;
  const job = state.jobs.get(page.id);
  if (!job) return;
  const f = figures(job);
  $("#job-title").replaceChildren(el("span", {}, job.name), " ", badge(job.status));
  $("#migrate-open").hidden = job.status !== "running";
  $("#cancel-open").hidden = !f.live;
  if (!f.live) $("#cancel-confirm").hidden = true;
  const budget = job.spec.budget_usd;
  const card = (label, value, cls) => el("div", { class: `card ${cls || ""}` },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  const { step, total_steps: total, loss } = job.progress;
  $("#job-cards").replaceChildren(
    card("Placement", placement(f.offer, job.offer_id)),
    card("$/h · $/work-h", f.live ? `${rate(f.perHour)} · ${rate(f.perWorkH)}` : "-"),
    card("Progress", `${step}${total ? ` / ${total}` : ""}${isNum(loss) ? ` · loss ${loss.toPrecision(4)}` : ""}`),
    card("Cost so far", money(job.cost_usd)),
    card("Projected / budget", `${money(f.projected)}${isNum(budget) ? ` / ${money(budget)}` : ""}`,
      f.overBudget ? "over" : ""),
    card(f.deadline ? "Finish · deadline" : "Finish",
      f.live ? `${f.eta ? f.eta.toLocaleString() : "-"}${f.deadline ? ` · ${f.deadline.toLocaleString()}` : ""}`
        : when(job.finished_at), f.late ? "over" : ""),
    card("Saved vs first offer", money(job.savings_usd)),
  );
  // The scout's decision only while it applies (a live job).
  // A decision taken for another offer than the job's (before its latest
  // move) no longer applies.
  const taken = state.decisions.get(job.id);
  const d = taken && (taken.trigger === "placement" ? !job.offer_id || taken.target_offer_id === job.offer_id
    : taken.current_offer_id === job.offer_id) ? taken : null;
  const box = $("#job-decision");
  if (!f.live || !d) {
    box.replaceChildren(f.live ? el("span", { class: "muted" },
      taken ? "Scout: no decision since the job's latest move" : "Scout: no decision yet") : "");
  } else {
    const numbers = [
      ["now", rate(d.current_cost_per_work_hour), "/work-h"], ["target", rate(d.target_cost_per_work_hour), "/work-h"],
      ["saving", percent(d.savings), ""], ["threshold", percent(d.threshold), ""],
      ["work left", isNum(d.remaining_work_hours) ? `${d.remaining_work_hours.toFixed(3)} h` : "-", ""],
      ["expected saving", money(d.expected_saving_usd), ""], ["move cost", money(d.move_cost_usd), ""],
      ["budget left", money(d.budget_left_usd), ""], ["deadline slack", seconds(d.deadline_slack_s), ""],
    ].filter(([, v]) => v !== "-");
    box.replaceChildren(
      el("strong", { class: d.move ? "move" : "" }, `Scout (${d.trigger}): ${d.move ? "move" : "stay"}`),
      ` — ${d.reason}`, d.decided_at ? el("span", { class: "muted small" }, ` at ${clock(d.decided_at)}`) : "",
      el("div", { class: "numbers small" }, ...numbers.map(([k, v, u]) => el("span", {}, `${k} ${v}${u}`))));
  }
  const details = [
    ["Id", job.id], ["Offer", orDash(job.offer_id)], ["Instance", orDash(job.instance_id)],
    ["Endpoint", el("span", {}, el("a", { href: job.endpoint, target: "_blank", rel: "noopener", id: "endpoint-link" }, job.endpoint),
      el("span", { class: "muted small" }, " the job's own service, on whichever instance it runs; it answers while the job runs"))],
    ["Command", el("code", {}, job.spec.command)],
    ["Resources", `${job.spec.resources.gpus} GPU${job.spec.resources.gpus === 1 ? "" : "s"}` +
      `${job.spec.resources.gpu_type ? ` (${[].concat(job.spec.resources.gpu_type).join(" or ")})` : ""}, ` +
      `${job.spec.resources.cpus} CPUs, ${job.spec.resources.memory_gb} GB`],
    ["Submitted", when(job.created_at)], ["Started", when(job.started_at)],
    ["Restarts", String(job.restarts)],
  ];
  if (job.finished_at) details.push(["Finished", when(job.finished_at)]);
  if (job.error) details.push(["Error", el("span", { class: "err" }, job.error)]);
  $("#job-details").replaceChildren(...details.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  if (page.artifactsFor !== job.status && TERMINAL.includes(job.status)) loadArtifacts(page);
}

// Timeline: placements (instances), each move with its phases, and the
// events that matter (preemption notices, failures, waits), newest first.
const QUIET_EVENTS = new Set(["offer_updated", "scout", "progress"]);
const PHASES = [["started_at", "started"], ["replacement_ready_at", "replacement ready"],
  ["checkpointed_at", "checkpointed"], ["resumed_at", "resumed"], ["switched_at", "switched"],
  ["finished_at", "finished"]];

function renderTimeline() {
  const page = state.page;
  const items = [];
  for (const i of page.instances) {
    items.push({
      t: i.created_at, kind: "placement", node: el("li", { class: "t-placement" },
        el("time", {}, clock(i.created_at)), el("span", { class: "kind" }, "instance"),
        `${i.id} on ${placement(state.offers.get(i.offer_id), i.offer_id)} — ${i.status}`,
        i.terminated_at ? ` (ran ${seconds(between(i.created_at, i.terminated_at))})` : ""),
    });
  }
  for (const m of page.migrations.values()) {
    const phases = [];
    let prev = null;
    for (const [key, label] of PHASES) {
      if (!m[key]) continue;
      const d = prev ? between(prev, m[key]) : null;
      phases.push(el("li", {}, `${label} ${clock(m[key])}`, d !== null ? el("span", { class: "muted" }, ` +${seconds(d)}`) : ""));
      prev = m[key];
    }
    items.push({
      t: m.started_at, kind: "move", node: el("li", { class: `t-move m-${m.status}`, "data-migration-id": m.id },
        el("time", {}, clock(m.started_at)), el("span", { class: "kind" }, `move (${m.reason})`),
        badge(m.status), m.status === "in_progress" ? ` ${m.phase}` : "",
        el("div", {}, placement(state.offers.get(m.from_offer_id), m.from_offer_id), " → ",
          placement(state.offers.get(m.to_offer_id), m.to_offer_id),
          ` · expected saving ${percent(m.expected_savings)}`),
        el("div", { class: "small" }, `checkpoint step ${orDash(m.checkpoint_step)} · resume step ${orDash(m.resume_step)} · ` +
          `downtime ${seconds(m.downtime_s)} · took ${seconds(between(m.started_at, m.finished_at))}`),
        el("ol", { class: "phases" }, ...phases),
        m.error ? el("div", { class: "err" }, m.error) : null),
    });
  }
  for (const e of page.events) {
    if (QUIET_EVENTS.has(e.kind) || e.kind.startsWith("migration")) continue;
    const bad = /fail|error|interrupt|notice|preempt|lost|quota/.test(e.kind);
    items.push({
      t: e.time, kind: e.kind, node: el("li", { class: `t-event${bad ? " t-bad" : ""}` },
        el("time", {}, clock(e.time)), el("span", { class: "kind" }, e.kind), e.message),
    });
  }
  items.sort((a, b) => (a.t < b.t ? 1 : a.t > b.t ? -1 : 0));
  $("#timeline").replaceChildren(...items.map((i) => i.node));
}

// --- charts (uPlot) ----------------------------------------------------------------------

function chartWidth(box) { return Math.max(240, box.clientWidth || 320); }

function drawChart(page, key, box, opts, data) {
  box.dataset.points = String(data[0].length);
  if (!window.uPlot) {
    box.textContent = "Charts need the uPlot library: run `make install`.";
    return;
  }
  const existing = page.charts[key];
  if (existing && existing.series.length === opts.series.length) {
    existing.setData(data);
    return;
  }
  if (existing) existing.destroy();
  box.replaceChildren();
  page.charts[key] = new uPlot({ width: chartWidth(box), height: 200, ...opts }, data, box);
}

// A dashed vertical line where each move switched the job over.
function markMoves(u, page) {
  const ctx = u.ctx;
  ctx.save();
  ctx.strokeStyle = "#6d3fc9";
  ctx.setLineDash([3, 3]);
  ctx.lineWidth = 1;
  for (const m of page.migrations.values()) {
    if (!m.switched_at) continue;
    const x = u.valToPos(new Date(m.switched_at).getTime() / 1000, "x", true);
    if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
    ctx.beginPath();
    ctx.moveTo(x, u.bbox.top);
    ctx.lineTo(x, u.bbox.top + u.bbox.height);
    ctx.stroke();
  }
  ctx.restore();
}

const STEPPED = () => (window.uPlot ? uPlot.paths.stepped({ align: 1 }) : undefined);

function renderJobCharts() {
  const page = state.page;
  const job = state.jobs.get(page.id);
  if (!job) return;
  const h = page.history;
  // Loss over steps (one point per step seen).
  const bySteps = new Map();
  for (const p of h) if (isNum(p.loss)) bySteps.set(p.step, p.loss);
  const steps = [...bySteps.keys()].sort((a, b) => a - b);
  drawChart(page, "loss", $("#chart-loss"), {
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [{ label: "step" }, { label: "loss", stroke: "#2563eb", width: 2 }],
  }, [steps, steps.map((s) => bySteps.get(s))]);

  // $ per work hour, the job's and the best available, over time; the moves marked.
  const t = h.map((p) => p.t);
  const priceBox = $("#chart-price");
  const last = h[h.length - 1];
  priceBox.dataset.last = last && isNum(last.cost_per_work_hour) ? last.cost_per_work_hour.toFixed(4) : "";
  priceBox.dataset.moves = String([...page.migrations.values()].filter((m) => m.status === "completed").length);
  drawChart(page, "price", priceBox, {
    axes: [{}, { label: "$ / work hour" }],
    hooks: { draw: [(u) => markMoves(u, page)] },
    series: [{}, { label: "this job", stroke: "#dc2626", width: 2, paths: STEPPED() },
      { label: "best available", stroke: "#16a34a", dash: [6, 4], width: 2, paths: STEPPED() }],
  }, [t, h.map((p) => p.cost_per_work_hour), h.map((p) => p.best_cost_per_work_hour)]);

  // Cost against the budget.
  const budget = job.spec.budget_usd;
  const costSeries = [{}, { label: "cost", stroke: "#7c3aed", width: 2, fill: "rgba(124,58,237,0.08)" }];
  const costData = [t, h.map((p) => p.cost_usd)];
  if (isNum(budget)) {
    costSeries.push({ label: "budget", stroke: "#9ca3af", dash: [4, 4], width: 1 });
    costData.push(h.map(() => budget));
  }
  drawChart(page, "cost", $("#chart-cost"), { axes: [{}, { label: "USD" }], series: costSeries }, costData);
}

// --- log tail (GET /jobs/{id}/logs?follow=true streams) -------------------------------------

const LOG_LINES = 300;

async function followLog(page) {
  if (page.logAbort) page.logAbort.abort();
  const abort = new AbortController();
  page.logAbort = abort;
  const box = $("#log");
  const lines = [];
  const show = () => {
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    box.textContent = lines.join("\n");
    if (atBottom) box.scrollTop = box.scrollHeight;
  };
  const job = state.jobs.get(page.id);
  const following = job && !TERMINAL.includes(job.status);
  $("#log-state").textContent = following ? "(following)" : "";
  try {
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const url = `${API}/jobs/${encodeURIComponent(page.id)}/logs?tail=${LOG_LINES}${following ? "&follow=true" : ""}`;
    const response = await fetch(url, { headers, signal: abort.signal });
    if (!response.ok) { box.textContent = `(no log: ${response.status})`; return; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const parts = (rest + value).split("\n");
      rest = parts.pop();
      lines.push(...parts);
      if (lines.length > LOG_LINES) lines.splice(0, lines.length - LOG_LINES);
      show();
    }
    if (rest) lines.push(rest);
    if (!lines.length) lines.push("(no output yet)");
    show();
    $("#log-state").textContent = "";
    // A job still live when its log ended (a move, a restart): follow again.
    const now = state.jobs.get(page.id);
    if (state.page === page && !abort.signal.aborted && now && !TERMINAL.includes(now.status)) {
      setTimeout(() => { if (state.page === page && page.logAbort === abort) followLog(page); }, 2000);
    }
  } catch (error) {
    if (error.name !== "AbortError") $("#log-state").textContent = "(log unavailable)";
  }
}

async function loadArtifacts(page) {
  const job = state.jobs.get(page.id);
  page.artifactsFor = job ? job.status : null;
  try {
    const list = await get(`/jobs/${encodeURIComponent(page.id)}/artifacts`);
    if (state.page !== page) return;
    $("#artifacts").replaceChildren(...(list.data.length
      ? list.data.map((a) => el("li", {}, el("a", { href: a.url, download: a.name }, a.name)))
      : [el("li", { class: "muted" }, "none yet")]));
  } catch (_) { /* shown by api() when it matters */ }
}

// --- actions: cancel, migrate --------------------------------------------------------------

let messageTimer = 0;
function actionMessage(text, bad) {
  const box = $("#action-message");
  box.textContent = text;
  box.className = `notice${bad ? " error" : ""}`;
  box.hidden = false;
  clearTimeout(messageTimer);
  // What follows shows on the page (the timeline, the status): a success
  // message goes after a while, an error stays.
  if (!bad) messageTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function cancelJob() {
  const page = state.page;
  $("#cancel-confirm").hidden = true;
  try {
    const job = await api("DELETE", `/jobs/${encodeURIComponent(page.id)}`);
    state.jobs.set(job.id, job);
    invalidate("jobs");
    actionMessage("Cancelled.");
  } catch (error) {
    actionMessage(`Cannot cancel: ${error.message}`, true);
  }
}

async function openMigrate() {
  const page = state.page;
  const dialog = $("#migrate-dialog");
  const box = $("#migrate-targets");
  $("#migrate-error").textContent = "";
  $("#migrate-confirm").disabled = true;
  $("#migrate-confirm").textContent = "Move";
  box.replaceChildren(el("legend", {}, "Target"), el("p", { class: "muted" }, "Weighing the offers…"));
  dialog.showModal();
  try {
    const targets = await get(`/jobs/${encodeURIComponent(page.id)}/targets`);
    $("#migrate-current").textContent = targets.current
      ? `Now on ${placement(targets.current)} at ${rate(targets.current.cost_per_work_hour)} per work hour.` : "";
    if (!targets.data.length) {
      box.replaceChildren(el("legend", {}, "Target"), el("p", {}, targets.reason || "No target."));
      return;
    }
    page.targets = targets.data;
    box.replaceChildren(el("legend", {}, "Target (what it saves or costs over the rest of the job, the move included)"),
      ...targets.data.map((t, i) => {
        const net = t.net_saving_usd;
        const verdict = net >= 0 ? `saves ${money(net)}` : `costs ${money(-net)} more`;
        const warn = [!t.budget_ok && "breaks the budget", !t.deadline_ok && "risks the deadline"].filter(Boolean).join(", ");
        return el("label", { class: `target ${net >= 0 ? "saves" : "dearer"}`, "data-offer-id": t.offer.id },
          el("input", { type: "radio", name: "target", value: String(i) }),
          el("span", { class: "what" }, placement(t.offer)),
          el("span", { class: "num" }, `${rate(t.offer.cost_per_work_hour)}/work-h`),
          el("span", { class: "num" }, t.savings >= 0 ? `${percent(t.savings)} cheaper` : `${percent(-t.savings)} dearer`),
          el("span", { class: "num verdict" }, verdict),
          warn ? el("span", { class: "over small" }, warn) : null);
      }));
  } catch (error) {
    $("#migrate-error").textContent = error.message;
  }
}

async function confirmMigrate() {
  const page = state.page;
  const picked = document.querySelector("#migrate-targets input[name=target]:checked");
  if (!picked || !page.targets) return;
  const target = page.targets[Number(picked.value)];
  $("#migrate-confirm").disabled = true;
  try {
    const m = await api("POST", `/jobs/${encodeURIComponent(page.id)}/migrate`,
      { offer_id: target.offer.id, confirm_dearer: target.savings < 0 });
    page.migrations.set(m.id, m);
    invalidate("timeline");
    $("#migrate-dialog").close();
    actionMessage(`Moving to ${placement(target.offer)}…`);
  } catch (error) {
    $("#migrate-error").textContent = error.message;
    $("#migrate-confirm").disabled = false;
  }
}

// --- market -----------------------------------------------------------------------------------

function fillSelect(select, values) {
  const keep = select.value;
  const have = [...select.options].map((o) => o.value).slice(1).join("|");
  if (have === values.join("|")) return;
  select.replaceChildren(select.options[0], ...values.map((v) => el("option", { value: v }, v)));
  select.value = values.includes(keep) ? keep : "";
}

function renderMarket() {
  const offers = [...state.offers.values()];
  fillSelect($("#f-gpu"), [...new Set(offers.map((o) => o.gpu_type || "none"))].sort());
  fillSelect($("#f-zone"), [...new Set(offers.map((o) => o.zone))].sort());
  const gpu = $("#f-gpu").value, zone = $("#f-zone").value, capacity = $("#f-capacity").value;
  const onlyAvailable = $("#f-available").checked;
  const inUse = new Set([...state.jobs.values()].filter((j) => LIVE.includes(j.status)).map((j) => j.offer_id));
  const shown = offers.filter((o) => (!gpu || (o.gpu_type || "none") === gpu) && (!zone || o.zone === zone)
    && (!capacity || o.capacity === capacity) && (!onlyAvailable || o.available));
  shown.sort((a, b) => (b.available - a.available) || (a.cost_per_work_hour - b.cost_per_work_hour) || a.id.localeCompare(b.id));
  const selected = state.offerHistory && state.offerHistory.id;
  $("#offers tbody").replaceChildren(...shown.map((o) => el("tr", {
    class: `${o.available ? "" : "unavailable"}${o.id === selected ? " selected" : ""}`, "data-offer-id": o.id,
  },
    el("td", { title: o.id }, o.instance_type, inUse.has(o.id) ? el("span", { class: "in-use" }, "in use") : null),
    el("td", {}, o.capacity),
    el("td", {}, o.provider === "demo" ? `${o.zone} (demo)` : o.zone),
    el("td", {}, o.gpus ? `${o.gpus} × ${o.gpu_type}` : "0"),
    el("td", { class: "num" }, o.price_per_hour.toFixed(4)),
    el("td", { class: "num" }, o.cost_per_work_hour.toFixed(4)),
    el("td", {}, o.available ? el("span", { class: "yes" }, "yes") : el("span", { class: "no" }, "no")),
    el("td", { class: "num" }, o.interruptions_per_day ? o.interruptions_per_day.toFixed(1) : "0"),
    el("td", {}, el("button", {
      type: "button", class: "link", "aria-label": `Price history of ${placement(o)}`,
      onclick: () => showOfferHistory(o.id, true),
    }, "history")),
  )));
  if (state.offerHistory) {
    const o = state.offers.get(state.offerHistory.id);
    if (o && state.offerHistory.price !== o.price_per_hour + "/" + o.available) showOfferHistory(o.id);
  }
}

async function showOfferHistory(id, reveal) {
  try {
    const history = await get(`/offers/${encodeURIComponent(id)}/history`);
    const o = history.offer;
    state.offerHistory = { id, data: history.data, price: o.price_per_hour + "/" + o.available };
    $("#offer-history").hidden = false;
    $("#offer-history-title").textContent = `${placement(o)}: price and availability`;
    invalidate("offer-history");
    if (reveal) requestAnimationFrame(() => $("#offer-history").scrollIntoView({ block: "nearest" }));
  } catch (_) { /* shown by api() */ }
}

let offerChart = null;
function renderOfferChart() {
  const h = state.offerHistory;
  if (!h) return;
  // A value holds until the next point: draw stepped, up to now.
  const pts = h.data.map((p) => [new Date(p.t).getTime() / 1000, p.price_per_hour, p.available ? 1 : 0]);
  if (pts.length) pts.push([Date.now() / 1000, pts[pts.length - 1][1], pts[pts.length - 1][2]]);
  const data = [pts.map((p) => p[0]), pts.map((p) => p[1]), pts.map((p) => (p[2] ? p[1] : null))];
  const box = $("#chart-offer");
  box.dataset.points = String(h.data.length);
  if (!window.uPlot) { box.textContent = "Charts need the uPlot library: run `make install`."; return; }
  if (offerChart) offerChart.destroy();
  box.replaceChildren();
  offerChart = new uPlot({
    width: chartWidth(box), height: 200, axes: [{}, { label: "$ / hour" }],
    series: [{}, { label: "price", stroke: "#9ca3af", width: 1, paths: STEPPED() },
      { label: "while available", stroke: "#2563eb", width: 3, paths: STEPPED() }],
  }, data, box);
}

// --- submit ------------------------------------------------------------------------------------

function formBody(form) {
  const body = {};
  const numeric = new Set(["expected_duration_hours", "budget_usd", "dataset_size_gb", "savings_threshold",
    "resources.gpus", "resources.cpus", "resources.memory_gb"]);
  for (const input of form.querySelectorAll("input[name], select[name]")) {
    let value = input.value.trim();
    if (value === "") continue; // the API's default
    if (numeric.has(input.name)) value = Number.isNaN(Number(value)) ? value : Number(value);
    if (input.name === "deadline") value = new Date(value).toISOString();
    if (input.name === "resources.gpu_type" && value.includes(",")) value = value.split(",").map((s) => s.trim());
    const [head, tail] = input.name.split(".");
    if (tail) (body[head] = body[head] || {})[tail] = value;
    else body[head] = value;
  }
  return body;
}

async function submitJob(event) {
  event.preventDefault();
  const form = event.target;
  for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  try {
    const job = await api("POST", "/jobs", formBody(form));
    state.jobs.set(job.id, job);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (error) {
    if (error.status === 422 && Array.isArray(error.body && error.body.detail)) {
      let first = null;
      for (const problem of error.body.detail) {
        const slot = form.querySelector(`[data-error-for="${CSS.escape(problem.field)}"]`) || form.querySelector('[data-error-for="*"]');
        const text = slot.dataset.errorFor === "*" ? `${problem.field}: ${problem.msg}` : problem.msg;
        slot.textContent = slot.textContent ? `${slot.textContent}; ${text}` : text;
        const input = form.querySelector(`[name="${CSS.escape(problem.field)}"]`);
        if (input) {
          input.setAttribute("aria-invalid", "true");
          first = first || input;
        }
      }
      if (first) first.focus();
    } else {
      form.querySelector('[data-error-for="*"]').textContent = error.message;
    }
  }
}

// --- sign in -------------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const token = $("#signin-token").value.trim();
  const message = $("#signin-message");
  try {
    const response = await fetch(`${API}/session`, { headers: { Authorization: `Bearer ${token}` } });
    if (response.status === 401) {
      message.textContent = "That token is wrong: nothing was saved. Copy it from $GPUSCOUT_HOME/api_token.";
      message.className = "error-text";
      return;
    }
    if (!response.ok) throw new Error(`${response.status}`);
    state.token = token;
    localStorage.setItem(TOKEN_KEY, token);
    message.textContent = "Signed in: the token is kept in this browser.";
    message.className = "ok-text";
    clearError();
    renderSignedIn();
    connect();
  } catch (error) {
    message.textContent = `Cannot check the token: ${error.message}`;
    message.className = "error-text";
  }
}

function signOut() {
  state.token = "";
  localStorage.removeItem(TOKEN_KEY);
  streamCookie("");
  $("#signin-message").textContent = "Signed out.";
  $("#signin-message").className = "";
  renderSignedIn();
}

function renderSignedIn() {
  $("#signin-link").textContent = state.token ? "Token ✓" : "Sign in";
}

// --- the live stream ---------------------------------------------------------------------------

function setLive(text, on) {
  const badgeEl = $("#live");
  badgeEl.textContent = text;
  badgeEl.className = `live ${on ? "on" : "off"}`;
}

// The stream's token: EventSource cannot send a header, so a cookie scoped
// to the stream's path (kept out of URLs and so out of access logs).
function streamCookie(token) {
  const path = `path=${API}/stream; SameSite=Strict`;
  document.cookie = token ? `gpuscout_token=${encodeURIComponent(token)}; ${path}`
    : `gpuscout_token=; ${path}; max-age=0`;
}

function connect() {
  if (state.stream) state.stream.close();
  streamCookie(state.token);
  const stream = new EventSource(`${API}/stream`);
  state.stream = stream;
  stream.addEventListener("hello", () => reload());
  for (const kind of ["jobs", "migrations", "events", "offers", "decisions", "samples"]) {
    stream.addEventListener(kind, (e) => {
      const message = { kind, data: JSON.parse(e.data) };
      if (state.loading) state.buffered.push(message);
      else apply(message);
    });
  }
  stream.onopen = () => setLive("live", true);
  stream.onerror = () => {
    setLive("reconnecting…", false);
    // EventSource retries by itself (retry: 1 s) unless the server refused it.
    if (stream.readyState === EventSource.CLOSED && state.stream === stream) {
      // Refused (not just cut): if for the token, wait for a sign-in (which
      // reconnects); else try again.
      get("/jobs?status=running").then(() => {
        setTimeout(() => { if (state.stream === stream) connect(); }, 2000);
      }, (error) => {
        if (error.status === 401) setLive("sign in to follow", false);
        else setTimeout(() => { if (state.stream === stream) connect(); }, 2000);
      });
    }
  };
}

// Everything, once per (re)connection; changes that arrive meanwhile are
// applied after, so none is lost or undone.
async function reload() {
  state.loading = true;
  state.buffered = [];
  try {
    const [health, jobs, offers] = await Promise.all([get("/healthz"), get("/jobs"), get("/offers")]);
    state.health = health;
    state.jobs = new Map(jobs.data.map((j) => [j.id, j]));
    state.offers = new Map(offers.data.map((o) => [o.id, o]));
    rows.clear();
    shownOrder = "";
    clearError();
    if (state.page) await loadJob(state.page);
    setLive("live", true);
  } catch (error) {
    if (error.status !== 401) showError(`Cannot read the API: ${error.message}`);
  } finally {
    state.loading = false;
    const buffered = state.buffered;
    state.buffered = [];
    buffered.forEach(apply);
    invalidate("jobs", "offers", "health", "timeline", "history");
  }
}

// The job's instances (its placements), read again when they change:
// at most one read in flight, and one more after it if asked meanwhile.
function loadInstances(page) {
  if (page.instancesLoading) { page.instancesAgain = true; return; }
  page.instancesLoading = true;
  get(`/instances?job_id=${encodeURIComponent(page.id)}`).then((r) => {
    if (state.page === page) { page.instances = r.data; invalidate("timeline"); }
  }).catch(() => {}).finally(() => {
    page.instancesLoading = false;
    if (page.instancesAgain) { page.instancesAgain = false; setTimeout(() => loadInstances(page), 1000); }
  });
}

function apply({ kind, data }) {
  const page = state.page;
  if (kind === "jobs") {
    let placed = false;
    for (const j of data) {
      const before = state.jobs.get(j.id);
      if (page && j.id === page.id && (!before || before.instance_id !== j.instance_id
          || before.status !== j.status)) placed = true;
      state.jobs.set(j.id, j);
    }
    invalidate("jobs");
    if (placed) loadInstances(page);
  } else if (kind === "offers") {
    for (const o of data) state.offers.set(o.id, o);
    invalidate("offers");
  } else if (kind === "decisions") {
    for (const d of data) state.decisions.set(d.job_id, d);
    invalidate("decisions");
  } else if (page && kind === "migrations") {
    const mine = data.filter((m) => m.job_id === page.id);
    for (const m of mine) page.migrations.set(m.id, m);
    if (mine.length) {
      invalidate("timeline");
      loadInstances(page); // the replacement started, or the old one ended
    }
  } else if (page && kind === "events") {
    // Not those the page read already (the stream may repeat the latest).
    const seen = page.events.length ? page.events[page.events.length - 1].id : 0;
    const mine = data.filter((e) => e.job_id === page.id && e.id > seen);
    if (mine.length) {
      page.events.push(...mine);
      invalidate("timeline");
      loadInstances(page); // events tell of launches and terminations
    }
  } else if (page && kind === "samples") {
    const last = page.history.length ? page.history[page.history.length - 1].t : 0;
    const mine = data.filter((s) => s.job_id === page.id && s.t > last);
    if (mine.length) { page.history.push(...mine); invalidate("history"); }
  }
}

// --- pages ---------------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  let m;
  let view = { name: "jobs", id: null };
  if ((m = /^#\/jobs\/(.+)$/.exec(hash))) view = { name: "job", id: decodeURIComponent(m[1]) };
  else if (/^#job=(.+)$/.test(hash)) view = { name: "job", id: decodeURIComponent(hash.slice(5)) }; // old links
  else if (hash === "#/market") view = { name: "market", id: null };
  else if (hash === "#/submit") view = { name: "submit", id: null };
  else if (hash === "#/signin") view = { name: "signin", id: null };
  state.view = view;
  for (const section of document.querySelectorAll("[data-view]")) section.hidden = section.dataset.view !== view.name;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === view.name || (view.name === "job" && link.dataset.nav === "jobs")) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view.name === "job") {
    if (!state.page || state.page.id !== view.id) openJob(view.id);
  } else {
    closeJob();
  }
  if (view.name === "submit") setTimeout(() => $("#submit-form [name=name]").focus(), 0);
  document.title = `GPU Scout — ${view.name === "job" ? view.id : view.name}`;
  invalidate("jobs", "offers", "health");
}

$("#status-filter").addEventListener("change", () => invalidate("jobs"));
// A click anywhere on a job's row opens it (the name is the keyboard's link).
$("#jobs tbody").addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-job-id]");
  if (row && !event.target.closest("a")) location.hash = `#/jobs/${encodeURIComponent(row.dataset.jobId)}`;
});
for (const id of ["#f-gpu", "#f-zone", "#f-capacity", "#f-available"]) $(id).addEventListener("change", () => invalidate("offers"));
$("#submit-form").addEventListener("submit", submitJob);
$("#signin-form").addEventListener("submit", signIn);
$("#signout").addEventListener("click", signOut);
$("#cancel-open").addEventListener("click", () => { $("#cancel-confirm").hidden = false; $("#cancel-yes").focus(); });
$("#cancel-no").addEventListener("click", () => { $("#cancel-confirm").hidden = true; });
$("#cancel-yes").addEventListener("click", cancelJob);
$("#migrate-open").addEventListener("click", openMigrate);
$("#migrate-close").addEventListener("click", () => $("#migrate-dialog").close());
$("#migrate-confirm").addEventListener("click", confirmMigrate);
$("#migrate-targets").addEventListener("change", () => {
  // A dearer target is confirmed by name, as the API's confirm_dearer and the CLI's --yes.
  const picked = document.querySelector("#migrate-targets input[name=target]:checked");
  const target = picked && state.page && state.page.targets ? state.page.targets[Number(picked.value)] : null;
  const button = $("#migrate-confirm");
  button.disabled = !target;
  button.textContent = target && target.savings < 0
    ? `Move, paying ${percent(-target.savings)} more per work hour` : "Move";
});
window.addEventListener("hashchange", route);
window.addEventListener("resize", () => {
  if (state.page) for (const [key, chart] of Object.entries(state.page.charts)) {
    const box = $(`#chart-${key}`);
    chart.setSize({ width: chartWidth(box), height: 200 });
  }
});

renderSignedIn();
route();
connect();
