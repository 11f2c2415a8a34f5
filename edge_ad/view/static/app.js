// edge-ad live view: polls /api/state (1 Hz) and /api/frame (about 5 Hz, one request at a time), draws the
// score chart and the ROI editor. Plain browser JavaScript, no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_PERIOD_MS = 200;
const STATE_PERIOD_MS = 1000;
let camera = null;        // selected camera id
let state = null;         // last /api/state answer
let frameUrl = null;      // object URL of the frame on screen
let editing = false;      // ROI editor open
let shapes = [];          // ROI being drawn: [{kind: "rect"|"poly", points: [[x, y], ...]}] in frame pixels
let drag = null;          // rectangle being dragged
let poly = null;          // polygon being clicked

async function api(path, options) {
  const response = await fetch(path, Object.assign({credentials: "same-origin"}, options));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function q(path) { return path + (camera ? (path.includes("?") ? "&" : "?") + "camera=" + encodeURIComponent(camera) : ""); }

function showCameras(info) {  // cameras register one by one as they start: the selector follows
  const select = $("camera");
  if (Array.from(select.options, (o) => o.value).join() !== info.cameras.join()) {
    select.replaceChildren(...info.cameras.map((id) => new Option(id, id)));
    if (!info.cameras.includes(camera)) camera = info.cameras[0] || null;
    select.value = camera;
  }
  $("camera-pick").hidden = info.cameras.length < 2;
}

async function init() {
  try {
    const info = await (await api("/api/info")).json();
    $("access").textContent = info.protected ? "token-protected" : "this machine only (127.0.0.1)";
    $("access").title = info.protected ? "every request needs the view's token" : "bound to the loopback interface";
    showCameras(info);
    $("camera").onchange = () => { camera = $("camera").value; state = null; cancelEdit(); };
    if (!camera) { setTimeout(init, 1000); return; }
    setInterval(async () => { try { showCameras(await (await api("/api/info")).json()); } catch (e) { /* shown by the state poll */ } }, 10000);
  } catch (e) {
    $("state").textContent = "view unreachable: " + e.message;
    $("state").className = "badge error";
    setTimeout(init, 2000);
    return;
  }
  pollState();
  pollFrame();
}

async function pollState() {
  try {
    const seconds = $("window").value;
    state = await (await api(q("/api/state?seconds=" + seconds))).json();
    showState();
  } catch (e) {
    $("state").textContent = "no answer: " + e.message;
    $("state").className = "badge error";
  }
  setTimeout(pollState, STATE_PERIOD_MS);
}

async function pollFrame() {
  const started = performance.now();
  try {
    const response = await api(q("/api/frame"));
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const img = $("frame");
    await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = url; });
    if (frameUrl) URL.revokeObjectURL(frameUrl);
    frameUrl = url;
    $("no-frame").hidden = true;
    img.dataset.index = response.headers.get("X-Frame-Index");
    showFrameInfo(response.headers);
    drawRoi();
  } catch (e) {
    $("no-frame").hidden = false;
    $("no-frame").textContent = e.status === 503 ? "waiting for the first frame" : "frame: " + e.message;
  }
  setTimeout(pollFrame, Math.max(0, FRAME_PERIOD_MS - (performance.now() - started)));
}

function showFrameInfo(headers) {  // what the picture on screen shows, from its own response
  const anomalous = headers.get("X-Anomalous") === "true";
  const info = $("frame-info");
  info.replaceChildren(document.createTextNode(`${camera} frame ${headers.get("X-Frame-Index")} score ${fmt(headers.get("X-Score"), 3)} `));
  const verdict = document.createElement("span");
  verdict.id = "verdict";
  verdict.textContent = anomalous ? "ANOMALOUS" : "normal";
  if (anomalous) verdict.className = "anomalous";
  const regions = Number(headers.get("X-Regions"));
  info.append(verdict, document.createTextNode((regions ? `, ${regions} region(s)` : "") + (state && state.roi ? " (inspection region in force)" : "")));
}

function fmt(value, digits) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }

function showState() {
  const s = state.status || {};
  $("state").textContent = (s.state || "running") + (s.reason ? ": " + s.reason : "");
  $("state").className = "badge " + (s.state || "online");
  const lat = s.latency_ms || {};
  const rows = [
    ["fps", fmt(s.fps, 1) + (s.fps_avg ? ` (run average ${fmt(s.fps_avg, 1)})` : "")],
    ["latency", `p50 ${fmt(lat.p50, 1)} ms, p95 ${fmt(lat.p95, 1)} ms`],
    ["frames", `${s.processed ?? "-"} processed, ${s.dropped ?? 0} dropped, ${s.skipped ?? 0} skipped`],
    ["alerts", `${s.alerts ?? 0} (${s.clears ?? 0} all-clears)`],
    ["broker", s.broker_connected === undefined ? "none (JSON lines)" : (s.broker_connected ? "connected" : "NOT connected")],
    ["outbox", s.outbox_pending === undefined ? "-" : `${s.outbox_pending} pending, ${s.outbox_dropped ?? 0} dropped`],
    ["ROI file", state.roi_file + (state.roi ? "" : " (not in force: whole frame)")],
  ];
  $("status").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  showAlerts();
  drawChart();
  if (!editing) drawRoi();
}

function showAlerts() {
  const list = $("alerts");
  const shown = list.dataset.ids || "";
  const ids = state.alerts.map((a) => a.event_id).join(",");
  if (ids === shown) return;  // unchanged: keep the thumbnails loaded
  list.dataset.ids = ids;
  if (!state.alerts.length) { list.replaceChildren(Object.assign(document.createElement("li"), {className: "muted", textContent: "none yet"})); return; }
  list.replaceChildren(...state.alerts.map((a) => {
    const li = document.createElement("li");
    if (a.snapshot) {
      const img = document.createElement("img");
      img.alt = "snapshot of alert " + a.event_id;
      img.src = q("/api/snapshot?event=" + encodeURIComponent(a.event_id));
      img.onclick = () => window.open(img.src, "_blank");
      li.append(img);
    }
    const text = document.createElement("span");
    text.textContent = `${a.timestamp} frame ${a.frame_index} score ${fmt(a.score, 3)}, ${a.regions_total} region(s)`;
    li.append(text);
    return li;
  }));
}

function drawChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 34, bottom = 20, top = 8, right = 8;
  const points = state.history;
  // the chosen window, or less while the run is younger than that (at least 30 s)
  const span = Math.min(Number($("window").value), Math.max(30, points.length ? points[0][0] : 0));
  const x = (ago) => left + (w - left - right) * (1 - ago / span);
  const y = (score) => Math.round(top + (h - top - bottom) * (1 - Math.min(1, Math.max(0, score)))) + 0.5;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#8b949e"; ctx.strokeStyle = "#30363d"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - right, y(v)); ctx.stroke();
    ctx.fillText(v.toFixed(2), 2, y(v) + 4);
  }
  ctx.fillText(span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`, left, h - 5);
  ctx.fillText("now", w - right - 22, h - 5);
  ctx.lineWidth = 2; ctx.strokeStyle = "#ff5a4f"; ctx.setLineDash([6, 4]);  // the threshold
  ctx.beginPath(); ctx.moveTo(left, y(state.threshold)); ctx.lineTo(w - right, y(state.threshold)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.strokeStyle = "#58a6ff"; ctx.beginPath();
  points.forEach(([ago, score], i) => (i ? ctx.lineTo(x(ago), y(score)) : ctx.moveTo(x(ago), y(score))));
  ctx.stroke();
  ctx.fillStyle = "#ff5a4f";
  for (const [ago, score, anomalous] of points) if (anomalous) ctx.fillRect(x(ago) - 1.5, y(score) - 1.5, 3, 3);
}

// -- ROI editor -----------------------------------------------------------------------------------------------
function frameSize() { return state && state.last ? [state.last.width, state.last.height] : null; }

function toFrame(event) {
  const canvas = $("roi-canvas"), size = frameSize(), rect = canvas.getBoundingClientRect();
  return [Math.round((event.clientX - rect.left) * size[0] / rect.width), Math.round((event.clientY - rect.top) * size[1] / rect.height)];
}

function drawRoi() {
  const canvas = $("roi-canvas"), img = $("frame"), size = frameSize();
  if (!size || !img.clientWidth) return;
  if (canvas.width !== img.clientWidth || canvas.height !== img.clientHeight) { canvas.width = img.clientWidth; canvas.height = img.clientHeight; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const path = (points, sx, sy) => { ctx.beginPath(); points.forEach(([px, py], i) => (i ? ctx.lineTo(px * sx, py * sy) : ctx.moveTo(px * sx, py * sy))); };
  if (!editing && state.roi) {  // the region in force, in the mask's own pixel size
    const sx = canvas.width / state.roi.width, sy = canvas.height / state.roi.height;
    ctx.strokeStyle = "#3fb950"; ctx.lineWidth = 2; ctx.setLineDash([5, 3]);
    for (const p of state.roi.polygons) { path(p, sx, sy); ctx.closePath(); ctx.stroke(); }
    ctx.setLineDash([]);
  }
  if (!editing) return;
  const sx = canvas.width / size[0], sy = canvas.height / size[1];
  ctx.fillStyle = "rgba(63, 185, 80, 0.25)"; ctx.strokeStyle = "#3fb950"; ctx.lineWidth = 2;
  for (const shape of shapes) { path(shape.points, sx, sy); ctx.closePath(); ctx.fill(); ctx.stroke(); }
  if (drag) { path(rectPoints(drag.from, drag.to), sx, sy); ctx.closePath(); ctx.stroke(); }
  if (poly && poly.length) { path(poly, sx, sy); ctx.stroke(); }
}

function rectPoints([x0, y0], [x1, y1]) { return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]; }
function shape() { return document.querySelector("input[name=roi-shape]:checked").value; }
function message(text, error) { $("roi-message").textContent = text; $("roi-message").className = error ? "error" : ""; }

function startEdit() {
  if (!frameSize()) { message("no frame yet", true); return; }
  editing = true; shapes = []; drag = null; poly = null;
  $("roi-editing").hidden = false; $("roi-edit").hidden = true; $("roi-canvas").classList.add("editing");
  message("draw the region to inspect; everything outside it is ignored");
  drawRoi();
}

function cancelEdit() {
  editing = false; shapes = []; drag = null; poly = null;
  $("roi-editing").hidden = true; $("roi-edit").hidden = false; $("roi-canvas").classList.remove("editing");
  drawRoi();
}

function closePolygon() {
  if (poly && poly.length >= 3) shapes.push({kind: "poly", points: poly});
  poly = null; drawRoi();
}

async function sendRoi(method, body) {
  try {
    const response = await api(q("/api/roi"), {method, headers: {"Content-Type": "application/json"}, body: body && JSON.stringify(body)});
    const answer = await response.json();
    cancelEdit();
    message(method === "POST" ? `saved to ${answer.saved}; frames after ${answer.after_frame} use it` : "whole frame inspected");
    state = await (await api(q("/api/state?seconds=" + $("window").value))).json();
    showState();
  } catch (e) { message("not saved: " + e.message, true); }
}

function setupEditor() {
  const canvas = $("roi-canvas");
  canvas.addEventListener("pointerdown", (e) => {
    if (!editing || e.button !== 0) return;
    if (shape() === "rect") { drag = {from: toFrame(e), to: toFrame(e)}; canvas.setPointerCapture(e.pointerId); }
  });
  canvas.addEventListener("pointermove", (e) => { if (editing && drag) { drag.to = toFrame(e); drawRoi(); } });
  canvas.addEventListener("pointerup", (e) => {
    if (!editing || !drag) return;
    drag.to = toFrame(e);
    if (Math.abs(drag.to[0] - drag.from[0]) >= 2 && Math.abs(drag.to[1] - drag.from[1]) >= 2) shapes.push({kind: "rect", points: rectPoints(drag.from, drag.to)});
    drag = null; drawRoi();
  });
  canvas.addEventListener("click", (e) => {
    if (!editing || shape() !== "poly") return;
    (poly = poly || []).push(toFrame(e)); drawRoi();
  });
  canvas.addEventListener("dblclick", (e) => { if (editing && shape() === "poly") { if (poly) poly.pop(); closePolygon(); } });
  $("roi-edit").onclick = startEdit;
  $("roi-cancel").onclick = () => { cancelEdit(); message(""); };
  $("roi-undo").onclick = () => { if (poly && poly.length) poly.pop(); else shapes.pop(); drawRoi(); };
  $("roi-save").onclick = () => {
    closePolygon();
    if (!shapes.length) { message("draw a rectangle or a polygon first", true); return; }
    const [width, height] = frameSize();
    sendRoi("POST", {width, height, polygons: shapes.map((s) => s.points)});
  };
  $("roi-clear").onclick = () => sendRoi("DELETE");
  $("window").onchange = () => state && drawChart();
  window.addEventListener("resize", drawRoi);
}

setupEditor();
init();
