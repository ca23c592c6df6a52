// saeformer report: builds every element from the data files beside it. Corpus text is only
// ever set with textContent, never parsed as markup. No network, no server: data files are
// scripts that call SAEF.add, loaded on demand with <script src>.
"use strict";

const SAEF = {
  data: {},
  waiting: {},
  add(key, value) {
    this.data[key] = value;
    (this.waiting[key] || []).forEach((resolve) => resolve(value));
    delete this.waiting[key];
  },
  load(key, src) {
    if (key in this.data) return Promise.resolve(this.data[key]);
    return new Promise((resolve, reject) => {
      (this.waiting[key] = this.waiting[key] || []).push(resolve);
      const script = document.createElement("script");
      script.src = src;
      script.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(script);
    });
  },
};

const PAGE = 50;
const state = { site: null, page: 0, query: "", sort: "density-desc", feature: null };

window.addEventListener("error", (event) => {
  document.body.dataset.error = String(event.message);
});

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function tokenText(id) {
  const text = SAEF.data.vocab[id];
  if (text === undefined) return "\u00bf" + id;
  return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "\u2013";
  return Number(value).toPrecision(digits || 3);
}

function pct(value) {
  return value === null || value === undefined ? "\u2013" : (100 * value).toPrecision(3) + "%";
}

function stepText(value) {
  return value === null || value === undefined ? "never" : "step " + value;
}

// ----- run section ----------------------------------------------------------------------------

function renderRun(run) {
  const s = run.summary || {};
  document.getElementById("run-line").textContent =
    `${run.model.n_layers} layers, d_model ${run.model.d_model}, context ${run.model.context}, ` +
    `vocabulary ${run.model.vocab_size} \u00b7 step ${s.step ?? "?"}, ${s.tokens ?? "?"} tokens ` +
    `\u00b7 validation loss ${fmt(s.val_loss, 4)} \u00b7 probe set ${run.probe.tokens} tokens`;
  const section = document.getElementById("run");
  const rows = run.sites.map((site) =>
    el("tr", {},
      el("td", { text: site.id }), el("td", { text: site.title }),
      el("td", { text: `${site.width}` }), el("td", { text: `${site.k}` }),
      el("td", { text: fmt(site.l0) }), el("td", { text: fmt(site.fvu) }),
      el("td", { text: pct(site.dead_frac) }), el("td", { text: pct(site.stable_frac) }),
      el("td", { text: fmt(site.median_entropy) }),
      el("td", { text: `${site.splits} / ${site.merges}` }), el("td", { text: site.method })));
  const head = ["bottleneck", "where", "F", "k", "L0", "FVU", "dead", "stable", "median entropy",
    "splits / merges", "matching"].map((h) => el("th", { text: h }));
  section.append(el("table", { class: "summary" }, el("tr", {}, ...head), ...rows));
  const sizes = run.snapshots.map((s) => s.bytes);
  const total = sizes.reduce((a, b) => a + b, 0);
  section.append(el("p", { class: "note", text:
    `${run.snapshots.length} snapshots at steps ${run.snapshots.map((s) => s.step).join(", ")}; ` +
    `${(total / sizes.length / 1e6).toFixed(2)} MB per snapshot on average. FVU compares \u0125 ` +
    "with h; without a reconstruction loss it can exceed 1 (\u0125 is then the model's own " +
    "sparse state, not an approximation of h)." }));
  if (run.curves_png) section.append(el("img", { src: run.curves_png, alt: "training curves" }));
  if (run.compare) renderCompare(section, run.compare);
}

function renderCompare(section, compare) {
  section.append(el("h2", { text: "Joint bottlenecks vs post-hoc SAEs" }),
    el("p", { class: "note", text: `From ${compare.source} (saeformer compare --json): the ` +
      "same probe text and metrics for every entry. CE score: 1 = splicing the SAE in costs " +
      "nothing, 0 = as bad as zeroing the hook point." }));
  for (const table of compare.tables) {
    const head = el("tr", {}, ...table.header.map((h) => el("th", { text: h })));
    const rows = table.rows.map((row) => el("tr", {}, ...row.map((c) => el("td", { text: c }))));
    section.append(el("table", { class: "summary compare" }, head, ...rows));
  }
}

// ----- feature browser --------------------------------------------------------------------------

function siteInfo() {
  return SAEF.data.run.sites.find((s) => s.id === state.site);
}

function featureTitle(site, id) {
  return `${site.title} \u2013 ${site.unit} ${id}`;
}

function matches(index, id, query) {
  if (!query) return true;
  const asId = query.match(/^#?(\d+)$/);
  if (asId) return id === Number(asId[1]);
  const q = query.toLowerCase();
  return index.top_tokens[id].some((t) => tokenText(t).toLowerCase().includes(q));
}

const SORTS = {
  "density-desc": ["density", -1], "density-asc": ["density", 1],
  "entropy-asc": ["entropy", 1], "entropy-desc": ["entropy", -1],
  "birth-asc": ["birth", 1], "stable-asc": ["stable", 1], "id-asc": [null, 1],
};

function sortedIds(index) {
  const n = index.density.length;
  const ids = [];
  for (let i = 0; i < n; i++) if (matches(index, i, state.query.trim())) ids.push(i);
  const [column, sign] = SORTS[state.sort];
  if (column) {
    const v = index[column];
    ids.sort((a, b) => {
      if (v[a] === null) return v[b] === null ? a - b : 1;
      if (v[b] === null) return -1;
      return sign * (v[a] - v[b]) || a - b;
    });
  }
  return ids;
}

async function renderSite() {
  const site = siteInfo();
  const evo = SAEF.data.run.evolution;
  const index = await SAEF.load(site.id + "/index", `data/${site.id}/index.js`);
  const root = document.getElementById("site");
  root.replaceChildren();
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.classList.toggle("active", tab.dataset.site === site.id);
  }
  root.append(el("p", { class: "note", text:
    `${site.id}: F = ${site.width}, k = ${site.k}; full cards for ${site.cards} features ` +
    `(the densest). Matching: ${site.method}. Stable = cosine to the final decoder row ` +
    `\u2265 ${evo.stable_cos} from then on; born = fires on \u2265 ${evo.density_floor} of ` +
    `probe tokens from then on; split / merge partners: cosine \u2265 ${evo.split_cos}.` }));
  root.append(el("img", { class: "evolution", src: site.evolution_png, alt: `${site.id} evolution` }));
  const search = el("input", { type: "search", placeholder: "feature id (#12) or token text",
    value: state.query });
  const sort = el("select", {}, ...Object.keys(SORTS).map((k) =>
    el("option", { value: k, text: "sort: " + k.replace("-", " ") })));
  sort.value = state.sort;
  const table = el("table", { class: "browser" });
  const pager = el("div", { class: "pager" });
  const card = el("div", { id: "card", class: "card" });
  root.append(el("div", { class: "columns" },
    el("div", { class: "browse" }, el("div", { class: "controls" }, search, sort), table, pager),
    card));
  const draw = () => drawTable(site, index, table, pager);
  search.addEventListener("input", () => { state.query = search.value; state.page = 0; draw(); });
  sort.addEventListener("change", () => { state.sort = sort.value; state.page = 0; draw(); });
  draw();
  const first = state.feature ?? sortedIds(index)[0];
  if (first !== undefined) await showFeature(first);
}

function drawTable(site, index, table, pager) {
  const ids = sortedIds(index);
  const pages = Math.max(1, Math.ceil(ids.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const head = ["id", "density", "entropy", "born", "stable", "top tokens"]
    .map((h) => el("th", { text: h }));
  const rows = ids.slice(state.page * PAGE, (state.page + 1) * PAGE).map((id) =>
    el("tr", { class: index.card[id] >= 0 ? "has-card" : "", onclick: () => selectFeature(id) },
      el("td", { text: String(id) }), el("td", { text: pct(index.density[id]) }),
      el("td", { text: fmt(index.entropy[id]) }),
      el("td", { text: index.birth[id] ?? "\u2013" }), el("td", { text: index.stable[id] ?? "\u2013" }),
      el("td", {}, ...index.top_tokens[id].map((t) => el("span", { class: "tok", text: tokenText(t) })))));
  table.replaceChildren(el("tr", {}, ...head), ...rows);
  pager.replaceChildren(
    el("button", { text: "\u2190", onclick: () => { state.page--; drawTable(site, index, table, pager); } }),
    el("span", { text: ` page ${state.page + 1} of ${pages} (${ids.length} features) ` }),
    el("button", { text: "\u2192", onclick: () => { state.page++; drawTable(site, index, table, pager); } }));
  pager.firstChild.disabled = state.page === 0;
  pager.lastChild.disabled = state.page >= pages - 1;
}

function selectFeature(id) {
  location.hash = `${state.site}/${id}`;
}

// ----- feature card ---------------------------------------------------------------------------

function contextRow(context) {
  const line = el("div", { class: "context" });
  context.tokens.forEach((t, i) => {
    const a = context.acts[i] / 255;
    const span = el("span", { class: i === context.center ? "tok top" : "tok", text: tokenText(t),
      title: `activation ${(a * 100).toFixed(0)}% of max` });
    if (a > 0) span.style.backgroundColor = `rgba(255, 120, 0, ${(0.1 + 0.9 * a).toFixed(2)})`;
    line.append(span);
  });
  return el("div", { class: "context-row" }, el("span", { class: "value", text: fmt(context.value) }), line);
}

function sparkline(label, values, steps, log) {
  const w = 220, h = 46, pad = 3;
  const pts = values.map((v, i) => [steps[i], v === null ? null : (log ? Math.log10(Math.max(v, 1e-7)) : v)])
    .filter((p) => p[1] !== null);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  if (pts.length) {
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => pad + (w - 2 * pad) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
    const sy = (y) => h - pad - (h - 2 * pad) * (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    svg.append(line);
  }
  const shown = values.filter((v) => v !== null);
  const range = shown.length ? ` (range ${fmt(Math.min(...shown))} to ${fmt(Math.max(...shown))})` : "";
  return el("div", { class: "spark" },
    el("div", { text: `${label}: ${fmt(values[values.length - 1])}${range}` }), svg);
}

async function showFeature(id) {
  state.feature = id;
  const site = siteInfo();
  const index = SAEF.data[site.id + "/index"];
  const root = document.getElementById("card");
  if (!root) return;
  if (!(id >= 0 && id < index.density.length)) {
    root.replaceChildren(el("p", { text: `${site.id} has no feature ${id}.` }));
    return;
  }
  const chunk = index.card[id];
  const header = el("h2", { text: featureTitle(site, id) });
  if (chunk < 0) {
    root.replaceChildren(header, el("p", { class: "stats", text:
      `Token Entropy ${fmt(index.entropy[id])} \u00b7 density ${pct(index.density[id])} \u00b7 ` +
      `born ${stepText(index.birth[id])} \u00b7 stable ${stepText(index.stable[id])}` }),
      el("p", { class: "note", text: "No full card for this feature: rerun `saeformer report RUN --all`." }));
    return;
  }
  const cards = await SAEF.load(`${site.id}/cards_${chunk}`, `data/${site.id}/cards_${chunk}.js`);
  if (state.feature !== id) return;
  const c = cards[String(id)];
  const steps = site.steps;
  root.replaceChildren(
    header,
    el("p", { class: "stats", text:
      `Token Entropy ${fmt(c.entropy)} \u00b7 density ${pct(c.density)} \u00b7 mean activation ` +
      `${fmt(c.mean_activation)} \u00b7 born ${stepText(c.birth)} \u00b7 stable from ` +
      `${stepText(c.stable)} \u00b7 splits ${c.n_splits} \u00b7 merges ${c.n_merges}` }),
    el("h3", { text: "Top promoted output tokens (direct path through the unembedding)" }),
    el("div", { class: "promoted" }, ...c.promoted.map(([t, v]) =>
      el("span", { class: "chip" }, el("span", { class: "tok", text: tokenText(t) }),
        el("small", { text: " " + fmt(v) })))),
    el("h3", { text: "Top activations on the probe set" }),
    ...c.contexts.map(contextRow),
    el("h3", { text: "Over training" }),
    el("div", { class: "sparks" },
      sparkline("token entropy (bits)", c.trajectory.entropy, steps, false),
      sparkline("density (log scale)", c.trajectory.density, steps, true),
      sparkline("cosine to final", c.trajectory.cos_to_final, steps, false)),
    ...c.timeline.map((t) => el("div", { class: "timeline" },
      el("h4", { text: `step ${t.step}` + (t.feature !== id ? ` (as feature ${t.feature})` : "") }),
      ...(t.contexts.length ? t.contexts.map(contextRow) : [el("p", { class: "note", text: "did not fire" })]))));
}

// ----- routing ----------------------------------------------------------------------------------

async function route() {
  const [siteId, feature] = decodeURIComponent(location.hash.slice(1)).split("/");
  const sites = SAEF.data.run.sites;
  const site = sites.find((s) => s.id === siteId) || sites[0];
  const id = feature === undefined || feature === "" ? null : Number(feature);
  if (!site) return;
  if (site.id !== state.site) {
    Object.assign(state, { site: site.id, page: 0, query: "", feature: id });
    await renderSite();
  } else if (id !== null) {
    await showFeature(id);
  }
}

async function start() {
  const run = SAEF.data.run;
  renderRun(run);
  const tabs = document.getElementById("tabs");
  for (const site of run.sites) {
    tabs.append(el("button", { "data-site": site.id, text: `${site.id} (${site.title})`,
      onclick: () => { location.hash = site.id; } }));
  }
  window.addEventListener("hashchange", () => route().catch(fail));
  await route();
  document.body.dataset.ready = "1";
}

function fail(error) {
  document.body.dataset.error = String(error && error.message ? error.message : error);
}

window.addEventListener("DOMContentLoaded", () => start().catch(fail));
