// The rayft console: one page, no third-party code. Data comes from this app's /console/api/... and /v1/...
// routes with the token from the browser session (sessionStorage; never in a URL). Everything shown is put
// in the page as text nodes (never as HTML), so names, errors and answers cannot inject markup.
"use strict";

const ROOT = document.body.dataset.root || "";
const BASE = ROOT + "/console";
const TOKEN_KEY = "rayft-console-token";
const NAV = [["runs", "Runs"], ["registry", "Registry"], ["search", "Search"], ["compare", "Compare"], ["playground", "Playground"], ["jobs", "Fine-tuning jobs"]];
const COLORS = ["#2f5fd0", "#d9480f", "#2b8a3e", "#9c36b5", "#0b7285", "#e67700", "#c2255c", "#5f3dc4", "#495057"];
let timer = null;   // the live view's refresh, cleared on every navigation
let session = null; // /console/api/session once the token is accepted

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v;  // through the CSSOM: the page's CSP allows no inline style attributes
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function link(path, text, attrs) { return h("a", { href: BASE + path, "data-nav": true, ...(attrs || {}) }, text); }
function fmtNum(v, digits = 4) { return v === null || v === undefined ? "—" : (typeof v === "number" ? Number(v.toFixed(digits)).toString() : String(v)); }
function fmtTime(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, " UTC") : "—"; }
function fmtEta(s) { if (s === null || s === undefined) return "—"; s = Math.round(s); return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`; }
function fmtSize(n) { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return `${i ? n.toFixed(1) : n} ${u[i]}`; }
function badge(state) { return h("span", { class: `badge ${String(state).split(" ")[0]}`, "data-state": state }, state); }
function asOf(data, live) { return h("div", { class: "sub", id: "as-of" }, `data as of ${fmtTime(data.as_of)}` + (live ? " · live: refreshes every 3 s" : "") + (data.storage ? ` · storage ${data.storage}` : "")); }
function empty(...children) { return h("div", { class: "empty" }, ...children); }
function errorBox(err) { return h("div", { class: "error", role: "alert", "data-status": err.status || "" }, err.status ? `${err.status}: ${err.message}` : String(err.message || err)); }
function section(title, ...children) { return [h("h2", {}, title), ...children]; }

class ApiFailure extends Error { constructor(status, message) { super(message); this.status = status; } }

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders(extra) { const t = token(); return { ...(t ? { Authorization: `Bearer ${t}` } : {}), ...(extra || {}) }; }

async function failure(resp) {
  let message = resp.statusText || "request failed";
  try { const body = await resp.json(); message = (body.error && body.error.message) || message; } catch (e) { /* not JSON */ }
  return new ApiFailure(resp.status, message);
}

async function api(path) {
  const resp = await fetch(ROOT + path, { headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) {
    const err = await failure(resp);
    if (resp.status === 401) {
      const sent = token();
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(sent ? err.message : null);  // no token yet: just the sign-in form, not an error
    }
    throw err;
  }
  return resp.json();
}

function setMain(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children.flat(Infinity).filter(c => c !== null && c !== undefined && c !== false));
}

// ---------------------------------------------------------------- charts (inline SVG)

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") el.style.cssText = v; else el.setAttribute(k, v);
  }
  for (const c of children) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function ticks(lo, hi, n) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const nice = [1, 2, 5, 10].map(m => m * step).find(s => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + nice * 1e-9; v += nice) out.push(Number(v.toPrecision(12)));
  return out;
}

// series: [{name, points: [[x, y], ...]}]; one <g data-series=name data-points=N> per series, a circle per point.
function lineChart(series, opts) {
  const W = opts.width || 620, H = opts.height || 280, L = 58, R = 14, T = 26, B = 40;
  const all = series.flatMap(s => s.points);
  const root = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart", "data-chart": opts.id || "" });
  root.append(svg("text", { x: L, y: 16, style: "font-weight:600;fill:#1d2330" }, opts.title || ""));
  if (!all.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.emptyText || "no points yet"));
    return root;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1, 5)) {
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
    root.append(svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, fmtNum(v, 3)));
  }
  for (const v of ticks(x0, x1, 6)) {
    root.append(svg("text", { x: X(v), y: H - B + 16, "text-anchor": "middle" }, fmtNum(v, 2)));
  }
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, opts.xlabel || "step"));
  root.append(svg("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" }, opts.ylabel || ""));
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const g = svg("g", { "data-series": s.name, "data-points": s.points.length });
    const pts = s.points.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    g.append(svg("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 4" : "" }));
    for (const p of s.points) {
      g.append(svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3, fill: color },
        svg("title", {}, `${s.name}: step ${p[0]}, ${fmtNum(p[1])}`)));
    }
    root.append(g);
  });
  return root;
}

function legend(series) {
  return h("div", { class: "legend" }, series.map((s, i) =>
    h("span", {}, h("i", { style: `background:${s.color || COLORS[i % COLORS.length]}` }), `${s.name} (${s.points.length})`)));
}

function chartWithLegend(series, opts) { return h("div", {}, lineChart(series, opts), legend(series)); }

function curve(history, key) { return history.filter(e => typeof e[key] === "number").map(e => [e.step, e[key]]); }

const PREFERENCE_KEYS = ["train_preference_accuracy", "eval_preference_accuracy", "eval_logp_accuracy", "train_reward_margin", "eval_reward_margin"];

function historyCharts(history) {
  const loss = [{ name: "train_loss", points: curve(history, "train_loss") }, { name: "eval_loss", points: curve(history, "eval_loss"), dashed: true }]
    .filter(s => s.points.length);
  const charts = [chartWithLegend(loss, { id: "loss", title: "loss by step", ylabel: "loss", emptyText: "no losses reported yet" })];
  const pref = PREFERENCE_KEYS.map(k => ({ name: k, points: curve(history, k) })).filter(s => s.points.length);
  if (pref.length) charts.push(chartWithLegend(pref, { id: "preference", title: "preference metrics by step", ylabel: "accuracy / margin" }));
  return h("div", { class: "row" }, charts);
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  clearTimeout(timer);
  document.getElementById("who").replaceChildren();
  const input = h("input", { type: "password", id: "token", autocomplete: "current-password", placeholder: "bearer token", style: "width:100%" });
  const form = h("form", { class: "login card", id: "login" },
    h("h1", {}, "Sign in"),
    h("p", { class: "sub" }, "This server needs the API token (the one clients send as Authorization: Bearer). It is kept in this browser tab's session only."),
    message ? h("div", { class: "error", role: "alert" }, message) : null,
    h("p", {}, input),
    h("button", { type: "submit", id: "sign-in" }, "Sign in"));
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    await start();
  });
  setMain(form);
  input.focus();
}

function signOut() { sessionStorage.removeItem(TOKEN_KEY); session = null; showLogin("signed out"); }

async function start() {
  try {
    session = await api("/console/api/session");
  } catch (err) {
    if (err.status === 403) { sessionStorage.removeItem(TOKEN_KEY); showLogin(err.message); }
    else if (err.status !== 401) setMain(h("h1", {}, "rayft console"), errorBox(err));
    return;
  }
  document.getElementById("who").replaceChildren(`${session.base} · ${session.auth ? "signed in" : "no token needed"}`,
    ...(session.auth ? [h("button", { class: "secondary", id: "sign-out", onclick: signOut }, "Sign out")] : []));
  render();
}

// ---------------------------------------------------------------- router

function navigate(path) { history.pushState({}, "", path); render(); }

document.addEventListener("click", ev => {
  const a = ev.target.closest && ev.target.closest("a[data-nav]");
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
  ev.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", () => render());

async function render() {
  clearTimeout(timer);
  if (!session) return start();
  const path = location.pathname.startsWith(BASE) ? location.pathname.slice(BASE.length) : "";
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "runs";
  document.getElementById("nav").replaceChildren(...NAV.map(([p, label]) => link(`/${p}`, label, { class: p === page ? "active" : null })));
  setMain(h("div", { class: "sub" }, "loading…"));
  try {
    if (page === "runs" && parts.length === 1) await runsPage();
    else if (page === "runs" && parts.length === 2) await runPage(parts[1]);
    else if (page === "registry" && parts.length === 1) await registryPage();
    else if (page === "registry" && parts.length === 3) await versionPage(parts[1], parts[2]);
    else if (page === "search" && parts.length === 1) await searchesPage();
    else if (page === "search" && parts.length === 2) await searchPage(parts[1]);
    else if (page === "compare" && parts.length === 1) await comparePage();
    else if (page === "playground" && parts.length === 1) await playgroundPage();
    else if (page === "jobs" && parts.length === 1) await jobsPage();
    else if (page === "jobs" && parts.length === 2) await jobPage(parts[1]);
    else setMain(h("h1", {}, "Not found"), errorBox(new ApiFailure(404, `no console page at ${location.pathname}`)));
  } catch (err) {
    if (err.status === 401) return;
    setMain(h("h1", {}, parts.length > 1 ? parts.slice(1).join(" / ") : page), errorBox(err),
      h("p", {}, link(`/${page}`, `back to ${page}`)));
  }
}

function live(fn, on) { clearTimeout(timer); if (on) timer = setTimeout(fn, 3000); }

// ---------------------------------------------------------------- runs

async function runsPage() {
  const data = await api("/console/api/runs");
  const running = data.runs.some(r => r.state === "running");
  const selected = new Set();
  const compare = h("button", { id: "compare-selected", disabled: true, onclick: () => navigate(`${BASE}/compare?items=${[...selected].map(encodeURIComponent).join(",")}`) }, "Compare selected (2–4)");
  const body = data.runs.length ? h("table", { id: "runs" },
    h("tr", {}, ["", "run", "state", "method", "objective", "base", "steps", "ETA", "train loss", "eval loss", "started", "published"].map(t => h("th", {}, t))),
    data.runs.map(r => h("tr", { "data-run": r.run_id },
      h("td", {}, h("input", { type: "checkbox", "aria-label": `compare ${r.run_id}`, onchange: ev => {
        ev.target.checked ? selected.add(`run:${r.run_id}`) : selected.delete(`run:${r.run_id}`);
        compare.disabled = selected.size < 2 || selected.size > 4;
      } })),
      h("td", { class: "mono" }, link(`/runs/${encodeURIComponent(r.run_id)}`, r.run_id)),
      h("td", {}, badge(r.state)),
      h("td", {}, r.method || "—"), h("td", {}, r.objective || "—"), h("td", { class: "mono" }, r.base || "—"),
      h("td", { class: "num" }, `${r.step ?? "—"} / ${r.max_steps ?? "—"}`),
      h("td", { class: "num" }, r.state === "running" ? fmtEta(r.eta_s) : "—"),
      h("td", { class: "num" }, fmtNum(r.train_loss)), h("td", { class: "num" }, fmtNum(r.eval_loss)),
      h("td", {}, r.started_at ? fmtTime(r.started_at) : r.updated_at ? `${fmtTime(r.updated_at)} (last progress)` : "—"),
      h("td", {}, r.published.map(ref => versionLink(ref))))))
    : empty("No runs yet in ", h("code", {}, data.storage), ". Start one with ", h("code", {}, "rayft train examples/lora.yaml"),
      " (or ", h("code", {}, "rayft submit"), ", or the fine-tuning API); it shows here once its first step is reported.");
  setMain(h("h1", {}, "Runs"), asOf(data, running), body, data.runs.length > 1 ? h("p", {}, compare) : null);
  live(runsPage, running);
}

function versionLink(ref) {
  const [name, version] = ref.split("@");
  return h("div", {}, link(`/registry/${encodeURIComponent(name)}/${version}`, ref, { class: "mono" }));
}

function facts(pairs) {
  return h("div", { class: "facts card" }, pairs.filter(p => p).map(([k, v]) => h("div", { "data-fact": k }, h("span", {}, k), v instanceof Node ? v : (v ?? "—"))));
}

async function runPage(runId) {
  const r = await api(`/console/api/runs/${encodeURIComponent(runId)}`);
  setMain(
    h("h1", { class: "mono" }, r.run_id, " ", badge(r.state)),
    asOf(r, r.state === "running"),
    facts([["method", r.method], ["objective", r.objective], ["base", r.base], ["steps", `${r.step ?? "—"} / ${r.max_steps ?? "—"}`],
      ["ETA", r.state === "running" ? fmtEta(r.eta_s) : "—"], ["last train loss", fmtNum(r.train_loss)], ["last eval loss", fmtNum(r.eval_loss)],
      ["started", fmtTime(r.started_at)], ["finished", fmtTime(r.finished_at)], ["progress written", fmtTime(r.updated_at)],
      ["started by", r.source], ["published", r.published.length ? h("div", {}, r.published.map(versionLink)) : "—"]]),
    r.error ? h("div", { class: "error", id: "run-error", role: "alert" }, r.error) : null,
    r.search_id ? h("p", { class: "card" }, "A trial of the tune search ", link(`/search/${encodeURIComponent(r.search_id)}`, r.search_id, { class: "mono" }),
      ": its state and config are in the search's trials table.") : null,
    r.state === "unknown" ? empty("This run has checkpoints but no run record (written by an older rayft): its state and spec are unknown.") : null,
    section("Curves", r.history.length ? historyCharts(r.history) : empty("No history yet: the first point appears at the first logged step.")),
    section("Checkpoints", r.checkpoints.length
      ? h("table", { id: "checkpoints" }, h("tr", {}, h("th", {}, "step"), h("th", {}, "folder")),
        r.checkpoints.map(s => h("tr", {}, h("td", { class: "num" }, s), h("td", { class: "mono" }, `runs/${r.run_id}/step-${String(s).padStart(8, "0")}/`))))
      : empty("No checkpoint yet.")),
    section("Console log (rank 0, last lines)", r.log_tail.length ? h("pre", { id: "log-tail" }, r.log_tail.join("\n")) : empty("No console lines recorded.")),
    section("Job spec", r.spec ? h("pre", { id: "spec" }, JSON.stringify(r.spec, null, 2)) : empty("No job spec recorded for this run.")),
    Object.keys(r.metrics || {}).length ? section("Final metrics", metricsTable(r.metrics)) : null,
  );
  live(() => runPage(runId), r.state === "running");
}

function flatMetrics(obj, prefix = "") {
  const out = [];
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) out.push(...flatMetrics(v, `${prefix}${k}.`));
    else out.push([`${prefix}${k}`, Array.isArray(v) ? JSON.stringify(v) : v]);
  }
  return out;
}

function metricsTable(metrics) {
  const rows = flatMetrics(metrics);
  return h("table", { class: "metrics" }, rows.map(([k, v]) => h("tr", {}, h("td", { class: "mono" }, k), h("td", { class: "num" }, fmtNum(v)))));
}

// ---------------------------------------------------------------- registry

function madeFrom(v) {
  const parts = [];
  if (v.parents.length) parts.push("merged from ", ...v.parents.flatMap((p, i) => [i ? ", " : "", versionLinkInline(p)]));
  if (v.run_id) parts.push(parts.length ? "; " : "", "run ", link(`/runs/${encodeURIComponent(v.run_id)}`, v.run_id, { class: "mono" }));
  return parts.length ? h("span", { class: "made-from" }, parts) : "—";
}

function versionLinkInline(ref) {
  const [name, version] = ref.split("@");
  return link(`/registry/${encodeURIComponent(name)}/${version}`, ref, { class: "mono" });
}

async function registryPage() {
  const data = await api("/console/api/registry");
  const body = data.names.length ? h("table", { id: "registry" },
    h("tr", {}, ["name", "version", "kind", "method", "base", "size", "eval loss", "made from", "published"].map(t => h("th", {}, t))),
    data.names.flatMap(n => n.versions.slice().reverse().map((v, i) => h("tr", { "data-ref": v.ref },
      h("td", { class: "mono" }, i === 0 ? h("strong", {}, n.name) : ""),
      h("td", {}, versionLinkInline(v.ref)), h("td", {}, v.kind), h("td", {}, v.method || "—"),
      h("td", { class: "mono" }, v.base_model), h("td", { class: "num" }, fmtSize(v.size)),
      h("td", { class: "num" }, fmtNum(v.eval_loss)), h("td", {}, madeFrom(v)), h("td", {}, fmtTime(v.created_at))))))
    : empty("Nothing published yet in ", h("code", {}, data.storage), ": ", h("code", {}, "rayft train examples/lora.yaml"),
      " publishes an adapter, ", h("code", {}, "rayft registry push DIR --name NAME --kind model"), " a model.");
  setMain(h("h1", {}, "Registry"), asOf(data, false), body);
}

function treeNode(node) {
  const bits = [node.missing ? h("span", { class: "mono" }, `${node.ref} (not in the registry)`) : versionLinkInline(node.ref)];
  if (node.kind) bits.push(` · ${node.kind}`);
  if (node.method) bits.push(` · ${node.method}`);
  if (node.combination) bits.push(` · merged with ${node.combination}` + (node.weights ? ` (weights ${node.weights.join(", ")})` : ""));
  if (node.run_id) bits.push(" · run ", link(`/runs/${encodeURIComponent(node.run_id)}`, node.run_id, { class: "mono" }));
  if (node.data) bits.push(" · data ", h("code", {}, node.data));
  if (node.pushed_from) bits.push(" · pushed from ", h("code", {}, node.pushed_from));
  return h("li", { "data-lineage": node.ref }, ...bits, node.parents && node.parents.length ? h("ul", { class: "tree" }, node.parents.map(treeNode)) : null);
}

async function versionPage(name, version) {
  const v = await api(`/console/api/registry/${encodeURIComponent(name)}/${encodeURIComponent(version)}`);
  const evalResults = v.metrics && v.metrics.eval;
  const metrics = Object.fromEntries(Object.entries(v.metrics || {}).filter(([k]) => k !== "eval"));
  setMain(
    h("h1", { class: "mono" }, v.ref), asOf(v, false),
    facts([["kind", v.kind], ["method", v.method], ["base model", v.base_model], ["size", fmtSize(v.total_size)], ["files", v.files.length],
      ["published", fmtTime(v.created_at)], ["location", h("code", {}, v.uri)]]),
    section("Lineage", h("ul", { class: "tree top", id: "lineage" }, treeNode(v.lineage_tree)),
      v.used_by.length ? h("p", {}, "used by: ", v.used_by.map((ref, i) => [i ? ", " : "", versionLinkInline(ref)])) : null),
    v.history ? section("Training curves", historyCharts(v.history)) : null,
    Object.keys(metrics).length ? section("Metrics", metricsTable(metrics)) : null,
    evalResults ? section("Evaluation results", h("pre", { id: "eval" }, JSON.stringify(evalResults, null, 2))) : null,
    section("Files", h("table", { id: "files" }, h("tr", {}, h("th", {}, "path"), h("th", {}, "size"), h("th", {}, "sha256")),
      v.files.map(f => h("tr", {}, h("td", { class: "mono" }, f.path), h("td", { class: "num" }, fmtSize(f.size)), h("td", { class: "mono" }, f.sha256))))),
    section("Manifest", h("pre", { id: "manifest" }, JSON.stringify(Object.fromEntries(Object.entries(v).filter(([k]) =>
      !["as_of", "lineage_tree", "history", "used_by", "ref", "uri", "total_size"].includes(k))), null, 2))),
  );
}

// ---------------------------------------------------------------- search

async function searchesPage() {
  const data = await api("/console/api/searches");
  const body = data.searches.length ? h("table", { id: "searches" },
    h("tr", {}, ["search", "state", "searcher", "trials", "winner", "winner eval loss", "published"].map(t => h("th", {}, t))),
    data.searches.map(s => h("tr", {}, h("td", { class: "mono" }, link(`/search/${encodeURIComponent(s.search_id)}`, s.search_id)),
      h("td", {}, badge(s.state)), h("td", {}, s.searcher || "—"), h("td", { class: "num" }, s.trials ?? "—"),
      h("td", { class: "mono" }, s.winner || "—"), h("td", { class: "num" }, fmtNum(s.best_eval_loss)),
      h("td", {}, (s.published || []).map(versionLink)))))
    : empty("No searches yet in ", h("code", {}, data.storage), ": ", h("code", {}, "rayft tune examples/tune-lora.yaml"), " runs one.");
  setMain(h("h1", {}, "Search"), asOf(data, false), body);
}

const TRIAL_COLUMNS = [["trial_id", "trial"], ["status", "status"], ["method", "method"], ["r", "r"], ["alpha", "alpha"],
  ["target_modules", "targets"], ["lr", "lr"], ["dropout", "dropout"], ["steps", "steps"], ["eval_loss", "eval loss"],
  ["best_eval_loss", "best eval loss"], ["train_loss", "train loss"], ["trainable_params", "params"]];

async function searchPage(searchId) {
  const s = await api(`/console/api/searches/${encodeURIComponent(searchId)}`);
  if (s.state !== "finished") {
    setMain(h("h1", { class: "mono" }, s.search_id, " ", badge(s.state)), asOf(s, true),
      empty("This search has not written its results yet (it is running, or its driver stopped: ",
        h("code", {}, `rayft tune --resume ${s.search_id}`), " finishes it). Its trials' runs so far:"),
      h("ul", {}, s.trial_runs.map(r => h("li", {}, link(`/runs/${encodeURIComponent(r.run_id)}`, r.run_id), " ", badge(r.state), ` step ${r.step ?? "—"}, eval loss ${fmtNum(r.eval_loss)}`))));
    live(() => searchPage(searchId), true);
    return;
  }
  let sortKey = "eval_loss", ascending = true;
  const table = h("table", { id: "trials" });
  function fill() {
    const rows = s.trials.slice().sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    table.replaceChildren(...[
      h("tr", {}, TRIAL_COLUMNS.map(([k, label]) => h("th", { class: "sortable", "data-key": k, "aria-sort": k === sortKey ? (ascending ? "ascending" : "descending") : "none",
        onclick: () => { ascending = sortKey === k ? !ascending : true; sortKey = k; fill(); } }, label))),
      rows.map(t => h("tr", { class: t.trial_id === s.winner ? "winner" : null, "data-trial": t.trial_id },
        TRIAL_COLUMNS.map(([k]) => k === "status" ? h("td", {}, badge(t.status), t.error ? h("div", { class: "sub" }, t.error) : null)
          : k === "trial_id" ? h("td", { class: "mono" }, link(`/runs/${encodeURIComponent(t.train_run_id)}`, t.trial_id))
          : h("td", { class: typeof t[k] === "number" ? "num" : "" }, fmtNum(t[k])))))].flat());
  }
  fill();
  const series = s.trials.filter(t => t.eval_history && t.eval_history.length)
    .map(t => ({ name: t.trial_id, points: t.eval_history, dashed: t.status !== "completed" }));
  const winner = s.trials.find(t => t.trial_id === s.winner);
  setMain(
    h("h1", { class: "mono" }, s.search_id, " ", badge(s.state)), asOf(s, false),
    winner ? h("div", { class: "card", id: "winner" }, h("strong", {}, "Winner: "), h("span", { class: "mono" }, winner.trial_id),
      ` — ${winner.method} r=${winner.r} alpha=${winner.alpha} targets=${winner.target_modules} lr=${winner.lr}, eval loss ${fmtNum(winner.eval_loss)}`,
      s.published && s.published.length ? [" · published as ", s.published.map(versionLinkInline)] : "")
      : h("div", { class: "error" }, "No winner: every trial errored (see the table)."),
    facts([["searcher", s.searcher], ["scheduler", s.scheduler], ["trials", s.trials.length], ["max steps", s.max_steps],
      ["steps run", s.steps_run], ["steps saved by early stopping", s.steps_saved], ["wall time", `${fmtNum(s.wall_s, 1)} s`]]),
    section("Eval loss by step, every trial", chartWithLegend(series, { id: "trials", title: "eval loss by step", ylabel: "eval loss" })),
    section("Trials (click a column to sort)", table));
}

// ---------------------------------------------------------------- compare

async function comparePage() {
  const items = (new URLSearchParams(location.search).get("items") || "").split(",").filter(Boolean);
  if (items.length < 2 || items.length > 4) return compareChooser(items.length ? "pick 2 to 4 runs or versions" : null);
  const loaded = await Promise.all(items.map(async item => {
    const [kind, id] = [item.slice(0, item.indexOf(":")), item.slice(item.indexOf(":") + 1)];
    if (kind === "run") {
      const r = await api(`/console/api/runs/${encodeURIComponent(id)}`);
      return { label: r.run_id, history: r.history, rows: { kind: "run", state: r.state, method: r.method, objective: r.objective, base: r.base,
        steps: r.step, "train loss": r.train_loss, "eval loss": r.eval_loss, published: r.published.join(", ") } };
    }
    const [name, version] = id.split("@");
    const v = await api(`/console/api/registry/${encodeURIComponent(name)}/${encodeURIComponent(version || "")}`);
    const m = v.metrics || {};
    return { label: v.ref, history: v.history || [], rows: { kind: v.kind, state: "published", method: v.method, objective: (v.params && v.params.objective && v.params.objective.name) || "—",
      base: v.base_model, steps: m.step, "train loss": m.train_loss, "eval loss": m.eval_loss, published: v.ref } };
  }));
  const keys = Object.keys(loaded[0].rows);
  const seriesOf = key => loaded.map((l, i) => ({ name: l.label, points: curve(l.history, key), color: COLORS[i] }));
  setMain(h("h1", {}, "Compare"), h("div", { class: "sub", id: "as-of" }, `loaded ${fmtTime(new Date().toISOString())} · `, link("/compare", "choose others")),
    h("div", { class: "row" },
      chartWithLegend(seriesOf("eval_loss"), { id: "compare-eval", title: "eval loss by step", ylabel: "eval loss" }),
      chartWithLegend(seriesOf("train_loss"), { id: "compare-train", title: "train loss by step", ylabel: "train loss" })),
    section("Side by side", h("table", { id: "compare" }, h("tr", {}, h("th", {}, ""), loaded.map(l => h("th", { class: "mono" }, l.label))),
      keys.map(k => h("tr", {}, h("td", {}, k), loaded.map(l => h("td", { class: typeof l.rows[k] === "number" ? "num" : "" }, fmtNum(l.rows[k]))))))));
}

async function compareChooser(message) {
  const [runs, reg] = await Promise.all([api("/console/api/runs"), api("/console/api/registry")]);
  const options = [...runs.runs.map(r => [`run:${r.run_id}`, `run ${r.run_id} (${r.state})`]),
    ...reg.names.flatMap(n => n.versions.map(v => [`version:${v.ref}`, `version ${v.ref} (${v.kind})`]))];
  if (options.length < 2) {
    return setMain(h("h1", {}, "Compare"), empty("Compare needs at least two runs or registry versions; there are ", String(options.length), " so far. ",
      h("code", {}, "rayft train examples/lora.yaml"), " twice (or with another method) gives two."));
  }
  const select = h("select", { multiple: true, size: Math.min(12, options.length), id: "compare-pick", style: "min-width:420px" },
    options.map(([v, label]) => h("option", { value: v }, label)));
  const go = h("button", { type: "submit" }, "Compare");
  const form = h("form", { class: "card" }, h("p", {}, "Pick 2 to 4 runs or registry versions (ctrl/cmd-click for several):"), h("p", {}, select), go);
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const picked = [...select.selectedOptions].map(o => o.value);
    if (picked.length < 2 || picked.length > 4) return form.prepend(h("div", { class: "error" }, `picked ${picked.length}: pick 2 to 4`));
    navigate(`${BASE}/compare?items=${picked.map(encodeURIComponent).join(",")}`);
  });
  setMain(h("h1", {}, "Compare"), message ? h("div", { class: "error" }, message) : null, form);
}

// ---------------------------------------------------------------- playground

async function modelIds() {
  const resp = await fetch(`${ROOT}/v1/models`, { headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) throw await failure(resp);
  return (await resp.json()).data;
}

// Streams one answer from /v1/completions or /v1/chat/completions into `out`; returns the text.
async function streamAnswer(pane, prompt, opts) {
  const { out, status } = pane;
  out.textContent = "";
  status.textContent = `asking ${opts.model}…`;
  const chat = opts.mode === "chat";
  const body = { model: opts.model, max_tokens: opts.maxTokens, temperature: opts.temperature, stream: true,
    stream_options: { include_usage: true }, ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }) };
  const started = performance.now();
  const resp = await fetch(`${ROOT}/v1/${chat ? "chat/completions" : "completions"}`, {
    method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiFailure(chunk.error.code || "error", chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        text += chat ? ((c.delta && c.delta.content) || "") : (c.text || "");
        if (c.finish_reason) finish = c.finish_reason;
      }
      out.textContent = text;
    }
  }
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  const blank = text.length && !text.trim() ? ` (the answer is ${text.length} whitespace characters)` : "";
  status.textContent = `done: ${usage ? usage.completion_tokens + " tokens, " : ""}finish ${finish || "?"}, ${secs} s, at ${fmtTime(new Date().toISOString())}${blank}`;
  status.dataset.done = "1";
  return text;
}

async function playgroundPage() {
  const models = await modelIds();
  const byKind = kind => models.filter(m => (m.kind || "adapter") === kind);
  function picker(i) {
    const groups = [["base", "base model"], ["merged", "merged models"], ["adapter", "adapters"]];
    const select = h("select", { id: `model-${i}`, "aria-label": `model of answer ${i + 1}` },
      groups.map(([kind, label]) => byKind(kind).length ? h("optgroup", { label }, byKind(kind).map(m => h("option", { value: m.id }, m.id))) : null));
    const adapters = byKind("adapter");
    if (i === 1 && adapters.length) select.value = adapters[0].id;
    return select;
  }
  const panes = [0, 1].map(i => {
    const out = h("pre", { class: "out", id: `out-${i}`, "aria-live": "polite" });
    const status = h("div", { class: "status", id: `status-${i}` }, "not asked yet");
    return { select: picker(i), out, status };
  });
  const prompt = h("textarea", { id: "prompt", placeholder: "prompt" }, "reverse apple =");
  const mode = h("select", { id: "mode" }, h("option", { value: "completion" }, "completion (raw prompt)"), h("option", { value: "chat" }, "chat (chat template)"));
  const temperature = h("input", { type: "number", id: "temperature", min: 0, max: 2, step: 0.1, value: 0, style: "width:70px" });
  const maxTokens = h("input", { type: "number", id: "max-tokens", min: 1, max: session.max_tokens_limit, value: Math.min(16, session.max_tokens_limit), style: "width:70px" });
  const run = h("button", { id: "run" }, "Run both");
  run.addEventListener("click", async () => {
    run.disabled = true;
    const opts = { mode: mode.value, temperature: Number(temperature.value), maxTokens: Number(maxTokens.value) };
    await Promise.all(panes.map(async p => {
      delete p.status.dataset.done;
      try { await streamAnswer(p, prompt.value, { ...opts, model: p.select.value }); }
      catch (err) { p.out.textContent = ""; p.status.replaceChildren(errorBox(err)); p.status.dataset.done = "error"; }
    }));
    run.disabled = false;
  });
  setMain(h("h1", {}, "Playground"),
    h("div", { class: "sub" }, `${models.length} models served by this app: the base, merged models and every adapter of the base; answers stream from its own /v1 endpoints.`),
    h("div", { class: "card" }, h("p", {}, prompt),
      h("div", { class: "controls" }, h("label", {}, "mode", mode), h("label", {}, "temperature", temperature),
        h("label", {}, "max tokens", maxTokens), run)),
    h("div", { class: "row" }, panes.map((p, i) => h("div", { class: "pane" }, h("label", {}, `answer ${i + 1}`, p.select), p.out, p.status))));
}

// ---------------------------------------------------------------- fine-tuning jobs (the app's /v1/files and /v1/fine_tuning API)

const TERMINAL = ["succeeded", "failed", "cancelled"];

async function v1(path, init) {
  const resp = await fetch(`${ROOT}/v1${path}`, { cache: "no-store", ...(init || {}), headers: authHeaders((init && init.headers) || {}) });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

function unixTime(t) { return t ? fmtTime(new Date(t * 1000).toISOString()) : "—"; }

async function jobsPage() {
  let jobs;
  try {
    jobs = await v1("/fine_tuning/jobs?limit=100");
  } catch (err) {
    if (err.status !== 404) throw err;
    return setMain(h("h1", {}, "Fine-tuning jobs"), empty("This application has no fine-tuning API: add a ", h("code", {}, "fine_tuning:"),
      " section to its serve spec (", h("code", {}, "examples/serve.yaml"), " has one) to upload files and start jobs here."));
  }
  const [files, models] = await Promise.all([v1("/files"), modelIds()]);
  const fileOptions = files.data.map(f => h("option", { value: f.id }, `${f.filename} (${f.id}, ${fmtSize(f.bytes)})`));
  // upload
  const fileInput = h("input", { type: "file", id: "upload-file", accept: ".jsonl,application/jsonl,application/json" });
  const uploadStatus = h("div", { class: "status", id: "upload-status" });
  const upload = h("form", { class: "card", id: "upload" }, h("h2", {}, "Upload a training file (JSONL)"),
    h("p", { class: "sub" }, 'One JSON object a line: {"messages": [...]}, {"prompt", "completion"} or {"text"}.'),
    fileInput, " ", h("button", { type: "submit" }, "Upload"), uploadStatus);
  upload.addEventListener("submit", async ev => {
    ev.preventDefault();
    if (!fileInput.files.length) { uploadStatus.replaceChildren(errorBox(new Error("choose a file first"))); return; }
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", fileInput.files[0]);
    uploadStatus.textContent = "uploading…";
    try {
      const f = await v1("/files", { method: "POST", body: form });
      uploadStatus.textContent = `uploaded ${f.filename} as ${f.id}`;
      uploadStatus.dataset.fileId = f.id;
      training.append(h("option", { value: f.id, selected: true }, `${f.filename} (${f.id}, ${fmtSize(f.bytes)})`));
      training.value = f.id;
    } catch (err) { uploadStatus.replaceChildren(errorBox(err)); }
  });
  // create
  const model = h("select", { id: "job-model" }, models.filter(m => m.kind === "base").map(m => h("option", { value: m.id }, m.id)));
  const training = h("select", { id: "job-training-file" }, fileOptions);
  const suffix = h("input", { type: "text", id: "job-suffix", placeholder: "suffix (optional)", maxlength: 64 });
  const epochs = h("input", { type: "number", id: "job-epochs", min: 1, placeholder: "auto", style: "width:80px" });
  const batch = h("input", { type: "number", id: "job-batch", min: 1, placeholder: "auto", style: "width:80px" });
  const lrm = h("input", { type: "number", id: "job-lr", min: 0, step: "any", placeholder: "auto", style: "width:80px" });
  const method = h("select", { id: "job-method" }, ["default", "lora", "dora", "rslora", "ia3", "full"].map(m => h("option", { value: m }, m)));
  const rank = h("input", { type: "number", id: "job-r", min: 1, placeholder: "r", style: "width:70px" });
  const steps = h("input", { type: "number", id: "job-steps", min: 1, placeholder: "from epochs", style: "width:110px" });
  const createStatus = h("div", { class: "status", id: "create-status" });
  const create = h("form", { class: "card", id: "create" }, h("h2", {}, "Start a job"),
    h("div", { class: "controls" }, h("label", {}, "base model", model), h("label", {}, "training file", training), h("label", {}, "suffix", suffix)),
    h("div", { class: "controls" }, h("label", {}, "epochs", epochs), h("label", {}, "batch size", batch), h("label", {}, "lr multiplier", lrm),
      h("label", {}, "method", method), h("label", {}, "rank", rank), h("label", {}, "max steps", steps)),
    h("button", { type: "submit", id: "create-job" }, "Start"), createStatus);
  create.addEventListener("submit", async ev => {
    ev.preventDefault();
    const num = el => el.value === "" ? undefined : Number(el.value);
    const hyperparameters = Object.fromEntries(Object.entries({ n_epochs: num(epochs), batch_size: num(batch), learning_rate_multiplier: num(lrm) })
      .filter(([, v]) => v !== undefined));
    const rayft = {};
    if (method.value !== "default") rayft.method = { name: method.value, ...(num(rank) ? { r: num(rank) } : {}) };
    if (num(steps)) rayft.max_steps = num(steps);
    const body = { model: model.value, training_file: training.value, ...(suffix.value ? { suffix: suffix.value } : {}),
      ...(Object.keys(hyperparameters).length ? { hyperparameters } : {}), ...(Object.keys(rayft).length ? { rayft } : {}) };
    createStatus.textContent = "starting…";
    try {
      const job = await v1("/fine_tuning/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      navigate(`${BASE}/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) { createStatus.replaceChildren(errorBox(err)); }
  });
  const active = jobs.data.some(j => !TERMINAL.includes(j.status));
  const table = jobs.data.length ? h("table", { id: "jobs" },
    h("tr", {}, ["job", "status", "model", "fine-tuned model", "training file", "created", "finished", "estimated finish"].map(t => h("th", {}, t))),
    jobs.data.map(j => h("tr", { "data-job": j.id }, h("td", { class: "mono" }, link(`/jobs/${encodeURIComponent(j.id)}`, j.id)),
      h("td", {}, badge(j.status)), h("td", { class: "mono" }, j.model), h("td", { class: "mono" }, j.fine_tuned_model || "—"),
      h("td", { class: "mono" }, j.training_file), h("td", {}, unixTime(j.created_at)), h("td", {}, unixTime(j.finished_at)),
      h("td", {}, j.status === "running" ? unixTime(j.estimated_finish) : "—"))))
    : empty("No fine-tuning jobs yet: upload a file and start one below (or with the openai client: ",
      h("code", {}, "client.fine_tuning.jobs.create(...)"), ").");
  setMain(h("h1", {}, "Fine-tuning jobs"), h("div", { class: "sub", id: "as-of" }, `data as of ${fmtTime(new Date().toISOString())}` + (active ? " · live: refreshes every 3 s" : "")),
    table, h("div", { class: "row" }, upload, create));
  if (!files.data.length) training.append(h("option", { value: "" }, "— upload a file first —"));
  // Refresh only the table while a job is active, so a form being filled in is not reset.
  if (active) timer = setTimeout(async function again() {
    if (!location.pathname.endsWith("/jobs")) return;
    try {
      const fresh = await v1("/fine_tuning/jobs?limit=100");
      for (const j of fresh.data) {
        const row = document.querySelector(`#jobs tr[data-job="${CSS.escape(j.id)}"]`);
        if (row) row.children[1].replaceChildren(badge(j.status));
      }
      document.getElementById("as-of").textContent = `data as of ${fmtTime(new Date().toISOString())} · live: refreshes every 3 s`;
      if (fresh.data.some(j => !TERMINAL.includes(j.status))) timer = setTimeout(again, 3000);
    } catch (err) { /* the next navigation shows the error */ }
  }, 3000);
}

async function jobPage(jobId) {
  const [job, events, checkpoints] = await Promise.all([v1(`/fine_tuning/jobs/${encodeURIComponent(jobId)}`),
    v1(`/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=100`), v1(`/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`)]);
  const running = !TERMINAL.includes(job.status);
  const metrics = events.data.filter(e => e.type === "metrics" && e.data).map(e => [e.data.step, e.data.train_loss]).sort((a, b) => a[0] - b[0]);
  const cancel = running ? h("button", { id: "cancel-job", class: "secondary", onclick: async () => {
    cancel.disabled = true;
    try { await v1(`/fine_tuning/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); await jobPage(jobId); }
    catch (err) { cancel.after(errorBox(err)); cancel.disabled = false; }
  } }, "Cancel job") : null;
  const runId = job.rayft && job.rayft.run_id;
  setMain(
    h("h1", { class: "mono" }, job.id, " ", badge(job.status), " ", cancel), asOf({ as_of: new Date().toISOString() }, running),
    facts([["base model", job.model], ["fine-tuned model", job.fine_tuned_model || "—"], ["training file", job.training_file],
      ["validation file", job.validation_file || "—"], ["created", unixTime(job.created_at)], ["finished", unixTime(job.finished_at)],
      ["estimated finish", running ? unixTime(job.estimated_finish) : "—"], ["trained tokens", job.trained_tokens ?? "—"],
      ["hyperparameters", Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k} ${v}`).join(" · ") || "—"], ["run", runId ? link(`/runs/${encodeURIComponent(runId)}`, runId, { class: "mono" }) : "—"]]),
    job.error && job.error.message ? h("div", { class: "error", id: "job-error", role: "alert" }, job.error.message) : null,
    section("Train loss (from the job's progress events)", chartWithLegend([{ name: "train_loss", points: metrics }], { id: "job-loss", title: "train loss by step", ylabel: "loss", emptyText: "no progress reported yet" })),
    section("Checkpoints", checkpoints.data.length ? h("table", { id: "job-checkpoints" }, h("tr", {}, ["step", "model", "train loss", "valid loss"].map(t => h("th", {}, t))),
      checkpoints.data.map(c => h("tr", {}, h("td", { class: "num" }, c.step_number), h("td", { class: "mono" }, c.fine_tuned_model_checkpoint || "— (servable once the job succeeded)"),
        h("td", { class: "num" }, fmtNum(c.metrics && c.metrics.train_loss)), h("td", { class: "num" }, fmtNum(c.metrics && c.metrics.valid_loss)))))
      : empty("No checkpoint yet.")),
    section("Events (newest first)", events.data.length ? h("table", { id: "job-events" }, events.data.map(e =>
      h("tr", { class: e.level === "error" ? "error-row" : null }, h("td", {}, unixTime(e.created_at)), h("td", {}, e.level), h("td", { class: "mono" }, e.message))))
      : empty("No events yet.")),
  );
  live(() => jobPage(jobId), running);
}

start();
