// nanoseek web chat: streaming replies with a collapsible Thinking panel, conversations kept in
// this browser (localStorage), stop and regenerate, settings, an API key prompt when needed.
// Model output is only ever inserted as escaped text: the markdown renderer escapes first.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("nanoseek." + key); return v === null ? fallback : JSON.parse(v); }
    catch { return fallback; }
  },
  set(key, value) { localStorage.setItem("nanoseek." + key, JSON.stringify(value)); },
};

let conversations = store.get("conversations", []);
let currentId = store.get("current", null);
let controller = null; // the AbortController of the reply being streamed
let contextLength = null; // from /v1/models: max_tokens never asks for more than the window
// the settings panel's values until the user changes them (a long chain_sum answer runs to ~540 tokens)
const DEFAULTS = { temperature: 0.6, maxTokens: 1024 };

// ---------------------------------------------------------------------------------------
// markdown, safely: escape everything, then add a few known tags

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function inline(s) { // s is already escaped
  return s
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
}

function renderMarkdown(text) {
  const out = [];
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) { // a fenced code block (its first line may name the language)
      const body = part.replace(/^[^\n]*\n/, "");
      out.push("<pre><code>" + escapeHtml(body) + "</code></pre>");
      return;
    }
    let list = null;
    const close = () => { if (list) { out.push(list === "ul" ? "</ul>" : "</ol>"); list = null; } };
    for (const raw of part.split("\n")) {
      const line = escapeHtml(raw);
      let m;
      if ((m = line.match(/^(#{1,4})\s+(.*)$/))) {
        close(); out.push(`<h${m[1].length + 2}>${inline(m[2])}</h${m[1].length + 2}>`);
      } else if ((m = line.match(/^\s*[-*]\s+(.*)$/))) {
        if (list !== "ul") { close(); out.push("<ul>"); list = "ul"; }
        out.push("<li>" + inline(m[1]) + "</li>");
      } else if ((m = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
        if (list !== "ol") { close(); out.push("<ol>"); list = "ol"; }
        out.push("<li>" + inline(m[1]) + "</li>");
      } else if (line.trim() === "") {
        close();
      } else {
        close(); out.push("<p>" + inline(line) + "</p>");
      }
    }
    close();
  });
  return out.join("");
}

// ---------------------------------------------------------------------------------------
// conversations

function save() {
  store.set("conversations", conversations);
  store.set("current", currentId);
}

function current() { return conversations.find((c) => c.id === currentId) || null; }

function newConversation() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
    messages: [], updated: Date.now() };
  conversations.unshift(c);
  currentId = c.id;
  save();
  return c;
}

function renderList() {
  const ul = $("conversations");
  ul.textContent = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    if (c.id === currentId) li.className = "active";
    const open = document.createElement("button");
    open.className = "open";
    open.type = "button";
    open.textContent = c.title;
    open.title = c.title;
    open.onclick = () => { if (controller) return; currentId = c.id; save(); renderAll(); closeSidebar(); };
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.setAttribute("aria-label", "Delete conversation");
    del.textContent = "\u00d7";
    del.onclick = () => {
      if (controller) return;
      conversations = conversations.filter((x) => x.id !== c.id);
      if (currentId === c.id) currentId = conversations.length ? conversations[0].id : null;
      save(); renderAll();
    };
    li.append(open, del);
    ul.append(li);
  }
}

// A calculator call and its output in the reasoning, as DeepSeek's tool tokens write them:
// shown as one chip ("46*25 = 1150"); a call still waiting for its output as "46*25 = ...".
const CALL = /<\uff5ctool\u2581calls\u2581begin\uff5c>(?:<\uff5ctool\u2581call\u2581begin\uff5c>([^<]*)<\uff5ctool\u2581sep\uff5c>([^<]*)(?:<\uff5ctool\u2581call\u2581end\uff5c>)?)?(?:<\uff5ctool\u2581calls\u2581end\uff5c>)?(?:<\uff5ctool\u2581output\u2581begin\uff5c>([^<]*)(<\uff5ctool\u2581output\u2581end\uff5c>)?)?/g;

function reasoningNodes(text) {
  const nodes = [];
  let at = 0;
  for (const m of text.matchAll(CALL)) {
    nodes.push(document.createTextNode(text.slice(at, m.index)));
    const chip = document.createElement("span");
    chip.className = "tool-call";
    chip.title = m[1] || "tool";
    const done = m[4] !== undefined;
    chip.textContent = `${m[2] || ""} = ${done ? m[3] : "\u2026"}`;
    nodes.push(chip);
    at = m.index + m[0].length;
  }
  nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

function messageNode(m, isLast) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  if (m.role === "user") {
    const b = document.createElement("div");
    b.className = "bubble";
    b.textContent = m.content;
    div.append(b);
    return div;
  }
  if (m.reasoning) {
    const d = document.createElement("details");
    d.className = "thinking";
    d.open = !!m.thinkingOpen;
    // setting .open fires "toggle" later, maybe after a re-render replaced this element:
    // only a panel still on the page speaks for the user
    d.ontoggle = () => { if (d.isConnected) m.thinkingOpen = d.open; };
    const s = document.createElement("summary");
    s.textContent = m.content || !m.streaming ? "Thinking" : "Thinking\u2026";
    const r = document.createElement("div");
    r.className = "reasoning";
    r.append(...reasoningNodes(m.reasoning));
    d.append(s, r);
    div.append(d);
  }
  const a = document.createElement("div");
  a.className = "answer";
  a.innerHTML = renderMarkdown(m.content || "");
  div.append(a);
  if (m.note) {
    const n = document.createElement("div");
    n.className = "note";
    n.textContent = m.note;
    div.append(n);
  }
  if (isLast && !m.streaming) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const regen = document.createElement("button");
    regen.type = "button";
    regen.className = "regenerate";
    regen.textContent = "Regenerate";
    regen.onclick = regenerate;
    actions.append(regen);
    div.append(actions);
  }
  return div;
}

function renderMessages() {
  const box = $("messages");
  const c = current();
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.textContent = "";
  if (!c) return;
  c.messages.forEach((m, i) => box.append(messageNode(m, i === c.messages.length - 1)));
  if (atBottom || controller) box.scrollTop = box.scrollHeight;
}

function renderAll() { renderList(); renderMessages(); }

function showError(text) {
  const e = $("error");
  e.textContent = text || "";
  e.hidden = !text;
}

// ---------------------------------------------------------------------------------------
// talking to the server

function settings() {
  return { temperature: Number(store.get("temperature", DEFAULTS.temperature)),
           maxTokens: Number(store.get("maxTokens", DEFAULTS.maxTokens)) };
}

async function post(body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = store.get("apiKey", null);
  if (key) headers.Authorization = "Bearer " + key;
  return fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal });
}

async function loadModel() {
  try {
    const key = store.get("apiKey", null);
    const r = await fetch("/v1/models", { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (r.ok) { const j = await r.json(); contextLength = (j.data[0] && j.data[0].context_length) || 0; }
  } catch { /* offline: the request itself will say so */ }
}

async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; }
  catch { return resp.status + " " + resp.statusText; }
}

async function complete(c) {
  const s = settings();
  const history = c.messages.map((m) => ({ role: m.role, content: m.content || "" }));
  const reply = { role: "assistant", content: "", reasoning: "", streaming: true, thinkingOpen: true };
  c.messages.push(reply);
  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  showError("");
  renderMessages();
  const body = () => ({ messages: history, stream: true, temperature: s.temperature,
    max_tokens: contextLength ? Math.min(s.maxTokens, contextLength) : s.maxTokens });
  try {
    if (contextLength === null) await loadModel();
    let resp = await post(body(), controller.signal);
    if (resp.status === 401) {
      const key = window.prompt("This server needs an API key:");
      if (key) {
        store.set("apiKey", key.trim());
        await loadModel();
        resp = await post(body(), controller.signal);
      }
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { finished = true; break; }
          const chunk = JSON.parse(data);
          const ch = chunk.choices && chunk.choices[0];
          if (!ch) continue;
          const d = ch.delta || {};
          if (d.reasoning_content) reply.reasoning += d.reasoning_content;
          if (d.content) {
            if (!reply.content && reply.reasoning) reply.thinkingOpen = false; // the answer begins: fold
            reply.content += d.content;
          }
          if (ch.finish_reason === "length") reply.note = "(stopped at the token limit)";
        }
      }
      renderMessages();
    }
    if (!finished) throw new TypeError("the stream ended early");
  } catch (err) {
    if (err.name === "AbortError") reply.note = "(stopped)";
    else if (err instanceof TypeError) showError("Connection lost: is the nanoseek server still running? " + err.message);
    else showError(err.message);
    if (!reply.content && !reply.reasoning && err.name !== "AbortError") c.messages.pop();
  } finally {
    reply.streaming = false;
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    c.updated = Date.now();
    save();
    renderAll();
  }
}

function send(text) {
  const c = current() || newConversation();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  save();
  renderAll();
  return complete(c);
}

function regenerate() {
  const c = current();
  if (!c || controller) return;
  if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  if (c.messages.length) complete(c);
}

// ---------------------------------------------------------------------------------------
// the page

function closeSidebar() { $("sidebar").classList.remove("open"); $("scrim").hidden = true; }

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").onclick = () => { if (controller) controller.abort(); };
$("new-chat").onclick = () => { if (!controller) { newConversation(); renderAll(); closeSidebar(); } };
$("menu").onclick = () => { $("sidebar").classList.add("open"); $("scrim").hidden = false; };
$("scrim").onclick = closeSidebar;
$("forget-key").onclick = () => { localStorage.removeItem("nanoseek.apiKey"); };
for (const [id, key] of [["temperature", "temperature"], ["max-tokens", "maxTokens"]]) {
  $(id).value = store.get(key, DEFAULTS[key]);
  $(id).onchange = () => { const v = Number($(id).value); if (!Number.isNaN(v)) store.set(key, v); };
}
const online = () => { $("status").textContent = navigator.onLine ? "" : "offline"; };
window.addEventListener("online", online);
window.addEventListener("offline", online);
online();
if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
renderAll();
