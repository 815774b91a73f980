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
  $("model-id").textContent = info.id + " version " + info.version;
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
loadModels();
