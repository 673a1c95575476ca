// ComfyUI-DynASyn web extension (plain JavaScript, no build step).
//  - DynASyn Train: a live chart of every loss term per step (from the server's "dynasyn.train"
//    events) with phase, step/total, ETA and the latest preview; also inside subgraphs (ids "12:5").
//  - DynASyn Augment / Load Dataset / Save Dataset: a gallery of the augmented images with their
//    prompts; hovering an image shows its pseudo-masks.
//  - DynASyn SAM Masks: a box / point picker on the input image, written into the node's
//    subject_prompts widget, so the workflow saves and reloads it.
//  - LLM Settings / Describe / Prompts: a button listing the models the endpoint offers, to pick one.
//  - Seeds: workflows saved when the pack's seeds still had a "control after generate" value load aligned.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#a1887f", "#90a4ae"];
const GALLERY_NODES = new Set(["DynASynAugment", "DynASynLoadDataset", "DynASynSaveDataset", "DynASynMakePair"]);

function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  for (const c of children) e.append(c);
  return e;
}

// A DOM widget that is never saved in widgets_values nor sent to the server.
function addPanel(node, name, element, minHeight) {
  const w = node.addDOMWidget(name, "dynasyn_" + name, element, {
    serialize: false, hideOnZoom: false, getMinHeight: () => minHeight, getValue: () => undefined, setValue: () => {},
  });
  w.serialize = false;
  return w;
}

const viewUrl = (f) =>
  api.apiURL(`/view?filename=${encodeURIComponent(f.filename)}&subfolder=${encodeURIComponent(f.subfolder || "")}` +
             `&type=${f.type || "temp"}`);

// ---------------------------------------------------------------- training chart
function fmtTime(s) {
  if (!isFinite(s) || s < 0) return "–";
  const m = Math.floor(s / 60), r = Math.round(s % 60);
  return m ? `${m} min ${r} s` : `${r} s`;
}

function addLossChart(node) {
  const head = el("div", { className: "dynasyn-chart-head", textContent: "Waiting for the first step…" });
  const canvas = el("canvas", { width: 420, height: 200 });
  canvas.style.cssText = "width:100%;height:200px;background:#1b1b1b;border-radius:4px";
  const preview = el("img");
  preview.style.cssText = "max-width:100%;max-height:160px;display:none;margin-top:4px";
  const box = el("div", { className: "dynasyn-chart" }, head, canvas, preview);
  box.style.cssText = "display:flex;flex-direction:column;font:11px sans-serif;color:#ddd;gap:2px";
  const chart = { head, canvas, preview, steps: [], terms: {}, last: null };
  chart.reset = () => { chart.steps = []; chart.terms = {}; chart.last = null; };
  chart.draw = () => drawChart(chart);
  node.dynasynChart = chart;
  addPanel(node, "loss_chart", box, 240);
}

function drawChart(chart) {
  const { canvas, steps, terms } = chart;
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 36, R = 6, T = 6, B = 16;
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, W, H);
  const names = Object.keys(terms);
  if (!steps.length) return;
  const all = names.flatMap((n) => terms[n]).filter((v) => v > 0 && isFinite(v));
  if (!all.length) return;
  const lo = Math.log10(Math.min(...all)), hi = Math.max(Math.log10(Math.max(...all)), lo + 1e-3);
  const s0 = steps[0], s1 = Math.max(steps[steps.length - 1], s0 + 1);
  const x = (s) => L + ((s - s0) / (s1 - s0)) * (W - L - R);
  const y = (v) => T + (1 - (Math.log10(v) - lo) / (hi - lo)) * (H - T - B);
  ctx.strokeStyle = "#444";
  ctx.fillStyle = "#aaa";
  ctx.font = "10px sans-serif";
  for (const v of [lo, (lo + hi) / 2, hi]) {
    const yy = y(10 ** v);
    ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(W - R, yy); ctx.stroke();
    ctx.fillText((10 ** v).toExponential(1), 2, yy + 3);
  }
  ctx.fillText(`step ${s0}`, L, H - 3);
  ctx.fillText(`${s1}`, W - R - 24, H - 3);
  names.forEach((name, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    terms[name].forEach((v, k) => {
      if (!(v > 0 && isFinite(v))) return;
      if (started) ctx.lineTo(x(steps[k]), y(v)); else { ctx.moveTo(x(steps[k]), y(v)); started = true; }
    });
    ctx.stroke();
    ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.fillText(name, L + 6 + i * 64, T + 10);
  });
}

// The node the server means by an execution id: "5" at the top level, "12:5" for node 5 inside subgraph node 12
// (nested subgraphs: "3:12:5"), as ComfyUI's prompt flattens subgraphs.
function nodeByExecutionId(id) {
  const path = String(id ?? "").split(":").filter((k) => k.length);
  let graph = app.rootGraph ?? app.graph;
  if (!graph || !path.length) return null;
  const byId = (g, k) => g.getNodeById?.(Number(k)) ?? g.getNodeById?.(k) ?? null;
  for (const k of path.slice(0, -1)) {
    graph = byId(graph, k)?.subgraph;
    if (!graph) return null;
  }
  return byId(graph, path[path.length - 1]);
}

api.addEventListener("dynasyn.train", ({ detail }) => {
  const chart = nodeByExecutionId(detail.node)?.dynasynChart;
  if (!chart) return;
  if (chart.last && detail.step <= chart.last.step) chart.reset(); // a new run (or a resume) starts over
  const terms = { loss: detail.loss, ...(detail.terms || {}) };
  const k = chart.steps.length;
  chart.steps.push(detail.step);
  for (const [name, v] of Object.entries(terms)) {
    (chart.terms[name] ||= new Array(k).fill(NaN)).push(Number(v));
  }
  for (const arr of Object.values(chart.terms)) if (arr.length < k + 1) arr.push(NaN);
  chart.last = detail;
  const eta = detail.step > 0 ? (detail.elapsed / detail.step) * (detail.total - detail.step) : NaN;
  chart.head.textContent = `phase ${detail.phase} · step ${detail.step}/${detail.total} · loss ${Number(detail.loss).toFixed(4)}` +
    ` · ETA ${fmtTime(eta)}`;
  chart.draw();
});

// Before step 1 the trainer computes the frozen model's L_ICA / L_AUG targets (minutes on a large model on a CPU)
api.addEventListener("dynasyn.targets", ({ detail }) => {
  const chart = nodeByExecutionId(detail.node)?.dynasynChart;
  if (!chart) return;
  if (chart.last) chart.reset(); // a new run: its targets come before its step 1
  const eta = detail.done > 0 ? (detail.elapsed / detail.done) * (detail.total - detail.done) : NaN;
  chart.head.textContent = `frozen-model targets ${detail.done}/${detail.total} before training · ETA ${fmtTime(eta)}`;
});

api.addEventListener("b_preview_with_metadata", ({ detail }) => {
  const id = detail?.displayNodeId ?? detail?.nodeId;
  const chart = nodeByExecutionId(id)?.dynasynChart;
  if (!chart || !detail.blob) return;
  if (chart.preview.src) URL.revokeObjectURL(chart.preview.src);
  chart.preview.src = URL.createObjectURL(detail.blob);
  chart.preview.style.display = "block";
});

// ---------------------------------------------------------------- dataset gallery
function addGallery(node) {
  const grid = el("div", { className: "dynasyn-gallery" });
  grid.style.cssText = "display:grid;grid-template-columns:repeat(auto-fill,minmax(96px,1fr));gap:4px;overflow:auto;" +
    "max-height:100%;font:10px sans-serif;color:#ccc";
  node.dynasynGallery = grid;
  addPanel(node, "gallery", grid, 140);
}

function showGallery(node, items) {
  const grid = node.dynasynGallery;
  if (!grid) return;
  grid.replaceChildren();
  for (const it of items || []) {
    const img = el("img", { src: viewUrl(it.image), title: it.prompt, alt: it.prompt });
    img.style.cssText = "width:100%;border-radius:3px";
    if (it.masks) {
      img.addEventListener("mouseenter", () => { img.src = viewUrl(it.masks); });
      img.addEventListener("mouseleave", () => { img.src = viewUrl(it.image); });
    }
    grid.append(el("figure", { style: "margin:0" }, img, el("figcaption", { textContent: it.prompt })));
  }
}

// ---------------------------------------------------------------- SAM picker
function parsePrompts(text) {
  try {
    const v = JSON.parse(text || "[]");
    return Array.isArray(v) ? v.filter((p) => p && typeof p === "object") : [];
  } catch {
    return null; // hand-edited, invalid: the picker leaves it alone
  }
}

function upstreamImageUrl(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "image") ?? -1;
  const up = slot >= 0 ? node.getInputNode(slot) : null;
  if (!up) return null;
  if (up.imgs?.[0]?.src) return up.imgs[0].src;
  const w = up.widgets?.find((w) => w.name === "image");
  if (!w || typeof w.value !== "string" || !w.value) return null;
  const m = w.value.match(/^(.*)[\\/]([^\\/]+)$/);
  const [subfolder, filename] = m ? [m[1], m[2]] : ["", w.value.replace(/ \[input\]$/, "")];
  return viewUrl({ filename, subfolder, type: "input" });
}

function addSamPicker(node) {
  const widget = node.widgets?.find((w) => w.name === "subject_prompts");
  if (!widget) return;
  const state = { subject: 0, mode: "box", drag: null, img: new Image(), src: null };
  const canvas = el("canvas", { width: 320, height: 240 });
  canvas.style.cssText = "width:100%;background:#222;border-radius:4px;cursor:crosshair;touch-action:none";
  const subjects = el("select", { title: "Subject the next box or point belongs to" });
  const mode = el("select", { title: "What a click or drag adds" });
  for (const [v, t] of [["box", "box (drag)"], ["pos", "point: subject"], ["neg", "point: not subject"]]) {
    mode.append(el("option", { value: v, textContent: t }));
  }
  const add = el("button", { textContent: "+ subject" });
  const clear = el("button", { textContent: "clear subject" });
  const info = el("span", { textContent: "" });
  const bar = el("div", {}, subjects, mode, add, clear, info);
  bar.style.cssText = "display:flex;gap:4px;align-items:center;font:11px sans-serif;color:#ccc;flex-wrap:wrap";
  const box = el("div", { className: "dynasyn-sam" }, bar, canvas);
  box.style.cssText = "display:flex;flex-direction:column;gap:4px";

  const read = () => parsePrompts(widget.value);
  const write = (prompts) => {
    widget.value = JSON.stringify(prompts);
    widget.callback?.(widget.value);
    node.graph?.setDirtyCanvas?.(true, true);
    draw();
  };
  const scale = () => (state.img.naturalWidth ? canvas.width / state.img.naturalWidth : 1);
  const toImage = (ev) => {
    const r = canvas.getBoundingClientRect(), s = scale();
    return [Math.round(((ev.clientX - r.left) * canvas.width) / r.width / s),
            Math.round(((ev.clientY - r.top) * canvas.height) / r.height / s)];
  };

  function draw() {
    const prompts = read();
    const n = Math.max(prompts?.length || 0, state.subject + 1);
    if (subjects.options.length !== n) {
      subjects.replaceChildren(...Array.from({ length: n }, (_, i) => el("option", { value: i, textContent: `subject ${i + 1}` })));
    }
    subjects.value = String(state.subject);
    const ctx = canvas.getContext("2d");
    if (state.img.naturalWidth) {
      const h = Math.round((state.img.naturalHeight * canvas.width) / state.img.naturalWidth);
      if (canvas.height !== h) canvas.height = h;
      ctx.drawImage(state.img, 0, 0, canvas.width, canvas.height);
      info.textContent = "";
    } else {
      ctx.fillStyle = "#222";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      info.textContent = "connect a LoadImage to pick on the picture";
    }
    if (prompts === null) { info.textContent = "subject_prompts is not valid JSON"; return; }
    const s = scale();
    prompts.forEach((p, i) => {
      const c = COLORS[i % COLORS.length];
      ctx.strokeStyle = ctx.fillStyle = c;
      ctx.lineWidth = i === state.subject ? 3 : 1.5;
      if (Array.isArray(p.box) && p.box.length === 4) {
        const [x0, y0, x1, y1] = p.box.map((v) => v * s);
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
        ctx.fillText(String(i + 1), x0 + 3, y0 + 11);
      }
      (p.points || []).forEach((pt, k) => {
        const neg = (p.labels || [])[k] === 0;
        ctx.beginPath();
        ctx.arc(pt[0] * s, pt[1] * s, 4, 0, 2 * Math.PI);
        neg ? ctx.stroke() : ctx.fill();
      });
    });
    if (state.drag) {
      const [a, b] = [state.drag.from, state.drag.to].map(([u, v]) => [u * s, v * s]);
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = COLORS[state.subject % COLORS.length];
      ctx.strokeRect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
      ctx.setLineDash([]);
    }
  }

  function refreshImage() {
    const src = upstreamImageUrl(node);
    if (src === state.src) return;
    state.src = src;
    if (src) { state.img = new Image(); state.img.onload = draw; state.img.src = src; } else { state.img = new Image(); draw(); }
  }

  const edit = (fn) => {
    const prompts = read();
    if (prompts === null) return;
    while (prompts.length <= state.subject) prompts.push({});
    fn(prompts[state.subject]);
    write(prompts.map((p) => {
      const q = {};
      if (Array.isArray(p.box)) q.box = p.box;
      if (p.points?.length) { q.points = p.points; q.labels = p.labels; }
      return q;
    }));
  };
  canvas.addEventListener("pointerdown", (ev) => {
    ev.stopPropagation();
    const at = toImage(ev);
    if (state.mode === "box") { state.drag = { from: at, to: at }; canvas.setPointerCapture?.(ev.pointerId); return; }
    edit((p) => {
      const points = p.points || [];
      const labels = p.labels?.length === points.length ? p.labels : points.map(() => 1);
      p.points = [...points, at];
      p.labels = [...labels, state.mode === "neg" ? 0 : 1];
    });
  });
  canvas.addEventListener("pointermove", (ev) => { if (state.drag) { state.drag.to = toImage(ev); draw(); } });
  canvas.addEventListener("pointerup", (ev) => {
    if (!state.drag) return;
    const { from, to } = state.drag;
    state.drag = null;
    if (Math.abs(to[0] - from[0]) < 3 || Math.abs(to[1] - from[1]) < 3) { draw(); return; }
    edit((p) => { p.box = [Math.min(from[0], to[0]), Math.min(from[1], to[1]), Math.max(from[0], to[0]), Math.max(from[1], to[1])]; });
  });
  subjects.addEventListener("change", () => { state.subject = Number(subjects.value); draw(); });
  mode.addEventListener("change", () => { state.mode = mode.value; });
  add.addEventListener("click", () => { state.subject = (read()?.length || 0); draw(); });
  clear.addEventListener("click", () => edit((p) => { delete p.box; delete p.points; delete p.labels; }));

  node.dynasynPicker = { canvas, draw, refreshImage, setSubject: (i) => { state.subject = i; draw(); },
                         setMode: (m) => { state.mode = m; mode.value = m; } };
  addPanel(node, "sam_picker", box, 280);
  const timer = setInterval(refreshImage, 1000); // the upstream image can change at any time
  const removed = node.onRemoved;
  node.onRemoved = function () { clearInterval(timer); return removed?.apply(this, arguments); };
  const changed = widget.callback;
  widget.callback = function () { const r = changed?.apply(this, arguments); draw(); return r; };
  refreshImage();
  draw();
}

// ---------------------------------------------------------------- LLM model list
// LLM Settings (and Describe / Prompts): a button that asks the server which models the endpoint offers
// (/dynasyn/llm_models: the pack's route applies the LLM calls' URL and key rules) and lets you pick one.
const hasEndpointAndModel = (nodeData) =>
  ["endpoint", "model"].every((n) => nodeData.input?.required?.[n]?.[0] === "STRING");

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);

async function fetchModels(endpoint) {
  const r = await api.fetchApi("/dynasyn/llm_models", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ endpoint }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  if (!body.models?.length) throw new Error(`${endpoint} offers no model list: type the model name.`);
  return body.models;
}

function addModelPicker(node) {
  const button = node.addWidget("button", "list the server's models", null, async () => {
    const endpoint = node.widgets.find((w) => w.name === "endpoint")?.value;
    const model = node.widgets.find((w) => w.name === "model");
    node.dynasynModels = { pending: true };
    try {
      const models = await fetchModels(endpoint);
      node.dynasynModels = { models };
      const [clientX, clientY] = app.canvas?.last_mouse_position ?? [200, 200];
      // The menu puts each entry's title into innerHTML, and the names come from whatever server the endpoint
      // names (a shared workflow's): escaped, a name like <img onerror=…> is shown as text, never run.
      const entries = models.map((name) => ({ content: name, title: escapeHtml(name), name }));
      new LiteGraph.ContextMenu(entries, {
        title: "models at the endpoint", event: new MouseEvent("click", { clientX, clientY }),
        callback: (picked) => {
          if (typeof picked?.name !== "string") return;
          model.value = picked.name; model.callback?.(picked.name); node.setDirtyCanvas(true, true);
        },
      });
    } catch (e) {
      node.dynasynModels = { error: String(e.message || e) };
      app.extensionManager?.toast?.add({ severity: "warn", summary: "DynASyn", detail: node.dynasynModels.error, life: 8000 });
    }
  }, { serialize: false });
  button.serialize = false;  // never in widgets_values nor in the prompt
}

// ---------------------------------------------------------------- seeds
// The pack's seeds say control_after_generate: false (a node that trains or generates for minutes must not get
// a new seed, and retrain, on every Queue), so the frontend gives them no "control after generate" widget.
// Workflows saved before that hold its value ("fixed", "randomize", …) right after the seed: drop it, so every
// later value lands on its own widget again.
const CONTROL_VALUES = new Set(["fixed", "increment", "decrement", "randomize"]);
function fixedSeedNames(nodeData) {
  return ["required", "optional"].flatMap((section) => Object.entries(nodeData.input?.[section] || {}))
    .filter(([, spec]) => spec?.[0] === "INT" && spec?.[1]?.control_after_generate === false).map(([name]) => name);
}

function dropStaleSeedControl(node, values, seeds) {
  const saved = node.widgets?.filter((w) => w.serialize !== false).length ?? 0;  // panels (charts…) are not saved
  if (!Array.isArray(values) || values.length !== saved + 1) return values;
  for (const name of seeds) {
    const i = node.widgets.findIndex((w) => w.name === name);
    if (i >= 0 && CONTROL_VALUES.has(values[i + 1])) return [...values.slice(0, i + 1), ...values.slice(i + 2)];
  }
  return values;
}

// ---------------------------------------------------------------- registration
// A second copy of the pack (two folders in custom_nodes) must not break the page.
if (!app.extensions?.some?.((e) => e.name === "DynASyn.ui")) app.registerExtension({
  name: "DynASyn.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    const seeds = name.startsWith("DynASyn") ? fixedSeedNames(nodeData) : [];
    if (seeds.length) {
      const configure = nodeType.prototype.configure;
      nodeType.prototype.configure = function (info) {
        if (info?.widgets_values) info.widgets_values = dropStaleSeedControl(this, info.widgets_values, seeds);
        return configure.apply(this, arguments);
      };
    }
    const trains = name === "DynASynTrain" || name === "DynASynContinueTraining";  // both send dynasyn.train events
    const picksModels = name.startsWith("DynASyn") && hasEndpointAndModel(nodeData);
    if (!trains && !picksModels && name !== "DynASynSAMMasks" && !GALLERY_NODES.has(name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      if (picksModels) addModelPicker(this);
      else if (trains) addLossChart(this);
      else if (name === "DynASynSAMMasks") addSamPicker(this);
      else addGallery(this);
      return r;
    };
    if (GALLERY_NODES.has(name)) {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = executed?.apply(this, arguments);
        if (message?.dynasyn_gallery) showGallery(this, message.dynasyn_gallery);
        return r;
      };
    }
    if (name === "DynASynSAMMasks") {
      const configured = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = configured?.apply(this, arguments);
        setTimeout(() => { this.dynasynPicker?.refreshImage(); this.dynasynPicker?.draw(); }, 0);
        return r;
      };
    }
  },
});
