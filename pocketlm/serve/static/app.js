// pocketlm's web page: Chat, Arena and Dashboard over the server's own API. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const DASH_INTERVAL_MS = 5000;

// ---- API access ------------------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem("pocketlm.apiKey") || "";
}

// A stable id for this browser, sent as `user`: the server assigns experiment variants by it,
// so one person keeps one variant across requests.
function userId() {
  let id = localStorage.getItem("pocketlm.user");
  if (!id) {
    id = "web-" + Math.random().toString(36).slice(2, 12);
    localStorage.setItem("pocketlm.user", id);
  }
  return id;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

// The message of an error response ({"error": {"message"}}), or the status line when it has none.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: keep the status line */ }
  return new Error(message);
}

async function api(path, body) {
  const options = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const response = await fetch(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function sendFeedback(id, rating, comment) {
  const body = { id, rating };
  if (comment) body.comment = comment;
  return api("/v1/feedback", body);
}

// Stream a chat completion. `onText(piece)` is called as text arrives, `onMeta({id, variant})`
// as soon as both are known, and `onSources(sources, cited)` when a model that answers from an index
// sends the passages it was given (first chunk) and the numbers its answer cites (last chunk).
// Resolves to {id, variant, text, sources, cited}; rejects with the server's message.
async function streamChat(request, onText, onMeta, signal, onSources) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(true), signal,
    body: JSON.stringify({ ...request, stream: true, user: userId() }),
  });
  if (!response.ok) throw await errorOf(response);
  const meta = { id: response.headers.get("X-Request-Id"), variant: response.headers.get("X-Pocketlm-Variant") };
  let text = "", buffer = "", done = false, sources = null, cited = null;
  if (meta.id || meta.variant) onMeta(meta);

  // Server-sent events: "data: <json>" lines, events separated by blank lines, "data: [DONE]" last.
  const handle = (line) => {
    if (!line.startsWith("data:")) return;
    const data = line.slice(5).trim();
    if (data === "[DONE]") { done = true; return; }
    const event = JSON.parse(data);
    if (event.error) throw new Error(event.error.message || "generation failed");
    if ((event.id && event.id !== meta.id) || (event.variant && event.variant !== meta.variant)) {
      meta.id = event.id || meta.id;
      meta.variant = event.variant || meta.variant;
      onMeta(meta);
    }
    const choice = event.choices && event.choices[0];
    if (Array.isArray(event.sources)) { sources = event.sources; if (onSources) onSources(sources, cited); }
    if (choice && Array.isArray(choice.cited)) { cited = choice.cited; if (onSources) onSources(sources, cited); }
    const piece = choice && choice.delta && choice.delta.content;
    if (piece) { text += piece; onText(piece); }
  };

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  try {
    while (!done) {
      const { value, done: end } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !end });
      const lines = buffer.split("\n");
      buffer = end ? "" : lines.pop();  // keep a partial last line for the next read
      for (const line of lines) { handle(line); if (done) break; }
      if (end) break;
    }
  } finally {
    reader.cancel().catch(() => {});  // closes the connection if we stopped early; a no-op otherwise
  }
  if (!done) throw new Error("the stream ended before [DONE]");
  return { id: meta.id, variant: meta.variant, text, sources, cited };
}

// The passages an answer was given, under it: numbered as the answer cites them, the document and title,
// a short excerpt (the whole passage on hover, and when opened), cited ones marked.
const EXCERPT_CHARS = 140;

function renderSources(box, sources, cited) {
  if (!box) return;
  box.hidden = !sources || sources.length === 0;
  if (box.hidden) { box.replaceChildren(); return; }
  const citedSet = new Set(cited || []);
  const head = document.createElement("div");
  head.className = "sources-head";
  head.textContent = cited ? `Sources (${citedSet.size} cited)` : "Sources";
  const list = document.createElement("ol");
  for (const s of sources) {
    const item = document.createElement("li");
    item.dataset.testid = "source";
    item.dataset.number = s.number;
    item.dataset.docId = s.doc_id;
    item.dataset.cited = citedSet.has(s.number) ? "true" : "false";
    item.classList.toggle("cited", citedSet.has(s.number));
    item.title = s.text;
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const label = document.createElement("span");
    label.className = "source-label";
    label.dataset.testid = "source-label";
    label.textContent = `[${s.number}] ${s.title ? s.title + " · " : ""}${s.doc_id}`;
    const excerpt = document.createElement("span");
    excerpt.className = "excerpt";
    excerpt.dataset.testid = "source-excerpt";
    const flat = String(s.text).replace(/\s+/g, " ").trim();
    excerpt.textContent = flat.length > EXCERPT_CHARS ? flat.slice(0, EXCERPT_CHARS) + "…" : flat;
    summary.append(label, " ", excerpt);
    if (citedSet.has(s.number)) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "cited";
      summary.append(" ", badge);
    }
    const full = document.createElement("div");
    full.className = "source-text";
    full.dataset.testid = "source-text";
    full.textContent = s.text;
    const where = document.createElement("div");
    where.className = "muted";
    where.textContent = `${s.source}, characters ${s.start}–${s.end}, score ${Number(s.score).toPrecision(3)}`;
    details.append(summary, full, where);
    item.append(details);
    list.append(item);
  }
  box.replaceChildren(head, list);
}

function showError(box, error) {
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function number(input, fallback) {
  const value = parseFloat(input.value);
  return Number.isFinite(value) ? value : fallback;
}

// ---- models ----------------------------------------------------------------------------------

let models = [];  // entries of /v1/models

async function loadModels() {
  try {
    models = (await api("/v1/models")).data || [];
    showError($("chat-error"), null);
  } catch (error) {
    models = [];
    showError($("chat-error"), error);
    showError($("arena-error"), error);
  }
  const label = (m) => m.variants ? `${m.id} (experiment: ${m.variants.join(", ")})`
    : m.index ? `${m.id} (answers from ${m.index.split("/").filter(Boolean).pop()})` : m.id;
  models = models.filter((m) => m.task !== "embedding");  // /v1/embeddings' models do not chat
  const fill = (select, chosen) => {
    const previous = select.value;
    select.replaceChildren(...models.map((m) => new Option(label(m), m.id)));
    if (models.some((m) => m.id === previous)) select.value = previous;
    else if (chosen) select.value = chosen;
  };
  // The arena defaults to the first two plain models (not the experiment, which picks for you).
  const plain = models.filter((m) => !m.variants).map((m) => m.id);
  fill($("chat-model"), plain[0]);
  fill($("arena-left-model"), plain[0]);
  fill($("arena-right-model"), plain[1] || plain[0]);
}

// ---- chat ------------------------------------------------------------------------------------

const chat = { messages: [], controller: null };

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.testid = role + "-message";
  div.textContent = text;
  $("chat-messages").append(div);
  return div;
}

function wireFeedback(bubble, id) {
  bubble.dataset.responseId = id;
  const status = bubble.querySelector("[data-testid=feedback-status]");
  for (const button of bubble.querySelectorAll(".thumb")) {
    button.disabled = false;
    button.addEventListener("click", async () => {
      status.textContent = "sending…";
      try {
        await sendFeedback(id, button.dataset.rating, bubble.querySelector(".comment").value.trim());
        bubble.querySelectorAll(".thumb").forEach((b) => b.classList.toggle("chosen", b === button));
        status.textContent = `feedback recorded (${button.dataset.rating})`;
      } catch (error) {
        status.textContent = "feedback failed: " + error.message;
      }
    });
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value.trim();
  if (!content || chat.controller) return;
  showError($("chat-error"), null);
  input.value = "";
  const turn = { role: "user", content };
  chat.messages.push(turn);
  const userBubble = addBubble("user", content);

  const bubble = $("assistant-template").content.firstElementChild.cloneNode(true);
  $("chat-messages").append(bubble);
  const textBox = bubble.querySelector(".msg-text");
  const variantLabel = bubble.querySelector("[data-testid=variant-label]");
  const sourcesBox = bubble.querySelector("[data-testid=sources]");
  chat.controller = new AbortController();
  $("chat-send").disabled = true;
  try {
    const result = await streamChat(
      { model: $("chat-model").value, messages: chat.messages,
        temperature: number($("chat-temperature"), 0.7), max_tokens: Math.round(number($("chat-max-tokens"), 128)) },
      (piece) => { textBox.textContent += piece; bubble.scrollIntoView({ block: "end" }); },
      (meta) => { variantLabel.textContent = meta.variant ? "variant: " + meta.variant : ""; },
      chat.controller.signal,
      (sources, cited) => renderSources(sourcesBox, sources, cited));
    chat.messages.push({ role: "assistant", content: result.text });
    bubble.dataset.state = "done";
    wireFeedback(bubble, result.id);
  } catch (error) {
    // The turn failed: drop it from the conversation so the next message is not sent after it.
    const at = chat.messages.indexOf(turn);  // -1 when "new chat" cleared the conversation
    if (at >= 0) chat.messages.splice(at);
    userBubble.classList.add("failed");
    bubble.dataset.state = "error";
    if (error.name !== "AbortError") showError($("chat-error"), error);
  } finally {
    chat.controller = null;
    $("chat-send").disabled = false;
  }
}

function newChat() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  $("chat-messages").replaceChildren();
  showError($("chat-error"), null);
  $("chat-input").focus();
}

// ---- arena -----------------------------------------------------------------------------------

let arena = null;  // {left: {id}, right: {id}} of the last finished round

function setVotes(enabled) {
  document.querySelectorAll(".votes button").forEach((b) => { b.disabled = !enabled; });
}

async function runSide(side, prompt) {
  const column = $(`arena-${side}`), textBox = $(`arena-${side}-text`), label = $(`arena-${side}-variant`);
  const sourcesBox = $(`arena-${side}-sources`);
  column.dataset.state = "streaming";
  textBox.textContent = "";
  label.textContent = "";
  renderSources(sourcesBox, null);
  try {
    const result = await streamChat(
      { model: $(`arena-${side}-model`).value, messages: [{ role: "user", content: prompt }],
        temperature: number($("arena-temperature"), 0.7), max_tokens: Math.round(number($("arena-max-tokens"), 128)) },
      (piece) => { textBox.textContent += piece; },
      (meta) => { label.textContent = meta.variant ? "(" + meta.variant + ")" : ""; },
      undefined, (sources, cited) => renderSources(sourcesBox, sources, cited));
    column.dataset.state = "done";
    column.dataset.responseId = result.id;
    return result;
  } catch (error) {
    column.dataset.state = "error";
    textBox.textContent = "error: " + error.message;
    throw error;
  }
}

async function sendArena(event) {
  event.preventDefault();
  const prompt = $("arena-prompt").value.trim();
  if (!prompt) return;
  arena = null;
  setVotes(false);
  showError($("arena-error"), null);
  $("arena-vote-status").textContent = "";
  $("arena-send").disabled = true;
  // Both sides at once; a vote needs both answers.
  const [left, right] = await Promise.allSettled([runSide("left", prompt), runSide("right", prompt)]);
  $("arena-send").disabled = false;
  const failed = [left, right].find((r) => r.status === "rejected");
  if (failed) { showError($("arena-error"), failed.reason); return; }
  arena = { left: left.value, right: right.value };
  setVotes(true);
}

// left / right: the winner up, the loser down; tie: both up; bad: both down.
const VOTES = { left: ["up", "down"], right: ["down", "up"], tie: ["up", "up"], bad: ["down", "down"] };

async function vote(kind) {
  if (!arena) return;
  const [leftRating, rightRating] = VOTES[kind];
  const status = $("arena-vote-status");
  setVotes(false);
  status.textContent = "sending…";
  try {
    // the thumbs count in each variant's up rate; the pair is the arena's battle (leaderboard, DPO pairs)
    await Promise.all([sendFeedback(arena.left.id, leftRating), sendFeedback(arena.right.id, rightRating),
                       api("/v1/arena/votes", { left: arena.left.id, right: arena.right.id, winner: kind })]);
    status.textContent = `vote recorded: ${$("vote-" + kind).textContent.toLowerCase()}`;
    arena = null;  // one vote per round
  } catch (error) {
    status.textContent = "";
    showError($("arena-error"), error);
    setVotes(true);
  }
}

// ---- dashboard -------------------------------------------------------------------------------

let dashTimer = null;

// Formatting that never fails on a missing field: anything absent shows as "–".
const missing = (v) => v === undefined || v === null || (typeof v === "number" && !Number.isFinite(v));
const fmt = (v, digits = 1) => missing(v) ? "–" : typeof v === "number" ? v.toFixed(digits) : String(v);
const pct = (v) => missing(v) ? "–" : (100 * v).toFixed(1) + "%";
const raw = (v) => missing(v) ? "–" : String(v);
const get = (obj, path) => path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);

function pCell(test) {
  if (!test || missing(test.p)) return { text: "–", title: (test && test.reason) || "" };
  return { text: test.p.toPrecision(3) + (test.significant ? " *" : ""), title: test.significant ? "p < alpha" : "" };
}

// Fill a table body; each row is [cells], a cell a string or {text, title, field}.
function fillTable(table, rows, rowAttrs) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows.map((cells, i) => {
    const tr = document.createElement("tr");
    Object.assign(tr.dataset, rowAttrs ? rowAttrs(i) : {});
    for (const cell of cells) {
      const td = document.createElement("td");
      const c = typeof cell === "object" ? cell : { text: cell };
      td.textContent = c.text;
      if (c.title) td.title = c.title;
      if (c.field) td.dataset.field = c.field;
      tr.append(td);
    }
    return tr;
  }));
}

function renderStats(stats) {
  const report = (stats && stats.report) || {};
  const variants = Object.entries(report.variants || {});
  const names = variants.map(([name]) => name);
  fillTable($("dash-variants"), variants.map(([name, v]) => [
    { text: name + (name === report.baseline ? " (baseline)" : ""), field: "variant" },
    { text: raw(v.requests), field: "requests" }, { text: raw(v.errors), field: "errors" },
    { text: pct(v.error_rate), field: "error_rate" },
    { text: fmt(get(v, "latency_ms.p50")), field: "latency_p50" }, { text: fmt(get(v, "latency_ms.p99")), field: "latency_p99" },
    { text: fmt(get(v, "ttft_ms.p50")), field: "ttft_p50" },
    { text: raw(v.thumbs_up), field: "thumbs_up" }, { text: raw(v.thumbs_down), field: "thumbs_down" },
    { text: pct(v.thumbs_up_rate), field: "thumbs_up_rate" },
  ]), (i) => ({ testid: "dash-variant-row", variant: names[i] }));

  const comparisons = report.comparisons || [];
  fillTable($("dash-comparisons"), comparisons.map((c) => [
    raw(c.variant),
    `${pct(get(c, "thumbs_up_rate.rate"))} vs ${pct(get(c, "thumbs_up_rate.baseline_rate"))}`, pCell(c.thumbs_up_rate),
    `${pct(get(c, "error_rate.rate"))} vs ${pct(get(c, "error_rate.baseline_rate"))}`, pCell(c.error_rate),
    `${fmt(get(c, "latency.median_ms"))} vs ${fmt(get(c, "latency.baseline_median_ms"))}`, pCell(c.latency),
  ]));
  const board = report.arena || {};
  fillTable($("dash-arena"), (board.variants || []).map((v, i) => [
    String(i + 1), { text: v.name, field: "variant" }, { text: fmt(v.rating, 0), field: "rating" },
    `${fmt(v.ci_low, 0)} – ${fmt(v.ci_high, 0)}`, raw(v.battles), `${v.wins} / ${v.ties} / ${v.losses}`,
  ]), (i) => ({ testid: "dash-arena-row", variant: board.variants[i].name }));
  $("dash-arena-votes").textContent = board.battles
    ? `Bradley-Terry, ${board.battles} vote${board.battles === 1 ? "" : "s"}` : "no arena votes yet";
  $("dash-baseline").textContent = report.baseline ? `against ${report.baseline}; * : p < ${fmt(report.alpha, 2)}` : "";
  $("dash-experiment").textContent = stats && stats.experiment ? "experiment: " + stats.experiment : "";
  $("dash-notes").replaceChildren(...(report.notes || []).map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    return li;
  }));

  const live = Object.entries((stats && stats.live) || {});
  fillTable($("dash-live"), live.map(([name, v]) => [
    name, raw(v.model), raw(v.experiment), { text: raw(v.queue_depth), field: "queue_depth" },
    { text: raw(v.active_sequences), field: "active_sequences" },
  ]), (i) => ({ testid: "dash-live-row", variant: live[i][0] }));
}

function renderPipelines(listing) {
  const runs = (listing && listing.runs) || [];
  const body = $("dash-pipelines").tBodies[0];
  body.replaceChildren(...runs.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.testid = "dash-pipeline-row";
    tr.dataset.run = r.run;
    for (const text of [r.run, r.pipeline, raw(r.stages), fmt(r.wall_s), raw(r.finished)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const link = document.createElement("td");
    if (r.report) {
      const a = document.createElement("a");
      a.href = `/pipelines/${encodeURIComponent(r.run)}/report`;
      a.target = "_blank";
      a.textContent = "report";
      link.append(a);
    } else {
      link.textContent = "–";
    }
    tr.append(link);
    return tr;
  }));
}

async function refreshDashboard() {
  try {
    renderStats(await api("/api/stats"));
    renderPipelines(await api("/api/pipelines"));
    showError($("dash-error"), null);
  } catch (error) {
    showError($("dash-error"), error);
  }
  $("dash-updated").textContent = new Date().toLocaleTimeString();
}

// ---- tabs and start-up -----------------------------------------------------------------------

function showTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== "panel-" + name; });
  clearInterval(dashTimer);
  dashTimer = null;
  if (name === "dashboard") {
    refreshDashboard();
    // Only while the tab is shown and the page is visible.
    dashTimer = setInterval(() => { if (!document.hidden) refreshDashboard(); }, DASH_INTERVAL_MS);
  }
}

document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-new").addEventListener("click", newChat);
$("arena-form").addEventListener("submit", sendArena);
document.querySelectorAll(".votes button").forEach((b) => b.addEventListener("click", () => vote(b.dataset.vote)));
$("dash-refresh").addEventListener("click", refreshDashboard);

$("api-key-form").addEventListener("submit", (e) => { e.preventDefault(); $("api-key").blur(); });
$("api-key").value = apiKey();
$("api-key").addEventListener("change", () => {
  localStorage.setItem("pocketlm.apiKey", $("api-key").value.trim());
  loadModels();
});

loadModels();
