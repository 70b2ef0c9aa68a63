// The web page of serve.py: plain JavaScript, no build step, no network beyond this server.
// Images are sent one per request (at most PARALLEL at once), so the server's batcher groups them.
"use strict";

const PARALLEL = 4;
const IMAGE_EXT = /\.(jpe?g|png|bmp|tiff?|webp|gif|ppm|pgm|pbm)$/i;
const $ = (id) => document.getElementById(id);

const state = {
  items: [],          // {id, name, file, url, status, result, cams: {type: base64}, error, el}
  queue: [],          // [item, camType|null, isCamOnly]
  inflight: 0,
  info: null,
  view: "grid",
  slide: 0,
  timer: null,
};

// ------------------------------------------------------------------------------ server calls
function headers() {
  const key = $("api-key").value || sessionStorage.getItem("serve-api-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (response.status === 401) {
    $("key-box").hidden = false;
    message("this server needs an API key: type it at the top, then choose the images again");
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadInfo() {
  try {
    const info = await api("/info");
    state.info = info;
    const workers = info.mode === "redis" ? `, ${info.workers} worker(s) via Redis` : "";
    $("model").textContent = `${info.model_name} (${info.model_type}${workers}), ${info.num_classes} classes, ` +
      `${info.image_size} px`;
    const select = $("cam-type");
    select.innerHTML = "";
    for (const t of info.cam_types || []) select.add(new Option(t, t));
    $("cam-toggle").disabled = !(info.cam_types || []).length;
    if ($("cam-toggle").disabled) $("cam-toggle").parentElement.title = "CAM overlays need a torch model";
  } catch (err) {
    $("model").textContent = "model: " + err.message;
  }
}

// ------------------------------------------------------------------------------ adding images
function isImage(file) {
  return file.type.startsWith("image/") || IMAGE_EXT.test(file.name);
}

function addFiles(files) {
  const added = [];
  for (const file of files) {
    if (!isImage(file)) continue;
    const item = {
      id: state.items.length, name: file.webkitRelativePath || file.relPath || file.name, file,
      url: URL.createObjectURL(file), status: "queued", result: null, cams: {}, error: null, el: null,
    };
    state.items.push(item);
    added.push(item);
    renderCard(item);
    state.queue.push([item, camWanted(), false]);
  }
  if (!added.length && files.length) message("no image among the chosen files");
  updateStats();
  pump();
}

async function filesOfEntry(entry, prefix = "") {
  if (entry.isFile) {
    const file = await new Promise((ok, bad) => entry.file(ok, bad));
    file.relPath = prefix + file.name;
    return [file];
  }
  const reader = entry.createReader();
  const out = [];
  for (;;) {  // readEntries returns at most ~100 entries per call
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    for (const child of batch) out.push(...await filesOfEntry(child, prefix + entry.name + "/"));
  }
  return out;
}

async function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const entries = [...event.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) { addFiles(event.dataTransfer.files); return; }
  const files = [];
  for (const entry of entries) files.push(...await filesOfEntry(entry));
  addFiles(files);
}

// ------------------------------------------------------------------------------ predicting
function camWanted() {
  return $("cam-toggle").checked ? $("cam-type").value : null;
}

function pump() {
  while (state.inflight < PARALLEL && state.queue.length) {
    const [item, cam, camOnly] = state.queue.shift();
    state.inflight++;
    send(item, cam, camOnly).finally(() => { state.inflight--; pump(); });
  }
}

async function send(item, cam, camOnly) {
  const form = new FormData();
  form.append("file", item.file, item.file.name);
  if (!camOnly) item.status = "running";
  try {
    const body = await api("/predict" + (cam ? "?cam=" + encodeURIComponent(cam) : ""), { method: "POST", body: form });
    const result = body.results[0];
    if (result.cam) item.cams[result.cam.type] = result.cam.png;
    if (!camOnly) { item.result = result; item.status = "done"; item.time_ms = body.time_ms; }
  } catch (err) {
    if (!camOnly) { item.status = "error"; item.error = err.message; } else message(err.message);
  }
  renderCard(item);
  if (state.view === "slides") renderSlide();
  updateStats();
}

// ------------------------------------------------------------------------------ drawing
function bars(result) {
  const box = document.createElement("div");
  box.className = "bars";
  for (const t of result.top) {
    const row = document.createElement("div");
    row.className = "bar";
    const pct = (100 * t.prob).toFixed(1);
    row.innerHTML = `<span class="cls"></span><span class="track"><span class="fill" style="width:${pct}%;display:block">` +
      `</span></span><span class="pct">${pct}%</span>`;
    row.querySelector(".cls").textContent = t.class;
    row.querySelector(".cls").title = t.class;
    box.append(row);
  }
  return box;
}

function picture(item) {
  const img = document.createElement("img");
  img.className = "pic";
  const cam = $("cam-toggle").checked && item.cams[$("cam-type").value];
  img.src = cam ? "data:image/png;base64," + cam : item.url;
  img.alt = item.name;
  if (cam) img.classList.add("cam");
  return img;
}

function describe(item, box) {
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = item.name;
  name.title = item.name;
  box.append(picture(item), name);
  if (item.status === "done") {
    const top = document.createElement("div");
    top.className = "top1";
    // serve.py --reject: an image of no trained class is "unknown"; top[0] is the nearest trained class
    top.textContent = item.result.unknown
      ? `unknown (nearest: ${item.result.top[0].class} ${(100 * item.result.prob).toFixed(1)}%)`
      : `${item.result.class} ${(100 * item.result.prob).toFixed(1)}%`;
    if (item.result.uncertain) {
      const mark = document.createElement("span");
      mark.className = "uncertain-mark";
      mark.textContent = "uncertain";
      top.append(mark);
    }
    box.append(top, bars(item.result));
  } else if (item.status === "error") {
    const err = document.createElement("div");
    err.className = "err";
    err.textContent = item.error;
    box.append(err);
  } else {
    const wait = document.createElement("div");
    wait.textContent = item.status + "…";
    box.append(wait);
  }
}

function renderCard(item) {
  if (!item.el) {
    item.el = document.createElement("div");
    item.el.className = "card";
    item.el.dataset.name = item.name;
    item.el.addEventListener("click", () => { state.slide = item.id; setView("slides"); });
    $("grid").append(item.el);
  }
  item.el.replaceChildren();
  item.el.dataset.status = item.status;
  item.el.classList.toggle("error", item.status === "error");
  describe(item, item.el);
}

function renderAll() {
  for (const item of state.items) renderCard(item);
  if (state.view === "slides") renderSlide();
}

function updateStats() {
  const done = state.items.filter((i) => i.status === "done");
  $("stat-done").textContent = done.length;
  $("stat-total").textContent = state.items.length;
  $("stat-errors").textContent = state.items.filter((i) => i.status === "error").length;
  $("stat-uncertain").textContent = done.filter((i) => i.result.uncertain).length;
  $("stat-conf").textContent = done.length
    ? (100 * done.reduce((s, i) => s + i.result.prob, 0) / done.length).toFixed(1) + "%" : "–";
  const counts = new Map();
  for (const i of done) counts.set(i.result.class, (counts.get(i.result.class) || 0) + 1);
  const body = $("stat-classes").tBodies[0];
  body.replaceChildren();
  for (const [cls, n] of [...counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))) {
    const row = body.insertRow();
    row.insertCell().textContent = cls;
    row.insertCell().textContent = n;
    row.dataset.class = cls;
  }
  $("download-csv").disabled = !done.length;
}

// ------------------------------------------------------------------------------ slideshow
function setView(view) {
  state.view = view;
  $("grid").hidden = view !== "grid";
  $("slides").hidden = view !== "slides";
  $("view-grid").classList.toggle("active", view === "grid");
  $("view-slides").classList.toggle("active", view === "slides");
  if (view === "slides") renderSlide(); else pause();
}

function renderSlide() {
  const n = state.items.length;
  $("slide-pos").textContent = n ? `${state.slide + 1} / ${n}` : "0 / 0";
  const box = $("slide");
  box.replaceChildren();
  if (!n) return;
  state.slide = Math.min(Math.max(state.slide, 0), n - 1);
  describe(state.items[state.slide], box);
}

function step(by) {
  const n = state.items.length;
  if (!n) return;
  state.slide = (state.slide + by + n) % n;
  renderSlide();
}

function play() {
  pause();
  state.timer = setInterval(() => step(1), Number($("interval").value));
  $("play").textContent = "pause";
}

function pause() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  $("play").textContent = "play";
}

// ------------------------------------------------------------------------------ CSV
function csvCell(value) {
  const text = String(value);
  return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function csvText() {
  const done = state.items.filter((i) => i.status === "done");
  const k = Math.min(5, state.info ? state.info.num_classes : (done[0] ? done[0].result.top.length : 5));
  const head = ["path", "class", "prob"];
  for (let j = 1; j <= k; j++) head.push(`top${j}_class`, `top${j}_prob`);
  head.push("entropy", "uncertain");
  const lines = [head.join(",")];
  for (const i of done) {
    const r = i.result;
    const row = [i.name, r.class, r.prob.toFixed(6)];
    for (let j = 0; j < k; j++) row.push(r.top[j] ? r.top[j].class : "", r.top[j] ? r.top[j].prob.toFixed(6) : "");
    row.push(r.entropy.toFixed(6), r.uncertain ? 1 : 0);
    lines.push(row.map(csvCell).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

function downloadCsv() {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([csvText()], { type: "text/csv" }));
  link.download = "predictions.csv";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ------------------------------------------------------------------------------ wiring
function message(text) {
  $("message").textContent = text;
}

function camToggled() {
  const cam = camWanted();
  if (cam) {
    for (const item of state.items) {
      if (item.status === "done" && !item.cams[cam]) state.queue.push([item, cam, true]);
    }
    pump();
  }
  renderAll();
}

function clearAll() {
  pause();
  state.queue.length = 0;
  for (const item of state.items) URL.revokeObjectURL(item.url);
  state.items = [];
  state.slide = 0;
  $("grid").replaceChildren();
  renderSlide();
  updateStats();
  message("");
}

function wire() {
  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("folder").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  $("cam-toggle").addEventListener("change", camToggled);
  $("cam-type").addEventListener("change", camToggled);
  $("view-grid").addEventListener("click", () => setView("grid"));
  $("view-slides").addEventListener("click", () => setView("slides"));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("play").addEventListener("click", () => (state.timer ? pause() : play()));
  $("interval").addEventListener("change", () => { if (state.timer) play(); });
  $("download-csv").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", clearAll);
  $("api-key").addEventListener("change", (e) => { sessionStorage.setItem("serve-api-key", e.target.value); loadInfo(); });
  document.addEventListener("keydown", (e) => {
    if (state.view !== "slides" || e.target.tagName === "INPUT") return;
    if (e.key === "ArrowLeft") step(-1);
    if (e.key === "ArrowRight") step(1);
    if (e.key === " ") { e.preventDefault(); state.timer ? pause() : play(); }
  });
  window.serveCsvText = csvText;  // for tests and the console
  loadInfo();
}

wire();
