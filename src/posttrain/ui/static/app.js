// posttrain ui: the dashboard page. Plain browser JavaScript, no build step; charts by Chart.js (vendored).
// Everything shown from the server goes through textContent (never innerHTML): run names, answers and comments
// are data, not markup. Reports are shown in a sandboxed frame (no scripts, no same-origin access).
"use strict";

const state = {
  key: sessionStorage.getItem("posttrain-key") || "",
  role: null, actions: false, poll: 2000,
  runs: [], selected: null, overlay: new Set(),
  series: {},           // run id -> {offset, rows}
  extra: [],            // metric keys the user added charts for
  charts: {},           // chart id -> Chart
  loop: null, fbOffset: 0, fbLimit: 50, timer: null, tab: "runs",
};

// Charts of a training run, shown when any shown run logged one of their keys.
const GROUPS = [
  { id: "loss", title: "Loss", keys: ["train/loss", "eval/loss"] },
  { id: "lr", title: "Learning rate", keys: ["train/lr"] },
  { id: "throughput", title: "Throughput (trained tokens or pairs / s)", keys: ["train/units_per_s"] },
  { id: "rewards", title: "Implicit rewards: chosen / rejected", keys: ["train/rewards/chosen", "train/rewards/rejected"] },
  { id: "margins", title: "Reward margin", keys: ["train/rewards/margins", "train/margin", "eval/margin"] },
  { id: "accuracy", title: "Accuracy", keys: ["train/rewards/accuracy", "eval/rewards/accuracy", "train/accuracy", "eval/accuracy"] },
  { id: "reward", title: "Reward (train / held-out)", keys: ["train/reward", "train/heldout/reward", "eval/reward"] },
  { id: "kl", title: "KL to the reference", keys: ["train/kl"] },
  { id: "length", title: "Completion length (tokens)", keys: ["train/length/mean"] },
  { id: "entropy", title: "Entropy", keys: ["train/entropy"] },
  { id: "guards", title: "Guard trips (warnings and stops so far)", keys: ["train/guards/fired"] },
];
const COLORS = ["#2f6fed", "#e8590c", "#12805c", "#9c36b5", "#c92a2a", "#0b7285", "#5c940d", "#862e9c", "#495057"];
const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3]];

// ---------------------------------------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const $ = (sel) => document.querySelector(sel);
function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}
function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
function ago(t) { return t ? duration(Date.now() / 1000 - t) + " ago" : ""; }
function when(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }
function badge(text) { return el("span", { class: "badge " + String(text).replace(/\s+/g, "-") }, text); }
function notice(text, ok = false) {
  const n = $("#notice");
  n.textContent = text || "";
  n.className = ok ? "ok" : "";
  n.hidden = !text;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const message = (body && body.error && body.error.message) || `HTTP ${r.status}`;
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return body;
}

// ---------------------------------------------------------------------------------------------- charts
function chartOf(canvas, title, yLabel, xType = "linear") {
  const existing = Chart.getChart(canvas);
  if (existing) return existing;
  return new Chart(canvas, {
    type: "line",
    data: { datasets: [] },
    options: {
      animation: false, parsing: false, normalized: true, responsive: true, maintainAspectRatio: false,
      interaction: { mode: "nearest", intersect: false },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 14, font: { size: 11 } } },
                 title: { display: !!title, text: title } },
      scales: {
        x: xType === "time"
          ? { type: "linear", ticks: { maxTicksLimit: 8, callback: (v) => new Date(v * 1000).toLocaleString([], {
                month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }) } }
          : { type: "linear", title: { display: true, text: "step" } },
        y: { title: { display: !!yLabel, text: yLabel } },
      },
      elements: { point: { radius: 0, hitRadius: 6 }, line: { borderWidth: 1.6 } },
    },
  });
}

function shownRuns() {
  const ids = [];
  if (state.selected) ids.push(state.selected);
  for (const id of state.overlay) if (!ids.includes(id)) ids.push(id);
  return ids.filter((id) => state.runs.some((r) => r.id === id && r.kind === "train"));
}

function keysOf(ids) {
  const keys = new Set();
  for (const id of ids) for (const row of (state.series[id] || { rows: [] }).rows)
    for (const k of Object.keys(row)) if (k !== "step") keys.add(k);
  return keys;
}

function renderCharts() {
  const ids = shownRuns();
  const present = keysOf(ids);
  const groups = GROUPS.filter((g) => g.keys.some((k) => present.has(k)));
  for (const k of state.extra) if (present.has(k)) groups.push({ id: "extra:" + k, title: k, keys: [k] });
  const box = $("#charts");
  const wanted = new Set(groups.map((g) => g.id));
  for (const [id, chart] of Object.entries(state.charts)) {
    if (!wanted.has(id)) { chart.destroy(); delete state.charts[id]; box.querySelector(`[data-card="${CSS.escape(id)}"]`)?.remove(); }
  }
  for (const g of groups) {
    let card = box.querySelector(`[data-card="${CSS.escape(g.id)}"]`);
    if (!card) {
      card = el("div", { class: "chart-card", "data-card": g.id }, el("h3", {}, g.title),
                el("div", { class: "chart-box" }, el("canvas", { "data-chart": g.id })));
      box.append(card);
    }
    const chart = state.charts[g.id] || (state.charts[g.id] = chartOf(card.querySelector("canvas"), "", ""));
    const datasets = [];
    ids.forEach((id, i) => {
      const rows = (state.series[id] || { rows: [] }).rows;
      g.keys.filter((k) => present.has(k)).forEach((k, j) => {
        const data = [];
        for (const row of rows) if (typeof row[k] === "number") data.push({ x: row.step, y: row[k] });
        if (!data.length) return;
        const label = (ids.length > 1 ? id + " " : "") + k;
        const isEval = k.startsWith("eval/");
        datasets.push({ label, data, borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length],
                        borderDash: DASHES[j % DASHES.length], pointRadius: isEval || data.length < 30 ? 2.5 : 0,
                        "run": id, "key": k });
      });
    });
    chart.data.datasets = datasets;
    chart.update("none");
  }
  // the "add a chart" list: every numeric key not charted yet
  const select = $("#extra-metric");
  const charted = new Set(groups.flatMap((g) => g.keys));
  const options = [...present].filter((k) => !charted.has(k)).sort();
  const current = [...select.options].slice(1).map((o) => o.value).join("|");
  if (current !== options.join("|")) {
    select.replaceChildren(select.options[0], ...options.map((k) => el("option", { value: k }, k)));
  }
}

// ---------------------------------------------------------------------------------------------- runs
async function fetchMetrics(id) {
  const s = state.series[id] || (state.series[id] = { offset: 0, rows: [] });
  for (let i = 0; i < 50; i++) {  // follow until caught up (each answer is at most a few MB)
    const m = await api(`/api/runs/metrics?id=${encodeURIComponent(id)}&offset=${s.offset}`);
    if (m.reset) s.rows = [];
    s.rows.push(...m.rows);
    s.offset = m.offset;
    if (!m.more) break;
  }
}

function runRow(r) {
  const progress = r.kind === "train" && r.total_steps
    ? el("span", {}, el("span", { class: "bar", title: `${r.step} of ${r.total_steps} steps` },
                        el("span", { style: `width:${Math.min(100, (100 * r.step) / r.total_steps).toFixed(1)}%` })),
         ` ${r.step}/${r.total_steps}`)
    : r.kind === "train" ? `${r.step || 0} steps` : (r.stages ? r.stages.join(" → ") : "");
  const last = r.last || {};
  const tick = el("input", { type: "checkbox", "aria-label": "compare " + r.id, checked: state.overlay.has(r.id),
                             disabled: r.kind !== "train",
                             onclick: (e) => { e.stopPropagation();
                               e.target.checked ? state.overlay.add(r.id) : state.overlay.delete(r.id); refreshRuns(); } });
  return el("tr", { class: "selectable" + (r.id === state.selected ? " selected" : ""), "data-run": r.id,
                    onclick: () => selectRun(r.id) },
    el("td", {}, tick), el("td", {}, r.id), el("td", {}, r.stage || r.kind), el("td", {}, badge(r.status)),
    el("td", {}, progress), el("td", {}, r.status === "running" ? duration(r.eta_s) : ""),
    el("td", { class: "num" }, fmt(last["train/loss"])), el("td", { class: "num" }, fmt(last["train/units_per_s"], 3)),
    el("td", { title: when(r.updated) }, ago(r.updated)));
}

function renderRunDetail() {
  const r = state.runs.find((x) => x.id === state.selected);
  $("#run-detail").hidden = !r;
  if (!r) return;
  $("#run-title").textContent = r.id;
  const meta = [r.kind === "train" ? r.stage : r.kind, r.method, r.model, r.status,
                r.status === "running" && r.eta_s !== null ? "ETA " + duration(r.eta_s) : null,
                r.reason ? "stopped: " + r.reason : null].filter(Boolean);
  $("#run-meta").textContent = meta.join(" · ");
  $("#run-report").hidden = !r.report || r.kind !== "train";
  // a pipeline, comparison or audit is its report: shown in place (sandboxed like the Reports tab)
  const inline = $("#run-inline-report");
  if (r.kind !== "train" && r.report) {
    if (inline.dataset.run !== r.id || inline.dataset.updated !== String(r.updated)) {
      inline.dataset.run = r.id; inline.dataset.updated = String(r.updated);
      reportHTML(r.id).then((html) => { inline.srcdoc = html; }).catch(showError);
    }
    inline.hidden = false;
  } else {
    inline.hidden = true;
  }
  const last = r.last || {};
  $("#run-last").replaceChildren(...Object.keys(last).sort().map((k) => el("span", {}, el("b", {}, k), " ", fmt(last[k]))));
}

async function refreshRuns() {
  const data = await api("/api/runs");
  state.runs = data.runs.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  $("#runs-root").textContent = data.root;
  if (!state.selected && state.runs.length) {  // the newest running training run, else the newest training run
    const train = state.runs.filter((r) => r.kind === "train");
    state.selected = (train.find((r) => r.status === "running") || train[0] || state.runs[0]).id;
  }
  $("#runs-table tbody").replaceChildren(...state.runs.map(runRow));
  renderRunDetail();
  for (const id of shownRuns()) await fetchMetrics(id);
  renderCharts();
  renderReportList();
}

function selectRun(id) {
  state.selected = id;
  refreshRuns().catch(showError);
}

// ---------------------------------------------------------------------------------------------- reports
function renderReportList() {
  const list = $("#report-list");
  const withReports = state.runs.filter((r) => r.report);
  list.replaceChildren(...withReports.map((r) => el("li", { "data-report": r.id, class: r.id === state.report ? "selected" : "",
    onclick: () => showReport(r.id) }, badge(r.kind === "train" ? r.stage : r.kind), " ", r.id)));
  if (!withReports.length) list.replaceChildren(el("li", { class: "muted" }, "no reports under this root yet"));
}

async function reportHTML(id) {
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  const r = await fetch(`/api/runs/report?id=${encodeURIComponent(id)}`, { headers });
  if (!r.ok) {
    const err = new Error(`report of ${id}: HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return r.text();
}

async function showReport(id) {
  state.report = id;
  if (location.hash !== "#reports") location.hash = "#reports";
  try {
    $("#report-frame").srcdoc = await reportHTML(id);
    $("#report-title").textContent = id;
  } catch (e) {
    $("#report-frame").srcdoc = "";
    $("#report-title").textContent = e.message;
  }
  renderReportList();
}

// ---------------------------------------------------------------------------------------------- the loop
function gateList(reasons) {
  return el("ul", { class: "reasons" }, ...(reasons || []).map((t) =>
    el("li", { class: t.startsWith("FAIL") ? "fail" : t.startsWith("pass") ? "pass" : "" }, t)));
}

function metricsTable(metrics) {
  if (!metrics || !Object.keys(metrics).length) return null;
  const sides = Object.keys(metrics).filter((k) => metrics[k] && typeof metrics[k] === "object");
  if (!sides.length) return el("div", { class: "kv small" }, ...Object.entries(metrics).map(([k, v]) => el("span", {}, el("b", {}, k), " ", fmt(v))));
  const keys = [...new Set(sides.flatMap((s) => Object.keys(metrics[s])))].sort();
  return el("table", { class: "grid small" }, el("thead", {}, el("tr", {}, el("th", {}, "metric"), ...sides.map((s) => el("th", {}, s)))),
    el("tbody", {}, ...keys.map((k) => el("tr", {}, el("td", {}, k), ...sides.map((s) => el("td", { class: "num" }, fmt(metrics[s][k])))))));
}

function versionCard(v, loop) {
  const serving = v.id === loop.serving;
  const pending = loop.pending && loop.pending.version === v.id;
  const buttons = [];
  if (state.actions && state.role === "admin" && v.servable && !serving && !pending) {
    const action = v.status === "approved" || v.status === "candidate" ? "promote" : "rollback";
    buttons.push(el("button", { class: "primary", "data-action": action, "data-version": v.id,
      onclick: () => confirmServe(v.id, action) }, action === "promote" ? "Promote" : "Roll back to " + v.id));
  }
  const data = Object.entries(v.data || {}).map(([name, h]) => el("span", { title: h }, `${name} ${String(h).slice(0, 12)}`));
  return el("div", { class: "version" + (serving ? " is-serving" : "") + (v.status === "rejected" ? " is-rejected" : ""),
                     "data-version": v.id },
    el("div", { class: "head" }, el("b", {}, v.id), badge(v.status), pending ? badge("pending") : null,
       el("span", { class: "muted" }, v.parent ? `from ${v.parent}` : "initial"),
       el("span", { class: "muted", title: when(v.created) }, when(v.created)),
       v.override ? el("span", { class: "badge pending" }, "override: " + v.override) : null,
       el("span", { class: "actions" }, ...buttons)),
    v.note ? el("div", { class: "muted small" }, v.note) : null,
    data.length ? el("div", { class: "kv small muted" }, "data: ", ...data) : null,
    gateList(v.reasons), metricsTable(v.metrics));
}

async function refreshLoop() {
  const loop = await api("/api/loop");
  state.loop = loop;
  $("#loop-empty").hidden = loop.configured;
  $("#loop-body").hidden = !loop.configured;
  if (!loop.configured) {
    $("#loop-empty").textContent = "No loop registry: start the dashboard with --loop LOOP.yaml (or --registry DIR).";
    return;
  }
  const cards = [el("div", { class: "card", "data-served": loop.served_model },
    el("div", { class: "muted" }, `registry: ${loop.served_model}`), el("div", { class: "big" }, loop.serving || "none"),
    loop.pending ? el("div", { class: "muted" }, `pending ${loop.pending.event}: ${loop.pending.version}`) : null)];
  if (loop.server && loop.server.models) {
    for (const m of loop.server.models)
      cards.push(el("div", { class: "card", "data-server-model": m.id }, el("div", { class: "muted" }, `server: ${m.id}`),
                    el("div", { class: "big" }, m.version || "base")));
  } else if (loop.server && loop.server.error) {
    cards.push(el("div", { class: "card" }, el("div", { class: "muted" }, "server"), el("div", {}, loop.server.error)));
  } else if (!loop.server_url) {
    cards.push(el("div", { class: "card muted" }, "no server_url: the registry alone"));
  }
  $("#serving").replaceChildren(...cards);
  $("#timeline").replaceChildren(...[...loop.versions].reverse().map((v) => versionCard(v, loop)));
  if (loop.message) $("#timeline").replaceChildren(el("p", { class: "muted" }, loop.message));
  $("#audit tbody").replaceChildren(...[...loop.audit].reverse().map((e) => {
    const { time, event, version, ...rest } = e;
    const details = Object.entries(rest).filter(([k]) => k !== "metrics")
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("; ");
    return el("tr", {}, el("td", {}, time), el("td", {}, event), el("td", {}, version || ""), el("td", { class: "text small" }, details));
  }));
}

function confirmServe(version, action) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = action === "promote" ? `Promote ${version}?` : `Roll back to ${version}?`;
  $("#confirm-text").textContent = `The registry records it, then the server at ${state.loop.server_url || "(none)"} switches ` +
    `${state.loop.served_model} to ${version} without a restart.`;
  $("#confirm-reason").value = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      const r = await api("/api/loop/serve", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ version, reason: $("#confirm-reason").value }) });
      notice(r.message, true);
    } catch (e) { notice(e.message); }
    refreshLoop().catch(showError);
  };
  dialog.showModal();
}

// ---------------------------------------------------------------------------------------------- feedback
function valueText(item) {
  if (item.kind === "preference") return "preferred over: " + (item.other_response || "");
  if (item.kind === "correction") return "corrected to: " + item.value;
  return String(item.value);
}

async function refreshFeedbackSummary() {
  let s;
  try { s = await api("/api/feedback/summary"); } catch (e) {
    if (e.status !== 404) throw e;
    $("#feedback-empty").hidden = false; $("#feedback-body").hidden = true;
    $("#feedback-empty").textContent = e.message;
    return false;
  }
  $("#feedback-empty").hidden = true; $("#feedback-body").hidden = false;
  $("#fb-versions tbody").replaceChildren(...s.versions.map((v) => el("tr", { "data-fb-version": v.version },
    el("td", {}, v.version), el("td", { class: "num" }, v.total), el("td", { class: "num" }, v.thumbs_up),
    el("td", { class: "num" }, v.thumbs_down),
    el("td", { class: "num" }, Object.entries(v.ratings).map(([r, n]) => `${r}: ${n}`).join(", ")),
    el("td", { class: "num" }, v.preference), el("td", { class: "num" }, v.correction),
    el("td", { class: "num" }, v.satisfaction === null ? "" : v.satisfaction.toFixed(3)))));
  const form = $("#fb-filters");
  const fill = (select, values) => {
    const keep = select.value;
    select.replaceChildren(select.options[0], ...values.map((x) => el("option", { value: x }, x)));
    select.value = keep;
  };
  fill(form.elements.kind, s.kinds);
  fill(form.elements.version, s.versions.map((v) => v.version));
  const canvas = document.querySelector('canvas[data-chart="satisfaction"]');
  const chart = state.charts.satisfaction || (state.charts.satisfaction = chartOf(canvas, "", "satisfaction", "time"));
  chart.data.datasets = Object.entries(s.trend.series).map(([version, points], i) => ({
    label: version, data: points.map((p) => ({ x: p.t, y: p.satisfaction })), borderColor: COLORS[i % COLORS.length],
    backgroundColor: COLORS[i % COLORS.length], pointRadius: 3 }));
  chart.options.scales.y.min = 0; chart.options.scales.y.max = 1;
  const times = Object.values(s.trend.series).flat().map((p) => p.t);
  if (times.length) {  // one bucket either side, so that a single bucket is not drawn on a range of years
    chart.options.scales.x.min = Math.min(...times) - s.trend.bucket_s;
    chart.options.scales.x.max = Math.max(...times) + s.trend.bucket_s;
  }
  chart.update("none");
  return true;
}

async function refreshFeedback() {
  if (!(await refreshFeedbackSummary())) return;
  const form = $("#fb-filters");
  const params = new URLSearchParams();
  for (const name of ["kind", "version", "since", "until"]) if (form.elements[name].value) params.set(name, form.elements[name].value);
  params.set("limit", state.fbLimit); params.set("offset", state.fbOffset);
  const page = await api("/api/feedback?" + params);
  const first = page.total ? state.fbOffset + 1 : 0;
  $("#fb-count").textContent = `${first}-${state.fbOffset + page.items.length} of ${page.total} items`;
  $("#fb-prev").disabled = state.fbOffset === 0;
  $("#fb-next").disabled = state.fbOffset + page.items.length >= page.total;
  $("#fb-table tbody").replaceChildren(...page.items.map((i) => el("tr", { "data-feedback": i.id },
    el("td", { title: when(i.created) }, when(i.created)), el("td", {}, i.version), el("td", {}, i.kind),
    el("td", { class: "text" }, valueText(i)), el("td", { class: "text" }, i.prompt), el("td", { class: "text" }, i.response),
    el("td", { class: "text" }, i.comment || ""))));
}

// ---------------------------------------------------------------------------------------------- shell
function showError(e) {
  if (e && e.status === 401) notice("This dashboard needs a key: type an API or admin key above.");
  else notice(e && e.message ? e.message : String(e));
}

async function refresh() {
  try {
    if (state.tab === "runs" || state.tab === "reports") await refreshRuns();
    else if (state.tab === "loop") await refreshLoop();
    else if (state.tab === "feedback") await refreshFeedback();
  } catch (e) { showError(e); }
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    const live = state.tab !== "runs" || $("#runs-live").checked;
    if (live && !document.hidden && !$("#confirm").open) await refresh();
    schedule();
  }, state.poll);
}

function showTab() {
  state.tab = (location.hash || "#runs").slice(1);
  if (!["runs", "reports", "loop", "feedback"].includes(state.tab)) state.tab = "runs";
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== "tab-" + state.tab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === state.tab);
  refresh();
}

async function whoami() {
  try {
    const me = await api("/api/whoami");
    state.role = me.role; state.actions = me.actions; state.poll = Math.max(200, me.poll_s * 1000);
    $("#role").textContent = me.role + (me.actions && me.role === "admin" ? " (can act)" : "");
    $("#role").className = "badge " + me.role;
    notice("");
    return true;
  } catch (e) {
    state.role = null;
    $("#role").textContent = "no access";
    $("#role").className = "badge rejected";
    showError(e);
    return false;
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#key").value = state.key;
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.key = $("#key").value.trim();
    sessionStorage.setItem("posttrain-key", state.key);
    if (await whoami()) showTab();
  });
  $("#run-report").addEventListener("click", () => showReport(state.selected));
  $("#extra-metric").addEventListener("change", (e) => {
    if (e.target.value && !state.extra.includes(e.target.value)) state.extra.push(e.target.value);
    e.target.value = "";
    renderCharts();
  });
  $("#fb-filters").addEventListener("submit", (e) => { e.preventDefault(); state.fbOffset = 0; refreshFeedback().catch(showError); });
  $("#fb-prev").addEventListener("click", () => { state.fbOffset = Math.max(0, state.fbOffset - state.fbLimit); refreshFeedback().catch(showError); });
  $("#fb-next").addEventListener("click", () => { state.fbOffset += state.fbLimit; refreshFeedback().catch(showError); });
  window.addEventListener("hashchange", showTab);
  await whoami();
  showTab();
  schedule();
});
