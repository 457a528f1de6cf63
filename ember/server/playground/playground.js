// ember playground: a chat against this server's OpenAI API (/v1/models, /v1/chat/completions), streamed over
// SSE read from fetch's body. No build step, no dependencies: served as is from the ember package.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message + (body.error.param ? " (" + body.error.param + ")" : "");
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { showError("/v1/models: " + (await errorMessage(resp))); return; }
  const select = $("model");
  const previous = select.value;
  select.textContent = "";
  for (const card of (await resp.json()).data) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.parent ? card.id + " (LoRA on " + card.parent + ")" : card.id;
    select.appendChild(option);
    if (!card.parent) $("server-model").textContent = "serving " + card.id;
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  showError("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.dataset.role = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function addMeta(div, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  div.appendChild(meta);
}

// The request body from the settings; throws with a message naming the field on bad input.
function buildRequest() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    model: $("model").value,
    messages: messages.concat(state.history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  const schemaText = $("schema").value.trim();
  if (schemaText) {
    let schema;
    try { schema = JSON.parse(schemaText); } catch (e) { throw new Error("JSON schema: not valid JSON (" + e.message + ")"); }
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: schema, strict: true } };
  }
  return body;
}

// Yields the JSON payload of every SSE event in the response body until [DONE].
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      } else if (line === "" && data.length) {  // a blank line ends an event
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") return;
        yield JSON.parse(payload);
      }
    }
  }
}

function formatStats(numTokens, start, firstAt, now, exact) {
  if (firstAt === null) return "waiting for the first token...";
  const seconds = (now - firstAt) / 1000;
  const rate = numTokens > 1 && seconds > 0 ? (numTokens - 1) / seconds : 0;
  return (exact ? "" : "~") + numTokens + " tokens · " + rate.toFixed(1) + " tok/s · first token " +
    Math.round(firstAt - start) + " ms";
}

async function send(text) {
  showError("");
  let body;
  try { body = buildRequest(); } catch (e) { showError(e.message); return; }
  state.history.push({ role: "user", content: text });
  body.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  if (body.response_format) bubble.classList.add("json");
  const content = bubble.querySelector(".content");
  const stats = $("stats");
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const start = performance.now();
  let firstAt = null, numChunks = 0, reply = "", usage = null, finish = null, served = body.model;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                     signal: state.controller.signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    stats.textContent = formatStats(0, start, null, start, false);
    for await (const event of sseEvents(resp)) {
      if (event.error) throw new Error(event.error.message);
      if (event.model) served = event.model;
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta) {
          if (firstAt === null) firstAt = performance.now();
          numChunks += 1;
          reply += delta;
          content.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
          stats.textContent = formatStats(numChunks, start, firstAt, performance.now(), false);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const end = performance.now();
    const numTokens = usage ? usage.completion_tokens : numChunks;
    stats.textContent = formatStats(numTokens, start, firstAt, end, Boolean(usage));
    let meta = served + " · finish: " + (finish || "?");
    if (body.response_format) {
      try { JSON.parse(reply); meta += " · valid JSON"; } catch (e) { meta += " · not JSON (" + e.message + ")"; }
    }
    addMeta(bubble, meta);
    bubble.dataset.done = "true";
    state.history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      addMeta(bubble, "stopped");
      state.history.push({ role: "assistant", content: reply });
    } else {
      showError(e.message);
      state.history.pop();  // the failed turn is not part of the conversation
      if (!reply) bubble.remove();
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => { state.history = []; $("messages").textContent = ""; $("stats").textContent = ""; showError(""); });
$("api-key").value = localStorage.getItem("ember-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("ember-api-key", $("api-key").value); loadModels(); });
loadModels();
