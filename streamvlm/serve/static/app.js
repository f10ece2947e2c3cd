"use strict";

// The page talks to the server two ways: JSON over HTTP for sources and streams (/v1/sources,
// /v1/streams), and one WebSocket for the attached stream (/v1/streams/{id}/ws) that carries status,
// frames, source events and answers. Text from the server only ever goes in through textContent.

const KEY_STORAGE = "streamvlm.apiKey";
const MAX_EVENTS = 300;
// Seconds before each reconnect attempt; the last value repeats.
const RECONNECT_DELAYS = [0.5, 1, 2, 4, 8];

const $ = (id) => document.getElementById(id);

const state = {
  stream: null,       // the attached stream, as the server last described it
  ws: null,           // the open (or opening) socket; null between attempts
  wanted: false,      // whether the socket should be open: attached, and not stopped or failed for good
  retries: 0,         // reconnect attempts since the last hello
  retryTimer: null,
  done: false,        // the stream said it is done (its source ended and every frame is ingested)
  nextQuestion: 1,
  answers: new Map(), // question id -> the elements of its answer
  committedKey: "",
};

// -- formatting --------------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

const pad = (n) => String(n).padStart(2, "0");

/** Stream seconds as mm:ss (h:mm:ss past an hour); "–" when unknown. */
function mmss(t) {
  if (typeof t !== "number" || !Number.isFinite(t)) return "–";
  const total = Math.max(0, Math.floor(t));
  const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${pad(m)}:${pad(s)}`;
}

function secs(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  return `${x.toFixed(x < 10 ? 2 : 1)} s`;
}

function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

function num(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toLocaleString("en-US") : "–";
}

function plain(x) {
  if (x === null || x === undefined) return "none";
  return typeof x === "object" ? JSON.stringify(x) : String(x);
}

const clock = () => new Date().toLocaleTimeString("en-GB", {hour12: false});

// -- errors and the API key --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The message in an error body: ours ({"error": {"message"}}), FastAPI's ({"detail"}), or plain. */
function errorMessage(body) {
  if (!body || typeof body !== "object") return "";
  const e = body.error ?? body.detail ?? body.message;
  if (typeof e === "string") return e;
  if (Array.isArray(e)) {  // FastAPI's validation errors: [{loc: [...], msg}]
    return e.map((d) => (d && d.msg ? `${(d.loc || []).slice(-1)[0] ?? ""}: ${d.msg}` : plain(d))).join("; ");
  }
  if (e && typeof e.message === "string") return e.message;
  return "";
}

function showError(what, err) {
  const box = $("error");
  const hint = err.status === 401 ? " Enter the server's API key above." : "";
  box.textContent = `${what}: ${err.message.replace(/\.$/, "")}.${hint}`;
  box.hidden = false;
  if (err.status === 401) {
    $("key-box").hidden = false;
    $("api-key").focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

const apiKey = () => $("api-key").value.trim();

function commitKey() {
  const key = apiKey();
  if (key === state.committedKey) return;
  state.committedKey = key;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  clearError();
  loadSources();
  loadStreams();
  if (state.stream && !state.ws) {
    state.wanted = true;
    connect();
  }
}

async function api(method, path, body) {
  const headers = {Accept: "application/json"};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = {method, headers};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {  // the server is down, or the key holds characters a header cannot carry
    throw new ApiError(0, `no response from the server (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const why = errorMessage(data) || response.statusText || "request failed";
    throw new ApiError(response.status, `HTTP ${response.status}: ${why}`);
  }
  return data;
}

// -- sources and streams -----------------------------------------------------------------------------

async function loadSources() {
  let body;
  try {
    body = await api("GET", "/v1/sources");
  } catch (err) {
    showError("Loading the sources failed", err);
    return;
  }
  const list = $("source-list");
  const chosen = list.value;
  list.replaceChildren(new Option("sources…", ""));
  for (const source of body.data || []) {
    const option = new Option(source.label || source.id, source.id);
    option.title = source.id;
    list.add(option);
  }
  list.value = chosen;
  if (list.selectedIndex < 0) list.value = "";
}

async function loadStreams() {
  let body;
  try {
    body = await api("GET", "/v1/streams");
  } catch (err) {
    showError("Listing the streams failed", err);
    return;
  }
  const streams = body.data || [];
  $("streams").replaceChildren(...streams.map(streamItem));
  $("no-streams").hidden = streams.length > 0;
}

function streamItem(stream) {
  const item = el("li");
  item.dataset.id = stream.id;
  item.classList.toggle("attached", state.stream !== null && state.stream.id === stream.id);
  const button = el("button", "stream");
  button.type = "button";
  button.title = `Attach to ${stream.id}`;
  button.append(el("span", "stream-id", stream.id), el("span", "stream-source", stream.source),
                el("span", "muted", `${plain(stream.fps)} fps`));
  button.addEventListener("click", () => attach(stream));
  item.append(button);
  return item;
}

function markAttached() {
  for (const item of $("streams").children) {
    item.classList.toggle("attached", state.stream !== null && item.dataset.id === state.stream.id);
  }
}

function showStream(stream) {
  $("stream-info").textContent = `${stream.id} · ${plain(stream.source)} · ${plain(stream.fps)} fps · ` +
    `routing ${plain(stream.routing)} · memory budget ${plain(stream.memory_budget)}`;
}

async function start(event) {
  event.preventDefault();
  const source = $("source").value.trim();
  const fps = Number($("fps").value);
  if (!source) {
    showError("Starting a stream failed", new Error("choose or enter a source"));
    $("source").focus();
    return;
  }
  if (!(fps > 0)) {
    showError("Starting a stream failed", new Error("fps must be a number above 0"));
    $("fps").focus();
    return;
  }
  $("start").disabled = true;
  try {
    const stream = await api("POST", "/v1/streams", {source, fps, loop: true});
    clearError();
    attach(stream);
    await loadStreams();
  } catch (err) {
    showError("Starting the stream failed", err);
  } finally {
    $("start").disabled = false;
  }
}

async function stop() {
  if (!state.stream) return;
  const id = state.stream.id;
  $("stop").disabled = true;
  state.wanted = false;  // the server closes the socket as it deletes the stream: no reconnect
  try {
    await api("DELETE", `/v1/streams/${encodeURIComponent(id)}`);
    clearError();
    if (state.stream && state.stream.id === id) {  // else the server's "closed" message detached already
      logEvent(null, `stopped ${id}`);
      detach();
    }
  } catch (err) {
    if (err.status === 404) {
      logEvent(null, `${id} was already gone`);
      if (state.stream && state.stream.id === id) detach();
    } else {
      showError("Stopping the stream failed", err);
      if (state.stream && state.stream.id === id) {
        $("stop").disabled = false;
        state.wanted = true;
        if (!state.ws) connect();
      }
    }
  }
  await loadStreams();
}

// -- the stream's socket -----------------------------------------------------------------------------

function attach(stream) {
  if (state.stream && state.stream.id === stream.id && state.ws) return;
  detach();
  resetView();
  state.stream = stream;
  state.wanted = true;
  state.done = false;
  state.retries = 0;
  showStream(stream);
  markAttached();
  $("stop").disabled = false;
  connect();
}

function detach() {
  state.wanted = false;
  clearTimeout(state.retryTimer);
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;  // its close handler sees it is no longer the current socket and does nothing
    ws.close(1000, "detached");
  }
  failPending("the stream was detached before the answer finished");
  state.stream = null;
  markAttached();
  setAsking(false);
  setConnection("idle", "not attached");
  $("stop").disabled = true;
}

function setConnection(name, text) {
  $("connection").dataset.state = name;
  $("connection").textContent = text;
}

function setAsking(on) {
  $("question").disabled = !on;
  $("ask").disabled = !on;
}

function connect() {
  clearTimeout(state.retryTimer);
  const stream = state.stream;
  const key = apiKey();
  // Browsers cannot set headers on a WebSocket, so the key travels as a subprotocol.
  const protocols = key ? ["streamvlm", `bearer.${key}`] : ["streamvlm"];
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/streams/${encodeURIComponent(stream.id)}/ws`;
  let ws;
  try {
    ws = new WebSocket(url, protocols);
  } catch (err) {  // a key with characters a subprotocol name may not hold throws here
    state.wanted = false;
    setConnection("closed", "not connected");
    showError("Connecting to the stream failed",
              new Error(`${err.message} (the key must be letters, digits and -._~ to go over the WebSocket)`));
    return;
  }
  state.ws = ws;
  setConnection(state.retries ? "reconnecting" : "connecting", `connecting to ${stream.id}…`);
  ws.addEventListener("open", () => {
    if (ws !== state.ws) return;
    setConnection("open", `live: ${stream.id}`);
    setAsking(true);
  });
  ws.addEventListener("message", (event) => {
    if (ws !== state.ws) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      console.warn("not JSON from the server:", event.data);
      return;
    }
    handle(message);
  });
  ws.addEventListener("close", (event) => {
    if (ws !== state.ws) return;
    state.ws = null;
    setAsking(false);
    failPending("the connection closed before the answer finished");
    if (state.wanted) afterClose(stream.id, event);
  });
}

/** The socket closed on its own: reconnect if the stream still exists, stop if it is gone. */
async function afterClose(id, event) {
  const current = () => state.wanted && state.stream !== null && state.stream.id === id && !state.ws;
  setConnection("reconnecting", "connection lost; checking the stream…");
  try {
    await api("GET", `/v1/streams/${encodeURIComponent(id)}`);
  } catch (err) {
    if (!current()) return;
    if (err.status === 404) {
      logEvent(null, `${id} no longer exists`);
      detach();
      loadStreams();
      return;
    }
    if (err.status === 401) {  // reconnects once a key is entered (commitKey)
      state.wanted = false;
      setConnection("closed", "not connected: API key needed");
      showError("Reconnecting to the stream failed", err);
      return;
    }
    // Anything else (the server restarting, a network blip): keep trying.
  }
  if (!current()) return;
  if (state.done && event.code === 1000) {
    state.wanted = false;
    setConnection("closed", `closed: ${id} is done`);
    return;
  }
  const delay = RECONNECT_DELAYS[Math.min(state.retries, RECONNECT_DELAYS.length - 1)];
  state.retries += 1;
  setConnection("reconnecting", `connection lost; retrying in ${delay} s (attempt ${state.retries})`);
  state.retryTimer = setTimeout(() => {
    if (state.wanted && state.stream !== null && state.stream.id === id && !state.ws) connect();
  }, delay * 1000);
}

const handlers = {
  hello(m) {
    state.retries = 0;
    state.done = false;
    if (m.stream && typeof m.stream === "object") {
      state.stream = m.stream;
      showStream(m.stream);
    }
    logEvent(null, `attached to ${state.stream.id}`);
  },
  status: showStatus,
  frame: showFrame,
  connected: (m) => logEvent(m.t, m.message ? `source connected: ${m.message}` : "source connected"),
  reconnect: (m) => logEvent(m.t, `source reconnecting (attempt ${plain(m.attempt)}): ${plain(m.message)}`, "warn"),
  end: (m) => logEvent(m.t, m.message ? `source ended: ${m.message}` : "source ended"),
  dropped: (m) => logEvent(m.t, `dropped ${plain(m.count)} frames (${plain(m.total)} in all)`, "warn"),
  done(m) {
    state.done = true;
    logEvent(m.t, "done: capture ended and every captured frame is in the cache");
  },
  closed(m) {  // stopped, by this page or another client: the socket closes next
    logEvent(m.t, `${state.stream.id} was closed`);
    detach();
    loadStreams();
  },
  error(m) {
    if (m.id !== undefined && m.id !== null) answerFailed(String(m.id), plain(m.message));
    else logEvent(m.t, `error: ${plain(m.message)}`, "error");
  },
  "answer.start": answerStart,
  "answer.delta": answerDelta,
  "answer.done": answerDone,
};

function handle(message) {
  const handler = message && handlers[message.type];
  if (handler) handler(message);
  else console.debug("unhandled message", message);
}

// -- what the socket shows ---------------------------------------------------------------------------

// [status key, label, format]; each value is shown in a <dd data-key=KEY data-value=RAW>.
const STATS = [
  ["t", "stream time", mmss],
  ["frames", "frames in cache", num],
  ["ingested", "ingested", num],
  ["captured", "captured", num],
  ["ingest_fps", "ingest rate", (x) => (typeof x === "number" ? `${x.toFixed(2)} fps` : "–")],
  ["dropped", "dropped", num],
  ["buffered", "buffered", num],
  ["kv_bytes", "cache", bytes],
  ["tokens", "tokens", num],
  ["evicted_entries", "evicted", num],
  ["latency_s", "latency", secs],
  ["reconnects", "reconnects", num],
];

function resetView() {
  const stats = $("stats");
  stats.replaceChildren();
  for (const [key, label] of STATS) {
    const value = el("dd", null, "–");
    value.dataset.key = key;
    stats.append(el("dt", null, label), value);
  }
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  $("preview-time").textContent = "";
  $("stream-info").textContent = "";
  $("answers").replaceChildren();
  state.answers.clear();
}

function showStatus(m) {
  for (const [key, , format] of STATS) {
    const value = document.querySelector(`#stats dd[data-key="${key}"]`);
    if (!value) continue;
    value.textContent = format(m[key]);
    value.dataset.value = m[key] === null || m[key] === undefined ? "" : String(m[key]);
  }
  const stats = $("stats");
  stats.classList.toggle("failed", Boolean(m.error));
  stats.title = m.error ? `error: ${m.error}` : "";
  if (m.done) state.done = true;
}

function showFrame(m) {
  if (typeof m.jpeg !== "string") return;
  const preview = $("preview");
  preview.src = `data:image/jpeg;base64,${m.jpeg}`;
  preview.hidden = false;
  $("preview-time").textContent = `t=${mmss(m.t)}`;
}

function logEvent(t, text, level) {
  const log = $("events");
  const line = el("li", level || null);
  line.append(el("span", "when", clock()));
  if (typeof t === "number") line.append(el("span", "t", `t=${mmss(t)}`));
  line.append(el("span", null, text));
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.append(line);
  while (log.children.length > MAX_EVENTS) log.firstChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

// -- questions and answers ---------------------------------------------------------------------------

function answerBox(id, question) {
  let box = state.answers.get(id);
  if (box) return box;
  const root = el("article", "answer");
  root.dataset.id = id;
  box = {
    root,
    question: el("p", "answer-question", question ?? ""),
    text: el("p", "answer-text"),
    meta: el("p", "answer-meta", "waiting for the model…"),
    error: el("p", "answer-error"),
    started: false,  // answer.start arrived
  };
  box.error.hidden = true;
  root.append(box.question, box.text, box.meta, box.error);
  $("answers").prepend(root);
  state.answers.set(id, box);
  return box;
}

function seenAt(m) {
  const frames = `${plain(m.frames)} ${m.frames === 1 ? "frame" : "frames"}`;
  return typeof m.t === "number" ? `at t=${mmss(m.t)} (${frames})` : `before any frame (${frames})`;
}

function answerStart(m) {
  const box = answerBox(String(m.id), m.question);
  if (m.question !== undefined) box.question.textContent = m.question;
  box.meta.textContent = seenAt(m);
  box.started = true;
}

function answerDelta(m) {
  if (typeof m.text === "string") answerBox(String(m.id)).text.append(m.text);
}

function answerDone(m) {
  const box = answerBox(String(m.id), m.question);
  if (typeof m.text === "string") box.text.textContent = m.text;  // the whole answer, as the server has it
  box.meta.textContent = `${seenAt(m)} · first token ${secs(m.first_token_s)} · ${secs(m.seconds)} in all` +
    ` · stop: ${plain(m.stop_reason)}`;
  box.root.classList.add("done");
  box.root.dataset.stopReason = plain(m.stop_reason);
}

function answerFailed(id, message) {
  const box = answerBox(id);
  box.root.classList.add("failed");
  box.error.textContent = message;
  box.error.hidden = false;
  if (!box.started) box.meta.textContent = "";
}

function failPending(message) {
  for (const [id, box] of state.answers) {
    if (!box.root.classList.contains("done") && !box.root.classList.contains("failed")) answerFailed(id, message);
  }
}

function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  const ws = state.ws;
  if (!question || !ws || ws.readyState !== WebSocket.OPEN) return;
  const id = `q${state.nextQuestion++}`;
  const message = {type: "ask", id, question};
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) message.max_tokens = maxTokens;
  answerBox(id, question);
  ws.send(JSON.stringify(message));
  $("question").value = "";
}

// -- wiring ------------------------------------------------------------------------------------------

function init() {
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) {
    $("api-key").value = saved;
    $("key-box").hidden = false;
  }
  state.committedKey = apiKey();
  $("api-key").addEventListener("change", commitKey);
  $("key-box").addEventListener("submit", (event) => {
    event.preventDefault();
    commitKey();
  });
  $("source-list").addEventListener("change", () => {
    if ($("source-list").value) $("source").value = $("source-list").value;
  });
  $("start-form").addEventListener("submit", start);
  $("stop").addEventListener("click", stop);
  $("refresh").addEventListener("click", () => {
    clearError();
    loadStreams();
  });
  $("ask-form").addEventListener("submit", ask);
  resetView();
  loadSources();
  loadStreams();
}

init();
