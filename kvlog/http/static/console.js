// The kvlog operator console: plain JavaScript, no build step, no third-party code.
// Every URL is relative to the page, so the console works where the app is mounted.
"use strict";

const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = sessionStorage.getItem("kvlog-token") || "";
tokenInput.addEventListener("change", () => {
  sessionStorage.setItem("kvlog-token", tokenInput.value);
  refreshStats();
});

let previous = null; // the last stats, for the replay rate
let watching = null; // the key whose changes are long-polled
let watchAbort = null;

function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  return fetch(base + path, Object.assign({}, options, { headers }));
}

async function errorOf(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function number(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

async function refreshStats() {
  let response;
  try {
    response = await api("v1/stats");
  } catch (e) {
    showError("the server does not answer: " + e);
    return;
  }
  if (!response.ok) {
    showError("stats: " + (await errorOf(response)));
    return;
  }
  const s = await response.json();
  showError("");
  $("describe").textContent = s.describe;
  $("stats-time").textContent = "at " + new Date(s.server.time * 1000).toLocaleTimeString();
  $("stats-entries").textContent = number(s.entries);
  $("stats-codec").textContent = s.codec;
  const total = $("stats-total-lag");
  total.textContent = s.total_lag === null ? "unknown (the log does not answer)" : number(s.total_lag);
  total.className = s.total_lag !== null && s.total_lag > s.server.max_lag ? "lagging" : "";
  $("stats-replayed").textContent = number(s.records_replayed) + " since open";
  if (previous) {
    const seconds = s.server.time - previous.server.time;
    const records = s.records_replayed - previous.records_replayed;
    $("stats-rate").textContent = seconds > 0 ? number(Math.round(records / seconds)) + " records/s" : "–";
  }
  $("stats-quarantined").textContent = number(s.records_quarantined);
  $("stats-rebuilds").textContent = s.rebuilds.length ? s.rebuilds.join("; ") : "none";
  const open = s.open_replay;
  $("stats-open").textContent =
    open.mode + ", " + number(open.records) + " records in " + open.seconds + " s" +
    (open.rebuild_reason ? " (" + open.rebuild_reason + ")" : "");
  $("stats-following").textContent = s.following ? "yes" : "no";
  $("stats-server").textContent =
    (s.server.writable ? "writable" : "read-only") + ", ready at lag ≤ " + number(s.server.max_lag) +
    ", " + s.server.longpolls_waiting + " long-poll(s) waiting";
  const body = $("lag-table").tBodies[0];
  body.replaceChildren();
  for (const [partition, checkpoint] of Object.entries(s.end_offsets || s.checkpoint)) {
    const row = body.insertRow();
    cell(row, partition);
    cell(row, number(s.checkpoint[partition] || 0));
    cell(row, s.end_offsets ? number(s.end_offsets[partition]) : "–");
    cell(row, s.lag ? number(s.lag[partition]) : "–");
  }
  const quarantined = s.quarantined || [];
  $("quarantine").hidden = quarantined.length === 0;
  const qbody = $("quarantine-table").tBodies[0];
  qbody.replaceChildren();
  for (const [partition, offset, reason] of quarantined.slice().reverse()) {
    const row = qbody.insertRow();
    cell(row, partition);
    cell(row, number(offset));
    cell(row, reason);
  }
  previous = s;
}

function keyPath(key) {
  return "v1/keys/" + key.split("/").map(encodeURIComponent).join("/");
}

function showValue(key, response, text) {
  $("value-box").hidden = false;
  $("scan-box").hidden = true;
  $("value-key").textContent = key;
  $("value").textContent = text;
  $("etag").textContent = response.headers.get("ETag") || "–";
  const seen = response.headers.get("X-Kvlog-Seen-At");
  $("seen-at").textContent = seen ? new Date(parseFloat(seen) * 1000).toLocaleString() : "–";
}

async function lookUp(key) {
  if (watchAbort) watchAbort.abort();
  watching = key;
  const response = await api(keyPath(key));
  if (response.status === 404) {
    showValue(key, response, "(no such key)");
  } else if (!response.ok) {
    showError(key + ": " + (await errorOf(response)));
    return;
  } else {
    showValue(key, response, JSON.stringify(await response.json(), null, 2));
  }
  showError("");
  $("changes").textContent = "watching…";
  watch(key, response.headers.get("ETag"));
}

// Long-polls the key: the server answers as soon as any process changed it.
async function watch(key, etag) {
  const changes = [];
  while (watching === key) {
    watchAbort = new AbortController();
    const headers = etag ? { "If-None-Match": etag } : {};
    let response;
    try {
      response = await api(keyPath(key) + "?wait=25", { headers, signal: watchAbort.signal });
    } catch (e) {
      return; // aborted: another lookup began
    }
    if (watching !== key) return;
    if (response.status === 304) continue;
    if (response.status !== 200 && response.status !== 404) {
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    const text = response.status === 404 ? "(deleted)" : JSON.stringify(await response.json(), null, 2);
    showValue(key, response, text);
    etag = response.headers.get("ETag");
    changes.unshift(new Date().toLocaleTimeString() + (etag ? " → " + etag : " deleted"));
    $("changes").textContent = changes.slice(0, 5).join(", ");
  }
}

async function scanPrefix(prefix) {
  if (watchAbort) watchAbort.abort();
  watching = null;
  const response = await api("v1/scan?limit=100&prefix=" + encodeURIComponent(prefix));
  if (!response.ok) {
    showError("scan: " + (await errorOf(response)));
    return;
  }
  showError("");
  const lines = (await response.text()).split("\n").filter((line) => line);
  $("value-box").hidden = true;
  $("scan-box").hidden = false;
  $("scan-title").textContent =
    lines.length + (lines.length === 100 ? "+" : "") + " key(s) under " + JSON.stringify(prefix);
  const body = $("scan-results").tBodies[0];
  body.replaceChildren();
  for (const line of lines) {
    const entry = JSON.parse(line);
    const row = body.insertRow();
    const key = entry.key !== undefined ? entry.key : "(base64) " + entry.key_b64;
    const link = document.createElement("a");
    link.textContent = key;
    if (entry.key !== undefined) link.addEventListener("click", () => lookUp(entry.key));
    row.insertCell().appendChild(link);
    const value = "value" in entry ? JSON.stringify(entry.value) : "(binary)";
    cell(row, value.length > 200 ? value.slice(0, 200) + "…" : value);
  }
}

$("lookup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value;
  if (key) lookUp(key);
});
$("scan-button").addEventListener("click", () => scanPrefix($("key-input").value));

refreshStats();
setInterval(refreshStats, 2000);
