// The try-the-model page: pick a model (GET /v1/models), upload one image to its explain
// route, show the label, the class probabilities, the in-distribution verdict and the
// evidence map; show the model's recent answers against its validation data, and its card.
// No external assets. With API keys set on the server, the key typed here is kept in this
// tab's sessionStorage and sent as "Authorization: Bearer <key>".
"use strict";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("medcae-key") || "";

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function askForKey(message) {
  $("key-row").classList.add("show");
  status(message, true);
  $("key").focus();
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

// A small Markdown subset: headings, bullet lists, tables, bold, code, paragraphs.
function renderMarkdown(md) {
  const inline = (s) => escapeHtml(s)
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/`([^`]+)`/g, "<code>$1</code>");
  const out = [];
  const lines = md.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const h = /^(#{1,6})\s+(.*)$/.exec(line);
    if (h) { const n = Math.min(h[1].length + 1, 3); out.push(`<h${n}>${inline(h[2])}</h${n}>`); i++; continue; }
    if (/^\s*[-*]\s+/.test(line)) {
      out.push("<ul>");
      while (i < lines.length && /^\s*[-*]\s+/.test(lines[i])) { out.push(`<li>${inline(lines[i].replace(/^\s*[-*]\s+/, ""))}</li>`); i++; }
      out.push("</ul>"); continue;
    }
    if (/^\s*\|/.test(line)) {
      const rows = [];
      while (i < lines.length && /^\s*\|/.test(lines[i])) { rows.push(lines[i]); i++; }
      const cells = (r) => r.trim().replace(/^\||\|$/g, "").split("|").map((c) => inline(c.trim()));
      const body = rows.filter((r) => !/^\s*\|?\s*:?-{2,}/.test(r));
      out.push("<table>");
      body.forEach((r, n) => { const tag = n === 0 ? "th" : "td"; out.push("<tr>" + cells(r).map((c) => `<${tag}>${c}</${tag}>`).join("") + "</tr>"); });
      out.push("</table>"); continue;
    }
    if (line.trim()) { out.push(`<p>${inline(line)}</p>`); }
    i++;
  }
  return out.join("\n");
}

// The model the page talks to: one of GET /v1/models (null until listed: the default routes).
let current = null;
let modelInfo = null;

const DEFAULT_ROUTES = {"": "/v1/model", card: "/v1/model/card", explain: "/v1/explain", predict: "/v1/predict"};

function route(path) {
  if (current === null) return DEFAULT_ROUTES[path] || "/v1/model";
  return "/v1/models/" + encodeURIComponent(current) + (path ? "/" + path : "");
}

async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (r.status === 401 || r.status === 403) { $("model-id").textContent = "API key needed"; askForKey("This server needs an API key."); return; }
  if (!r.ok) { $("model-id").textContent = "models unavailable (" + r.status + ")"; return; }
  const listed = await r.json();
  const pick = $("model-pick");
  pick.innerHTML = "";
  listed.models.forEach((m) => {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = m.name + (m.default ? " (default)" : "");
    pick.appendChild(opt);
  });
  current = listed.models.some((m) => m.name === current) ? current : listed["default"];
  pick.value = current;
  pick.parentElement.classList.toggle("hidden", listed.models.length < 2);
  await loadModel();
}

async function loadModel() {
  const r = await fetch(route(""), {headers: headers()});
  if (r.status === 401 || r.status === 403) { $("model-id").textContent = "API key needed"; askForKey("This server needs an API key."); return; }
  if (!r.ok) { $("model-id").textContent = "model unavailable (" + r.status + ")"; return; }
  const info = await r.json();
  modelInfo = info;
  $("model-id").textContent = info.id + " version " + info.version;
  loadWho();
  const c = await fetch(route("card"), {headers: headers()});
  $("card").innerHTML = c.ok ? renderMarkdown(await c.text()) : "<p>No model card (" + c.status + ").</p>";
  await loadStats();
}

const pct = (x) => (100 * x).toFixed(1) + "%";

async function loadStats() {
  const box = $("stats");
  const r = await fetch(route("stats"), {headers: headers()});
  if (!r.ok) { box.textContent = "No statistics (" + r.status + ")."; return; }
  const s = await r.json();
  if (!s.answers) { box.innerHTML = '<p class="note">No answers yet on this replica.</p>'; return; }
  const row = (name, v) => `<tr><td>${escapeHtml(name)}</td><td>${pct(v.observed)}</td><td>${pct(v.expected)}</td>` +
    `<td>${v.flagged ? '<span class="flag">outside the band</span>' : "within &plusmn;" + pct(v.band)}</td></tr>`;
  const labels = Object.entries(s.labels).map(([name, v]) => row(name, v)).join("");
  const verdict = !s.enough_answers ? `<p class="note">Too few answers to flag drift (${s.answers}).</p>`
    : s.flagged ? '<p class="flag">The recent answers do not look like the validation data: check the images coming in.</p>'
    : '<p class="note">The recent answers look like the validation data.</p>';
  box.innerHTML = `<p>Last ${s.answers} answers of version ${escapeHtml(s.version)} (window ${s.window}).</p>` + verdict +
    "<table><tr><th></th><th>seen</th><th>validation</th><th></th></tr>" + row("out of distribution", s.ood) + labels + "</table>";
}

function showResult(body, file) {
  const p = body.prediction, e = body.explanation;
  $("label").textContent = p.label;
  const bars = $("bars");
  bars.innerHTML = "";
  const entries = Object.entries(p.probabilities);
  if (!p.findings) entries.sort((a, b) => b[1] - a[1]);  // findings keep their order
  entries.forEach(([name, prob]) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span class="val"></span>`;
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = (100 * prob).toFixed(1) + "%";
    row.querySelector(".val").textContent = (100 * prob).toFixed(1) + "%";
    const t = p.thresholds ? p.thresholds[name] : (name === p.positive ? p.threshold : null);
    if (t != null) {  // the operating point on its class's (or finding's) bar
      const mark = document.createElement("span");
      mark.className = "threshold";
      mark.style.left = (100 * Math.min(1, t)).toFixed(1) + "%";
      mark.title = `threshold ${(100 * t).toFixed(1)}%`;
      row.querySelector(".track").appendChild(mark);
    }
    if (p.findings) {
      row.classList.add(p.findings[name] ? "present" : "absent");
      row.querySelector(".name").textContent = (p.findings[name] ? "\u2713 " : "") + name;
    }
    bars.appendChild(row);
  });
  $("decision").textContent = p.findings
    ? "Each finding is present (\u2713) when its probability is at or above its own threshold (the mark on its bar), chosen on validation; an image may have several findings, or none."
    : p.threshold != null
    ? `"${p.positive}" when its probability is at least ${(100 * p.threshold).toFixed(1)}% (the operating point chosen on validation; the mark on its bar).`
    : "The most probable class.";
  const ood = $("ood");
  const err = p.reconstruction_error.toFixed(4);
  const thr = e ? e.ood_threshold.toFixed(4) : "the bundle's";
  ood.className = p.in_distribution ? "in" : "out";
  ood.textContent = p.in_distribution
    ? `In distribution: reconstruction error ${err} is within the threshold ${thr} (99th percentile on validation).`
    : `Out of distribution: reconstruction error ${err} is above the threshold ${thr}; this image is unlike the training data, do not trust the label.`;
  const heat = $("heat").parentElement;
  if (e) {
    $("view").src = "data:image/png;base64," + e.image_png;
    $("heat").src = "data:image/png;base64," + e.heatmap_png;
    $("heat-caption").textContent = `Evidence for "${e.label}" (${e.contributions.length}x${e.contributions[0].length} cells, ${e.pool})`;
    heat.classList.remove("hidden");
  } else {  // this model's representation keeps no locations: no map, the file as it is
    $("view").src = URL.createObjectURL(file);
    heat.classList.add("hidden");
  }
  $("result").classList.remove("hidden");
}

async function classify(file) {
  status("Classifying " + file.name + "...");
  $("result").classList.add("hidden");
  let r;
  try {
    r = await fetch(route("explain"), {method: "POST", body: file, headers: headers({"Content-Type": file.type || "application/octet-stream"})});
  } catch (err) { status("The server did not answer: " + err, true); return; }
  let body = null;
  try { body = await r.json(); } catch (err) { body = null; }
  if (r.status === 401 || r.status === 403) { askForKey((body && body.detail) || "API key needed."); return; }
  if (r.status === 422 && body && body.error === "no_explanation") {
    r = await fetch(route("predict"), {method: "POST", body: file, headers: headers({"Content-Type": file.type || "application/octet-stream"})});
    body = r.ok ? await r.json() : null;
    if (!r.ok) { status(`Refused (${r.status})`, true); return; }
    status(file.name + ": done (this model's representation has no evidence map).");
    showResult(body, file);
    loadStats();
    return;
  }
  if (!r.ok) { status(`Refused (${r.status}): ` + ((body && body.detail) || r.statusText), true); return; }
  status(`${file.name}: answered by ${body.model} version ${body.version}.`);
  showResult(body, file);
  loadStats();
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); if (ev.dataTransfer.files.length) classify(ev.dataTransfer.files[0]); });
$("file").addEventListener("change", () => { if ($("file").files.length) classify($("file").files[0]); });
$("key-save").addEventListener("click", () => {
  key = $("key").value.trim();
  sessionStorage.setItem("medcae-key", key);
  $("key-row").classList.remove("show");
  status("Key set.");
  loadModels();
  if ($("file").files.length) classify($("file").files[0]);
});
$("model-pick").addEventListener("change", () => { current = $("model-pick").value; $("result").classList.add("hidden"); loadModel(); });
// ---------------------------------------------------------------- the Label view
// For a key with the role "label" (or "admin") on a model served with a pool: the queue one
// large image at a time, a button and a number key per class (findings: toggle, then Enter),
// skip (S), undo (U), progress per class; for "admin": Train with the job's progress, the
// challenger against the champion, Promote.

let who = null, queue = [], shown = null, lastLabeled = null, chosen = new Set(), jobTimer = null;

async function loadWho() {
  const r = await fetch("/v1/whoami", {headers: headers()});
  if (!r.ok) { $("tabs").classList.add("hidden"); return; }
  who = await r.json();
  const can = (who.role === "label" || who.role === "admin") && who.labeling.includes(current);
  $("tabs").classList.toggle("hidden", !can);
  if (!can) showView("predict");
  else if (!$("label-view").classList.contains("hidden")) startLabeling();
}

function showView(name) {
  $("predict-view").classList.toggle("hidden", name !== "predict");
  $("label-view").classList.toggle("hidden", name !== "label");
  $("tab-predict").classList.toggle("on", name === "predict");
  $("tab-label").classList.toggle("on", name === "label");
}

function labStatus(text, error) { $("lab-status").textContent = text; $("lab-status").className = error ? "error" : ""; }

function classButtons() {
  const box = $("lab-buttons");
  box.innerHTML = "";
  const multi = modelInfo.task === "multilabel";
  modelInfo.label_names.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.label = name;
    b.innerHTML = (i < 9 ? `<kbd>${i + 1}</kbd> ` : "") + escapeHtml(name);
    b.addEventListener("click", () => multi ? toggle(name) : submit(name));
    box.appendChild(b);
  });
  if (multi) {
    const none = document.createElement("button");
    none.type = "button"; none.dataset.label = "No Finding"; none.innerHTML = "<kbd>0</kbd> No finding";
    none.addEventListener("click", () => submit("No Finding"));
    const save = document.createElement("button");
    save.type = "button"; save.id = "lab-save"; save.innerHTML = "<kbd>Enter</kbd> Save findings";
    save.addEventListener("click", () => submit(chosen.size ? [...chosen].join("|") : "No Finding"));
    box.appendChild(none); box.appendChild(save);
  }
}

function toggle(name) {
  if (chosen.has(name)) chosen.delete(name); else chosen.add(name);
  document.querySelectorAll("#lab-buttons button").forEach((b) => b.classList.toggle("chosen", chosen.has(b.dataset.label)));
}

async function startLabeling() {
  $("lab-who").textContent = `(${who.name}, ${who.role})`;
  $("admin").classList.toggle("hidden", who.role !== "admin");
  classButtons();
  queue = []; shown = null;
  await nextImage();
  if (who.role === "admin") { loadCompare(); loadJobs(); }
}

async function fillQueue() {
  const r = await fetch(route("queue") + "?k=5", {headers: headers()});
  const body = await r.json().catch(() => null);
  if (!r.ok) { labStatus(`Queue refused (${r.status}): ` + ((body && body.detail) || ""), true); return; }
  queue = queue.concat(body.images.filter((im) => !queue.some((q) => q.image_id === im.image_id)));
  showProgress(body.progress, body.version);
}

async function nextImage() {
  if (!queue.length) await fillQueue();
  shown = queue.shift() || null;
  chosen = new Set();
  document.querySelectorAll("#lab-buttons button").forEach((b) => b.classList.remove("chosen"));
  if (!shown) { $("lab-image").removeAttribute("src"); $("lab-suggested").textContent = ""; labStatus("Nothing left to label in the pool."); return; }
  const r = await fetch(route("pool/" + shown.image_id), {headers: headers()});
  if (!r.ok) { labStatus(`Image ${shown.image_id} unavailable (${r.status}); skipped.`, true); shown = null; return nextImage(); }
  $("lab-image").src = URL.createObjectURL(await r.blob());
  $("lab-image").dataset.imageId = shown.image_id;
  const best = Object.entries(shown.proba).sort((a, b) => b[1] - a[1])[0];
  $("lab-suggested").textContent = `Image ${shown.image_id}. The model says ${shown.predicted} (${pct(best[1])}): label what you see.`;
}

async function submit(label) {
  if (!shown) return;
  const image = shown;
  const r = await fetch(route("labels"), {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify({image_id: image.image_id, label: label})});
  const body = await r.json().catch(() => null);
  if (r.status !== 201) { labStatus(`Not saved (${r.status}): ` + ((body && body.detail) || ""), true); return; }
  lastLabeled = image;
  $("lab-undo").disabled = false;
  labStatus(`Saved: ${label} (${image.image_id}).`);
  await nextImage();
  refreshProgress();
}

async function skip() {
  if (!shown) return;
  await fetch(route("skip"), {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify({image_id: shown.image_id})});
  labStatus(`Skipped ${shown.image_id}.`);
  await nextImage();
}

async function undo() {
  if (!lastLabeled) return;
  const image = lastLabeled;
  const r = await fetch(route("labels"), {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify({image_id: image.image_id, label: ""})});
  if (r.status !== 201) { labStatus(`Undo refused (${r.status}).`, true); return; }
  lastLabeled = null;
  $("lab-undo").disabled = true;
  if (shown) queue.unshift(shown);
  queue.unshift(image);
  labStatus(`Undone: ${image.image_id} is unlabeled again.`);
  await nextImage();
  refreshProgress();
}

async function refreshProgress() {
  const r = await fetch(route("progress"), {headers: headers()});
  if (r.ok) { const p = await r.json(); showProgress(p, p.version); }
}

function showProgress(p, version) {
  const rows = Object.entries(p.per_class).map(([n, c]) => `<tr><td>${escapeHtml(n)}</td><td>${c}</td></tr>`).join("");
  $("lab-progress").innerHTML = `<p>${p.labeled} labeled of ${p.pool} in the pool` + (p.left != null ? `; ${p.left} left to label` : "") +
    ` (queue ranked by version ${escapeHtml(String(version))}).</p><table class="plain"><tr><th>label</th><th>labeled</th></tr>${rows}</table>`;
}

function showJob(job) {
  const box = $("job");
  const done = ["SUCCEEDED", "FAILED", "STOPPED"].includes(job.state);
  box.className = job.state === "FAILED" || job.state === "STOPPED" ? "error" : "";
  box.textContent = `Job ${job.job_id}: ${job.state} after ${Math.round(job.seconds)} s` +
    (job.progress ? ` \u2014 ${job.progress}` : "") + (job.message ? ` \u2014 ${job.message}` : "") +
    (job.version ? ` \u2014 version ${job.version}` : "");
  $("train").disabled = !done;
  if (!done) { clearTimeout(jobTimer); jobTimer = setTimeout(() => pollJob(job.job_id), 2000); }
  else if (job.state === "SUCCEEDED") loadCompare();
}

async function pollJob(id) {
  const r = await fetch("/v1/jobs/" + encodeURIComponent(id), {headers: headers()});
  if (r.ok) showJob(await r.json()); else jobTimer = setTimeout(() => pollJob(id), 4000);
}

async function loadJobs() {
  const r = await fetch(route("jobs"), {headers: headers()});
  if (!r.ok) return;
  const jobs = (await r.json()).jobs;
  if (jobs.length) showJob(jobs[0]);
}

async function train() {
  $("train").disabled = true;
  const r = await fetch(route("train"), {method: "POST", headers: headers()});
  const body = await r.json().catch(() => null);
  if (r.status === 202) { showJob(body); return; }
  $("train").disabled = r.status === 409;
  $("job").className = "error";
  $("job").textContent = `Train refused (${r.status}): ` + ((body && body.detail) || "");
}

function metricCell(m) {
  if (!m) return "\u2014";
  const v = typeof m === "number" ? m : m.value;
  const ci = m && m.ci ? ` [${m.ci[0].toFixed(3)}, ${m.ci[1].toFixed(3)}]` : "";
  return v == null ? "\u2014" : v.toFixed(3) + ci;
}

async function loadCompare() {
  const r = await fetch(route("compare"), {headers: headers()});
  const box = $("compare"), promote = $("promote");
  if (!r.ok) { box.textContent = r.status === 404 ? "No challenger yet: train one." : `Comparison unavailable (${r.status}).`; promote.classList.add("hidden"); return; }
  const c = await r.json();
  const cmp = c.comparison || {};
  const ch = cmp.challenger || {}, cp = cmp.champion || {};
  const row = (name, a, b) => `<tr><td>${name}</td><td>${metricCell(a)}</td><td>${metricCell(b)}</td></tr>`;
  const test = (cmp.tests || []).map((t) => `${escapeHtml(t.class)}: ${t.difference >= 0 ? "+" : ""}${t.difference.toFixed(3)} (DeLong p=${t.p == null || isNaN(t.p) ? "n/a" : t.p.toPrecision(2)})`).join("; ");
  box.innerHTML = `<table class="plain"><tr><th></th><th>champion v${escapeHtml(String(c.compared_with || c.champion))}</th><th>challenger v${escapeHtml(String(c.challenger))}</th></tr>` +
    row("AUC [95% CI]", cp.auc, ch.auc) + row("accuracy [95% CI]", cp.accuracy, ch.accuracy) + row("balanced accuracy", cp.balanced_accuracy, ch.balanced_accuracy) +
    `</table><p class="note">On the same ${cmp.n || "?"} held-out images (the champion's test split and ${cmp.held_out != null ? cmp.held_out : "?"} of the new labels, held out). AUC difference: ${test || "n/a"}.</p>` +
    (c.promoted ? `<p class="better">Version ${escapeHtml(String(c.challenger))} is the champion.</p>` : !c.current ? `<p class="note">Compared with version ${escapeHtml(String(c.compared_with))}, no longer the champion (${escapeHtml(String(c.champion))}).</p>` : "");
  promote.textContent = `Promote version ${c.challenger}`;
  promote.dataset.version = c.challenger;
  promote.classList.toggle("hidden", c.promoted);
}

async function promote() {
  const version = $("promote").dataset.version;
  const r = await fetch(route("promote"), {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify({version: version})});
  const body = await r.json().catch(() => null);
  if (!r.ok) { $("compare").insertAdjacentHTML("beforeend", `<p class="flag">Promote refused (${r.status}): ${escapeHtml((body && body.detail) || "")}</p>`); return; }
  await loadModel();  // the predict view's header names the new champion
  await loadCompare();
  queue = []; await nextImage();  // the queue is ranked by the new version
}

$("tab-predict").addEventListener("click", () => showView("predict"));
$("tab-label").addEventListener("click", () => { showView("label"); startLabeling(); });
$("lab-skip").addEventListener("click", skip);
$("lab-undo").addEventListener("click", undo);
$("train").addEventListener("click", train);
$("promote").addEventListener("click", promote);
document.addEventListener("keydown", (ev) => {
  if ($("label-view").classList.contains("hidden") || ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const names = modelInfo ? modelInfo.label_names : [];
  const multi = modelInfo && modelInfo.task === "multilabel";
  const n = parseInt(ev.key, 10);
  if (n >= 1 && n <= Math.min(9, names.length)) { ev.preventDefault(); multi ? toggle(names[n - 1]) : submit(names[n - 1]); }
  else if (multi && ev.key === "0") { ev.preventDefault(); submit("No Finding"); }
  else if (multi && ev.key === "Enter") { ev.preventDefault(); submit(chosen.size ? [...chosen].join("|") : "No Finding"); }
  else if (ev.key === "s" || ev.key === "S") { ev.preventDefault(); skip(); }
  else if (ev.key === "u" || ev.key === "U") { ev.preventDefault(); undo(); }
});

loadModels();
