// The web console: state.json once a second (topics, durable clients,
// groups), and over the broker's WebSocket (zaichik.js) a live tail and a
// publish box.  With --auth the operator's token is asked for; publishing is
// refused by the broker unless the token's credential may publish.
import { connect, Start } from "/zaichik.js";

const $ = (id) => document.getElementById(id);
const HISTORY = 60;  // points in each rate chart
const TAIL = 50;     // messages kept in the live tail
const rates = new Map();  // topic -> {last: {t, published, delivered}, pub: [], out: []}
let client = null;
let tail = null;
let config = null;

function cell(row, text, numeric = false) {
  const td = row.insertCell();
  td.textContent = text;
  if (numeric) td.className = "n";
  return td;
}

function duration(ms) {
  if (!ms) return "0";
  for (const [unit, size] of [["d", 86400000], ["h", 3600000], ["m", 60000], ["s", 1000]]) {
    if (ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

function spark(values, color) {
  const canvas = document.createElement("canvas");
  canvas.width = 90; canvas.height = 20;
  const g = canvas.getContext("2d");
  const top = Math.max(1, ...values);
  g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
  values.forEach((v, i) => {
    const x = ((HISTORY - values.length + i) / (HISTORY - 1)) * canvas.width;  // the newest at the right
    const y = canvas.height - 1 - (v / top) * (canvas.height - 2);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  return canvas;
}

function rateCell(row, values, color) {
  const td = cell(row, "", true);
  td.appendChild(spark(values, color));
  td.append(values.length ? Math.round(values[values.length - 1]).toLocaleString() : "0");
}

function track(topic, now) {
  let r = rates.get(topic.name);
  if (!r) { r = { last: null, pub: [], out: [] }; rates.set(topic.name, r); }
  if (r.last) {
    const dt = Math.max(0.001, (now - r.last.t) / 1000);
    r.pub.push(Math.max(0, topic.next_offset - r.last.published) / dt);
    r.out.push(Math.max(0, topic.messages_out - r.last.delivered) / dt);
    if (r.pub.length > HISTORY) { r.pub.shift(); r.out.shift(); }
  }
  r.last = { t: now, published: topic.next_offset, delivered: topic.messages_out };
  return r;
}

function fill(id, rows, columns) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [key, numeric] of columns) cell(row, String(item[key]), numeric);
  }
}

async function refresh() {
  let state;
  try {
    state = await (await fetch("state.json", { cache: "no-store" })).json();
  } catch (e) {
    $("summary").textContent = `broker unreachable (${e.message})`;
    return;
  }
  const now = performance.now();
  $("summary").textContent = `${state.connections} connections · ${state.topics_total} topics`;
  const body = $("topics").tBodies[0];
  body.replaceChildren();
  for (const topic of state.topics) {
    const r = track(topic, now);
    const row = body.insertRow();
    row.dataset.topic = topic.name;
    cell(row, topic.name);
    cell(row, duration(topic.retention_ttl), true);
    cell(row, duration(topic.compaction_window), true);
    cell(row, topic.next_offset.toLocaleString(), true);
    cell(row, topic.retained.toLocaleString(), true);
    cell(row, topic.retained_bytes.toLocaleString(), true);
    cell(row, String(topic.subscribers), true);
    rateCell(row, r.pub, "#2271b1");
    rateCell(row, r.out, "#00a32a");
  }
  const more = state.topics_total - state.topics.length;
  $("topics-more").hidden = more <= 0;
  $("topics-more").textContent = `and ${more} more topics`;
  fill("clients", state.clients, [["client_id"], ["topic"], ["committed", true], ["lag", true]]);
  fill("groups", state.groups, [["topic"], ["group"], ["members", true], ["outstanding", true], ["lag", true],
    ["redelivered", true]]);
  const select = $("tail-topic");
  const known = new Set([...select.options].map((o) => o.value));
  for (const topic of state.topics) {
    if (!known.has(topic.name)) select.add(new Option(topic.name, topic.name));
  }
}

function showState(state) {
  const label = $("ws-state");
  label.textContent = `WebSocket ${state}`;
  label.className = `state ${state}`;
  $("publish-button").disabled = state !== "ready";
}

async function openClient(token) {
  const ws = config.websockets[0];
  if (!ws) {
    $("ws-state").textContent = "no --websocket-port: tail and publish unavailable";
    return;
  }
  const url = `${ws.tls ? "wss" : "ws"}://${location.hostname}:${ws.port}/`;
  try {
    client = await connect(url, { token, onStateChange: showState });
    showState(client.state);
    $("login").hidden = true;
    $("publish-result").textContent = config.auth ? "publishing as the token's credential allows" : "";
    if ($("tail-topic").value) await follow($("tail-topic").value);
  } catch (e) {
    $("ws-state").textContent = `not connected: ${e.message}`;
    $("ws-state").className = "state";
  }
}

async function follow(topic) {
  if (tail) { const old = tail; tail = null; await old.unsubscribe().catch(() => {}); }
  $("tail").tBodies[0].replaceChildren();
  if (!topic || !client) return;
  try {
    tail = await client.subscribe(topic, { start: Start.LATEST, callback: (m, sub) => {
      if (sub !== tail) return;
      const body = $("tail").tBodies[0];
      const row = body.insertRow(0);
      cell(row, String(m.offset), true);
      cell(row, new Date(m.timestamp).toISOString().slice(11, 23));
      cell(row, m.keyText ?? "");
      cell(row, m.text);
      while (body.rows.length > TAIL) body.deleteRow(-1);
    } });
  } catch (e) {
    const row = $("tail").tBodies[0].insertRow();
    cell(row, `cannot follow ${topic}: ${e.message}`).className = "error";
  }
}

$("tail-topic").addEventListener("change", (e) => follow(e.target.value));

$("publish").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = $("publish-result");
  try {
    const key = $("publish-key").value || null;
    const done = await client.publish($("publish-topic").value, $("publish-value").value, key);
    result.textContent = `published at offset ${done.offset}${done.duplicate ? " (a duplicate)" : ""}`;
    result.className = "note";
  } catch (err) {
    result.textContent = err.codeName === "NOT_AUTHORIZED" ? `read-only: ${err.message}` : err.message;
    result.className = "error";
  }
});

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  openClient($("token").value);
});

config = await (await fetch("config.json", { cache: "no-store" })).json();
await refresh();
setInterval(refresh, 1000);
if (config.auth) {
  $("login").hidden = false;
  $("ws-state").textContent = "read-only: a token is needed for the tail and publishing";
} else {
  openClient("");
}
