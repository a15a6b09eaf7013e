// HALO's web page: a chat over the OpenAI-compatible API (streamed) and a live view of the
// cluster from /status/events. Plain JavaScript, no libraries, nothing fetched elsewhere.
"use strict";

const $ = (sel) => document.querySelector(sel);
const messages = [];          // the conversation, as the API takes it
let controller = null;        // aborts the reply being streamed

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

// -- chat ------------------------------------------------------------------------------
function addMessage(role, text) {
  const hint = $("#chat-log .hint");
  if (hint) hint.remove();
  const m = el("div", { class: `msg ${role}` }, text);
  $("#chat-log").appendChild(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function readEvents(response, onData) {
  // server-sent events from a fetch body: "data: {...}\n\n" blocks, "[DONE]" at the end
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  reply.dataset.chunks = "0";
  const body = { model: "default", messages, stream: true,
    max_tokens: Number($("#max-tokens").value) || 128,
    temperature: Number($("#temperature").value) || 0,
    stream_options: { include_usage: true } };
  controller = new AbortController();
  busy(true);
  const t0 = performance.now();
  let usage = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${r.status}`);
    }
    await readEvents(r, (obj) => {
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      for (const choice of obj.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          reply.append(piece);
          reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
          reply.scrollIntoView({ block: "end" });
        }
      }
    });
    reply.dataset.state = "done";
    messages.push({ role: "assistant", content: reply.textContent });
    const s = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : Number(reply.dataset.chunks);
    reply.appendChild(el("span", { class: "meta" }, `${n} tokens in ${s.toFixed(1)} s`));
  } catch (e) {
    const stopped = e.name === "AbortError";
    reply.dataset.state = stopped ? "done" : "error";
    if (stopped) messages.push({ role: "assistant", content: reply.textContent });
    reply.appendChild(el("span", { class: "meta" }, stopped ? "stopped" : String(e.message)));
  } finally {
    controller = null;
    busy(false);
  }
}

function busy(on) {
  $("#send").disabled = on;
  $("#stop").disabled = !on;
}

$("#chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || controller) return;
  $("#prompt").value = "";
  send(text);
});
$("#prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("#chat-form").requestSubmit();
  }
});
$("#stop").addEventListener("click", () => controller && controller.abort());
$("#clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  $("#chat-log").replaceChildren();
});
const savedKey = localStorage.getItem("halo-api-key");
if (savedKey) $("#api-key").value = savedKey;
$("#api-key").addEventListener("change", () =>
  localStorage.setItem("halo-api-key", $("#api-key").value.trim()));

// -- the cluster's live view ------------------------------------------------------------
const fmt = {
  num: (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  pct: (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`),
  ms: (v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(2)} ms`),
  bytes: (v) => {
    if (!v) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(v < 10 ? 1 : 0)} ${u[i]}`;
  },
};

function renderDevices(devices) {
  const total = devices.reduce((a, d) => a + (d.groups || 0), 0) || 1;
  const rows = devices.map((d) => {
    const tr = el("tr", { class: "device", "data-name": d.name, "data-state": d.state });
    const link = d.link || {};
    const name = el("td", {}, d.name);
    const groups = el("td", { class: "num" }, d.groups === null ? "–" : String(d.groups));
    groups.appendChild(el("span", { class: "bar",
      style: `width:${Math.round(60 * (d.groups || 0) / total)}px` }));
    tr.append(name, el("td", { class: "state" }, d.state), groups,
      el("td", { class: "num" }, fmt.num(d.speed, 0)),
      el("td", { class: "num" }, fmt.bytes(d.memory_bytes)),
      el("td", { class: "num" }, d.role === "worker" ? fmt.pct(link.miss_rate) : ""),
      el("td", { class: "num" }, d.role === "worker" ? fmt.ms(link.round_trip_ms) : ""),
      el("td", { class: "num" }, d.repairs === undefined || d.repairs === null ? "" :
        String(d.repairs)));
    return tr;
  });
  $("#devices").replaceChildren(...rows);
}

function renderSummary(s) {
  const c = s.cluster;
  $("#model").textContent = s.model;
  const live = s.speed.tokens_per_s;
  const last = s.speed.last_request && s.speed.last_request.tokens_per_s;
  $("#tps").textContent = fmt.num(s.engine.busy ? live : (last || live), 1);
  if (!c) {
    $("#summary").textContent = "— this device only (start halo serve with --local, " +
      "--workers or --discover for a cluster)";
    $("#chips").replaceChildren();
    return;
  }
  const alive = s.devices.filter((d) => d.role === "worker" && d.state === "alive").length;
  $("#summary").textContent = `— ${alive} of ${s.devices.length - 1} workers alive`;
  const chips = [
    `${c.mode} sync`, `placement ${c.policy}`, `wire ${c.wire}`,
    `lost ${c.lost}/${c.expected} (${fmt.pct(c.loss_rate)})`,
    `deadline ${fmt.ms(c.deadline_ms)}`, `waiting ${fmt.ms(c.waited_ms_per_token)}/token`,
    `critical fallbacks ${c.fallbacks}`, `KV repairs ${c.repairs_served}`,
    `takeovers ${c.takeovers}`, `rejoins ${c.rejoins}`, `re-plans ${c.replans}`,
    s.engine.busy ? "generating" : "idle", `queue ${s.engine.queue}`];
  $("#chips").replaceChildren(...chips.map((t) => el("span", {}, t)));
}

function renderEvents(events) {
  if (!events.length) return;
  const items = events.slice().reverse().map((ev) => {
    const li = el("li", { "data-kind": ev.kind });
    li.appendChild(el("time", {}, new Date(ev.t * 1000).toLocaleTimeString()));
    li.append(ev.text);
    return li;
  });
  $("#events").replaceChildren(...items);
}

function renderChart(rows) {
  const canvas = $("#latency");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const decode = rows.filter((r) => r.tokens === 1).slice(-160);
  const note = $("#latency-note");
  if (!decode.length) {
    g.fillStyle = "#9aa1ad";
    g.font = "12px system-ui";
    g.fillText("no tokens yet: send a message", 12, h / 2);
    note.textContent = "";
    return;
  }
  const sorted = decode.map((r) => r.ms).sort((a, b) => a - b);
  const top = Math.max(1, sorted[Math.floor(0.98 * (sorted.length - 1))] * 1.15);
  const left = 40, bottom = 16, plotH = h - bottom - 6, bw = (w - left - 6) / 160;
  g.strokeStyle = "#e3e6eb";
  g.fillStyle = "#6b7280";
  g.font = "11px system-ui";
  for (const f of [0, 0.5, 1]) {
    const y = 6 + plotH * (1 - f);
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - 6, y); g.stroke();
    g.fillText(`${(top * f).toFixed(0)} ms`, 2, y + 4);
  }
  decode.forEach((r, i) => {
    const x = left + i * bw;
    const bh = Math.min(plotH, plotH * r.ms / top);
    g.fillStyle = "#7da2f5";
    g.fillRect(x, 6 + plotH - bh, Math.max(1, bw - 1), bh);
    if (r.waited_ms) {
      const wh = Math.min(bh, plotH * r.waited_ms / top);
      g.fillStyle = "#f0a04b";
      g.fillRect(x, 6 + plotH - wh, Math.max(1, bw - 1), wh);
    }
  });
  const median = sorted[Math.floor(sorted.length / 2)];
  note.textContent = `last ${decode.length} decoded tokens; median ${median.toFixed(1)} ms ` +
    `(${(1000 / median).toFixed(1)} tokens/s)`;
}

function render(s) {
  renderSummary(s);
  renderDevices(s.devices);
  renderEvents(s.events);
  renderChart(s.latency);
}

function connect() {
  const source = new EventSource("/status/events");
  source.onopen = () => { $("#conn").dataset.state = "live"; $("#conn").textContent = "live"; };
  source.onerror = () => {
    $("#conn").dataset.state = "lost";
    $("#conn").textContent = "server unreachable, retrying…";
  };
  source.onmessage = (ev) => render(JSON.parse(ev.data));
}
connect();
