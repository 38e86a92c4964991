// The GRPO dashboard: jobs, a job's metric curves (polled with after_step=), its events,
// samples and checkpoints. Plain DOM and SVG; every request carries the user's API key.
"use strict";

const KEY = "grpo_api_key";
const POLL_MS = Number(new URLSearchParams(location.search).get("poll_ms")) || 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const FIRST_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "kl", "loss", "grad_norm", "entropy",
  "clip_ratio", "completion_length", "truncated_ratio", "learning_rate", "tokens_per_second"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);

let job = null; // what is shown: {id, metrics: [], lastStep, lastEvent, generation}
let generation = 0; // bumped on each job switch, so answers about the previous job are dropped

// ---- the API key and requests ----

function takeKeyFromUrl() {
  const params = new URLSearchParams(location.search);
  if (!params.get("key")) return;
  localStorage.setItem(KEY, params.get("key"));
  params.delete("key"); // keep the secret out of the history and of shared links
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
}

function askForKey(message) {
  $("#app").hidden = true;
  $("#key-form").hidden = false;
  $("#change-key").hidden = true;
  $("#key-error").textContent = message || "";
  $("#key-input").focus();
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, init = {}) {
  const key = localStorage.getItem(KEY); // none: a server whose authentication is disabled
  const headers = { ...(init.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const response = await fetch(path, { ...init, headers });
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error.message; } catch { /* not the error shape */ }
  if (response.status === 401) askForKey(key ? message : "");
  throw new ApiError(response.status, message);
}

const getJson = async (path) => (await api(path)).json();

// ---- small DOM helpers ----

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const fmt = (value) => value === null || value === undefined ? "–"
  : Math.abs(value) >= 1000 || (value !== 0 && Math.abs(value) < 0.001) ? value.toExponential(2)
  : String(Math.round(value * 1000) / 1000);

const size = (bytes) => bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB`
  : `${Math.ceil(bytes / 1e3)} kB`;

const text = (value) => typeof value === "string" ? value : JSON.stringify(value);

// ---- the jobs list ----

async function refreshJobs() {
  const page = await getJson("/v1/jobs?limit=50");
  const rows = page.data.map((j) => {
    const row = el("tr", { "data-job": j.id }, compareBox(j),
      el("td", {}, j.name || "", el("br"), el("span", { class: "id" }, j.id)),
      el("td", {}, el("span", { class: `status ${j.status}` }, j.status)),
      el("td", {}, `${j.step} / ${j.max_steps}`),
      el("td", {}, fmt(j.latest_metrics?.reward)));
    if (j.id === job?.id) row.classList.add("selected");
    row.addEventListener("click", () => { location.hash = j.id; });
    return row;
  });
  $("#jobs tbody").replaceChildren(...rows);
  $("#jobs-empty").hidden = rows.length > 0;
}

// ---- one job ----

function showJob(id) {
  generation += 1;
  job = { id, metrics: [], lastStep: 0, lastEvent: 0, generation, checkpointsAt: null };
  $("#job").hidden = !id;
  if (!id) return;
  $("#charts").replaceChildren();
  $("#events").replaceChildren();
  $("#samples tbody").replaceChildren();
  $("#checkpoints").replaceChildren();
  $("#chat-answer").textContent = "";
  $("#chat-about").textContent = "";
  $("#sample-step").replaceChildren(el("option", { value: "" }, "latest"));
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.classList.toggle("selected", row.dataset.job === id);
  pollJob(job);
}

async function pollJob(shown) {
  let ended = false;
  try {
    const info = await getJson(`/v1/jobs/${shown.id}`);
    if (shown.generation !== generation) return;
    renderHeader(info);
    await pollMetrics(shown);
    await pollEvents(shown);
    await refreshSamples(shown);
    const checkpointsAt = `${info.status}:${shown.lastEvent}`;
    if (checkpointsAt !== shown.checkpointsAt) await refreshCheckpoints(shown, checkpointsAt);
    ended = TERMINAL.has(info.status);
  } catch (error) {
    if (!(error instanceof ApiError)) console.error(error);
    $("#job-failure").textContent = String(error.message);
    ended = error.status === 401 || error.status === 404; // another key, or not this owner's job
  }
  if (shown.generation === generation && !ended) setTimeout(() => pollJob(shown), POLL_MS);
}

function renderHeader(info) {
  $("#job-title").textContent = info.name || info.id;
  $("#job-status").textContent = info.status;
  $("#job-status").className = `status ${info.status}`;
  $("#job-step").textContent = `step ${info.step} / ${info.max_steps}` +
    (info.attempts > 1 ? ` · attempt ${info.attempts}` : "") + (info.worker ? ` · ${info.worker}` : "") +
    (info.devices ? ` · ${info.devices.join(", ")}` : "");
  $("#job-step").dataset.step = info.step;
  $("#job-progress").value = info.max_steps ? info.step / info.max_steps : 0;
  $("#job-failure").textContent = info.failure_reason || "";
}

async function pollMetrics(shown) {
  let page;
  do {
    page = await getJson(`/v1/jobs/${shown.id}/metrics?after_step=${shown.lastStep}`);
    if (shown.generation !== generation) return;
    for (const row of page.data) {
      shown.metrics.push(row);
      shown.lastStep = row.step;
    }
  } while (page.has_more && page.data.length);
  renderCharts(shown.metrics);
}

function metricNames(metrics) {
  const names = new Set();
  for (const row of metrics) for (const name of Object.keys(row.metrics)) names.add(name);
  const first = FIRST_METRICS.filter((name) => names.has(name));
  return [...first, ...[...names].filter((name) => !first.includes(name)).sort()];
}

function renderCharts(metrics) {
  const charts = $("#charts");
  for (const name of metricNames(metrics)) {
    const id = "chart-" + name.replace(/[^\w-]/g, "_");
    let chart = document.getElementById(id);
    if (!chart) {
      chart = el("div", { class: name === "reward" ? "chart main" : "chart", id, "data-metric": name },
        el("span", { class: "name" }, name), el("span", { class: "last" }), plot(name));
      charts.append(chart);
    }
    drawLine(chart, metrics.map((row) => [row.step, row.metrics[name]]));
  }
}

// A chart's plot: the SVG (stretched to its box, so its lines keep a fixed width and carry no
// text) inside a frame whose left and bottom edges are the axes; the tick labels and the axis
// titles are HTML beside it, placed in percent of the plot, so they are never stretched.
function plot(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  const grid = document.createElementNS(SVG, "g");
  grid.setAttribute("class", "grid");
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("class", "line");
  svg.append(grid, path);
  return el("div", { class: "plot" }, svg, el("div", { class: "ticks y" }), el("div", { class: "ticks x" }),
    el("span", { class: "title y" }, name), el("span", { class: "title x" }, "step"));
}

// About `count` round values (1, 2 or 5 times a power of ten apart) within [lo, hi], as d3's ticks.
function niceTicks(lo, hi, count, integer = false) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const error = raw / power;
  let step = power * (error >= Math.sqrt(50) ? 10 : error >= Math.sqrt(10) ? 5 : error >= Math.sqrt(2) ? 2 : 1);
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// Tick labels and grid lines: `x(step)` in 0..300 and `y(value)` in 0..100, the SVG's units.
function drawAxes(chart, [first, last], [lo, hi], x, y) {
  const gridLines = [], yLabels = [], xLabels = [];
  for (const value of niceTicks(lo, hi, 4)) {
    const top = y(value);
    const line = document.createElementNS(SVG, "line");
    for (const [name, v] of [["x1", 0], ["x2", 300], ["y1", top], ["y2", top]]) line.setAttribute(name, v.toFixed(1));
    gridLines.push(line);
    const label = el("span", { class: "tick" }, fmt(value));
    label.style.top = `${top.toFixed(1)}%`; // a property, not a style attribute: the page's CSP refuses those
    yLabels.push(label);
  }
  for (const step of niceTicks(first, last, 6, true)) {
    const label = el("span", { class: "tick" }, step);
    label.style.left = `${(x(step) / 3).toFixed(1)}%`;
    xLabels.push(label);
  }
  chart.querySelector(".grid").replaceChildren(...gridLines);
  chart.querySelector(".ticks.y").replaceChildren(...yLabels);
  chart.querySelector(".ticks.x").replaceChildren(...xLabels);
}

// One SVG path over steps. A metric a step did not report (eval/* exists only at checkpoints) is
// skipped and its neighbours joined; a value reported as null (non-finite) breaks the line.
function drawLine(chart, points) {
  const known = points.filter(([, value]) => typeof value === "number");
  const steps = points.map(([step]) => step);
  const [lo, hi] = [Math.min(...known.map((p) => p[1])), Math.max(...known.map((p) => p[1]))];
  const [first, last] = [Math.min(...steps), Math.max(...steps)];
  const x = (step) => last === first ? 150 : ((step - first) / (last - first)) * 300;
  const y = (value) => hi === lo ? 50 : 96 - ((value - lo) / (hi - lo)) * 92;
  let d = "", pen = "M";
  for (const [step, value] of points) {
    if (value === undefined) continue;
    if (typeof value !== "number") { pen = "M"; continue; }
    d += `${pen}${x(step).toFixed(1)},${y(value).toFixed(1)} `;
    pen = "L";
  }
  if (known.length === 1) d += `L${(x(known[0][0]) + 1).toFixed(1)},${y(known[0][1]).toFixed(1)}`; // a visible dot
  chart.querySelector("path").setAttribute("d", d.trim());
  chart.dataset.points = known.length;
  chart.querySelector(".last").textContent = known.length ? fmt(known[known.length - 1][1]) : "–";
  if (known.length) drawAxes(chart, [first, last], [lo, hi], x, y);
}

async function pollEvents(shown) {
  const page = await getJson(`/v1/jobs/${shown.id}/events?after=${shown.lastEvent}&limit=500`);
  if (shown.generation !== generation) return;
  for (const event of page.data) {
    const when = new Date(event.created_at).toLocaleTimeString();
    const number = $("#events").children.length + 1; // its own element: a list marker was clipped past 9
    $("#events").append(el("li", { class: event.level }, el("span", { class: "n" }, number),
      el("span", {}, `${when} · ${event.kind} · ${event.message}`)));
    shown.lastEvent = event.id;
  }
}

async function refreshSamples(shown) {
  const select = $("#sample-step");
  for (let step = select.options.length; step <= shown.lastStep; step++) {
    select.add(el("option", { value: step }, `step ${step}`), 1); // newest first, after "latest"
  }
  let steps = select.value ? [Number(select.value)] : [shown.lastStep, shown.lastStep - 1];
  steps = steps.filter((step) => step >= 1);
  for (const step of steps) {
    const page = await getJson(`/v1/jobs/${shown.id}/samples?step=${step}&limit=100`);
    if (shown.generation !== generation) return;
    if (!page.data.length && step !== steps[steps.length - 1]) continue; // the newest step's are not in yet
    $("#samples tbody").replaceChildren(...page.data.map((s) => el("tr", {},
      el("td", {}, s.step), el("td", { class: "text" }, text(s.prompt)), el("td", { class: "text" }, s.completion),
      el("td", {}, fmt(s.reward)), el("td", {}, fmt(s.advantage)),
      el("td", {}, Object.entries(s.rewards).map(([name, v]) => `${name}: ${fmt(v)}`).join(", ")))));
    return;
  }
}

async function refreshCheckpoints(shown, checkpointsAt) {
  const page = await getJson(`/v1/jobs/${shown.id}/checkpoints`);
  if (shown.generation !== generation) return;
  shown.checkpointsAt = checkpointsAt;
  const best = page.data.find((c) => c.best); // the chat box asks the best checkpoint, else the newest
  shown.chatModel = best ? `${shown.id}:${best.step}` : shown.id;
  $("#chat-target").textContent = best ? `best (step ${best.step})` : "newest";
  $("#checkpoints").replaceChildren(...page.data.map((c) => {
    const button = el("button", { type: "button" }, c.kind === "adapter" ? "adapter" : "download");
    button.addEventListener("click", () => download(c.download_url, `${shown.id}-step-${c.step}.tar`));
    // its figures on the eval set, and the one keep_best_by chose (downloads default to it)
    const evalOrder = (name) => name === "reward" ? 0 : name.startsWith("pass@") ? Number(name.slice(5)) : -1;
    const figures = Object.entries(c.eval || {}).filter(([name]) => evalOrder(name) >= 0)
      .sort(([a], [b]) => evalOrder(a) - evalOrder(b)).map(([name, value]) => `${name} ${fmt(value)}`).join(" · ");
    const item = el("li", c.best ? { class: "best" } : {}, `step ${c.step} · ${c.kind} · ${size(c.bytes)} `,
      ...(figures ? [`· eval ${figures} `] : []), ...(c.best ? [el("strong", {}, "best "), button] : [button]));
    let hint = `grpo jobs download ${shown.id} --step ${c.step}`;
    if (c.merged_download_url) { // a LoRA job's final adapter, merged into its base model
      const merged = el("button", { type: "button", class: "merged" }, "merged model");
      merged.addEventListener("click", () => download(c.merged_download_url, `${shown.id}-step-${c.step}-merged.tar`));
      item.append(" ", merged);
      hint += " [--merged]";
    }
    item.append(el("br"), el("code", { class: "hint" }, hint));
    return item;
  }));
}

// The chat box: a chat completion from the job's best (else newest) checkpoint, greedy.
async function sendChat(event) {
  event.preventDefault();
  const shown = job;
  if (!shown?.id) return;
  $("#chat-answer").textContent = "…";
  $("#chat-about").textContent = "";
  try {
    const body = { model: shown.chatModel || shown.id, temperature: 0,
      messages: [{ role: "user", content: $("#chat-prompt").value }] };
    const answer = await (await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" } })).json();
    if (shown.generation !== generation) return;
    $("#chat-answer").textContent = answer.choices[0].message.content;
    $("#chat-about").textContent = `${answer.model} · ${answer.usage.completion_tokens} tokens · ` +
      `finish: ${answer.choices[0].finish_reason}`;
  } catch (error) {
    if (shown.generation === generation) $("#chat-answer").textContent = `error: ${error.message}`;
  }
}

// A link cannot carry the Authorization header, so the archive is fetched and handed over as a
// blob: fine for small checkpoints; for big ones use the command shown beside the button.
async function download(url, name) {
  const { pathname, search } = new URL(url, location.href); // absolute, as the server saw its address: ask this page's
  const blob = await (await api(pathname + search)).blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

// ---- comparing jobs: one chart, a line per job ticked in the list ----

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const compared = new Map(); // job id -> {id, name, colour, metrics: [], lastStep, loading}

function compareBox(j) {
  const box = el("input", { type: "checkbox", class: "compare", "aria-label": `compare ${j.name || j.id}` });
  box.checked = compared.has(j.id);
  box.addEventListener("click", (event) => event.stopPropagation()); // ticking a job does not open it
  box.addEventListener("change", () => {
    if (box.checked && !compared.has(j.id)) {
      const used = new Set([...compared.values()].map((s) => s.colour));
      const colour = COLOURS.find((c) => !used.has(c)) || COLOURS[compared.size % COLOURS.length];
      compared.set(j.id, { id: j.id, name: j.name || j.id, colour, metrics: [], lastStep: 0, loading: false });
    } else if (!box.checked) {
      compared.delete(j.id);
    }
    refreshCompare().catch((error) => console.error(error));
  });
  return el("td", {}, box);
}

async function refreshCompare() {
  for (const series of [...compared.values()]) {
    if (series.loading) continue; // one poll per job at a time: no step is added twice
    series.loading = true;
    try {
      let page;
      do {
        page = await getJson(`/v1/jobs/${series.id}/metrics?after_step=${series.lastStep}`);
        for (const row of page.data) {
          series.metrics.push(row);
          series.lastStep = row.step;
        }
      } while (page.has_more && page.data.length);
    } finally {
      series.loading = false;
    }
  }
  renderCompare();
}

function renderCompare() {
  $("#compare").hidden = compared.size === 0;
  if (!compared.size) return;
  const all = [...compared.values()];
  const select = $("#compare-metric");
  const names = metricNames(all.flatMap((series) => series.metrics));
  if (select.dataset.names !== names.join("\n")) { // rebuilt only when a metric appears: a choice stays
    const chosen = select.value || "reward";
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    select.dataset.names = names.join("\n");
    select.value = names.includes(chosen) ? chosen : names[0] || "";
  }
  const metric = select.value || "reward";
  const chart = $("#compare-chart");
  if (chart.dataset.metric !== metric || !chart.querySelector(".plot")) {
    chart.dataset.metric = metric;
    chart.replaceChildren(el("span", { class: "name" }, metric), plot(metric));
    chart.querySelector("path.line").remove(); // a path per job instead, below
  }
  const lines = all.map((series) => series.metrics.map((row) => [row.step, row.metrics[metric]])
    .filter(([, value]) => typeof value === "number"));
  const points = lines.flat();
  const svg = chart.querySelector("svg");
  const paths = new Map([...svg.querySelectorAll("path.series")].map((path) => [path.dataset.job, path]));
  for (const [id, path] of paths) if (!compared.has(id)) path.remove();
  if (points.length) {
    const [first, last] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
    const [lo, hi] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
    const x = (step) => last === first ? 150 : ((step - first) / (last - first)) * 300;
    const y = (value) => hi === lo ? 50 : 96 - ((value - lo) / (hi - lo)) * 92;
    all.forEach((series, i) => {
      let path = paths.get(series.id);
      if (!lines[i].length) return path?.remove();
      if (!path) {
        path = document.createElementNS(SVG, "path");
        path.setAttribute("class", "line series");
        path.dataset.job = series.id;
        path.style.stroke = series.colour; // a property: the page's CSP refuses style attributes
        svg.append(path);
      }
      let d = lines[i].map(([step, value], k) => `${k ? "L" : "M"}${x(step).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
      if (lines[i].length === 1) d += ` L${(x(lines[i][0][0]) + 1).toFixed(1)},${y(lines[i][0][1]).toFixed(1)}`;
      path.setAttribute("d", d);
      path.dataset.points = lines[i].length;
    });
    drawAxes(chart, [first, last], [lo, hi], x, y);
  }
  $("#compare-legend").replaceChildren(...all.map((series, i) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = series.colour;
    const latest = lines[i].length ? fmt(lines[i][lines[i].length - 1][1]) : "–";
    return el("li", { "data-job": series.id }, swatch, `${series.name} `, el("span", { class: "id" }, series.id),
      ` · ${metric} ${latest}`);
  }));
}

// ---- start ----

async function start() {
  $("#key-form").hidden = true;
  try {
    await refreshJobs();
  } catch (error) {
    if (!$("#key-form").hidden) return; // a 401: the form asks for another key
    $("#whoami").textContent = error.message;
  }
  $("#app").hidden = false;
  $("#change-key").hidden = false;
  showJob(location.hash.slice(1) || null);
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromUrl();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY, $("#key-input").value.trim());
    $("#key-input").value = "";
    start();
  });
  $("#change-key").addEventListener("click", () => askForKey(""));
  $("#sample-step").addEventListener("change", () => job?.id && refreshSamples(job));
  $("#chat-form").addEventListener("submit", sendChat);
  $("#compare-metric").addEventListener("change", renderCompare);
  window.addEventListener("hashchange", () => showJob(location.hash.slice(1) || null));
  setInterval(() => { if (!$("#app").hidden) refreshJobs().catch(() => {}); }, Math.max(POLL_MS, 5000));
  setInterval(() => { if (!$("#app").hidden && compared.size) refreshCompare().catch(() => {}); }, Math.max(POLL_MS, 2000));
  start();
});
