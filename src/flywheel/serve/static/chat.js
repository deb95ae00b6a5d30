// The chat page: conversations (a tree of messages), streaming answers rendered as Markdown, Stop, regenerate, edit
// and resend, moving between branches, votes, renaming and deleting conversations, and the settings panel.
"use strict";

const chat = {
  conv: null,
  messages: [],
  busy: false,
  abort: null, // the AbortController of the answer being streamed
  selected: new Map(), // parent id ("root" for the first turns) -> the child shown; the newest when none
  editing: null, // the id of the user message being edited
};

// Settings, kept in this browser: a system prompt for new conversations, temperature and max tokens for every request.
const SETTINGS_KEY = "flywheel.chat.settings";

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    return {
      system: typeof s.system === "string" ? s.system : "",
      temperature: typeof s.temperature === "number" ? s.temperature : null,
      max_tokens: Number.isInteger(s.max_tokens) ? s.max_tokens : null,
    };
  } catch (e) {
    return { system: "", temperature: null, max_tokens: null };
  }
}

function sampling() {
  const s = loadSettings();
  const out = {};
  if (s.temperature !== null) out.temperature = s.temperature;
  if (s.max_tokens !== null) out.max_tokens = s.max_tokens;
  return out;
}

const keyOf = m => (m.parent_id === null ? "root" : m.parent_id);

function branch() {
  // From the root, follow the selected child at each step (by default the newest: a regenerated answer or an
  // edited turn is a newer sibling).
  const children = new Map();
  for (const m of chat.messages) {
    if (!children.has(keyOf(m))) children.set(keyOf(m), []);
    children.get(keyOf(m)).push(m);
  }
  const out = [];
  let key = "root";
  while (children.has(key)) {
    const kids = children.get(key);
    let index = kids.findIndex(m => m.id === chat.selected.get(key));
    if (index < 0) index = kids.length - 1;
    out.push({ message: kids[index], siblings: kids, index });
    key = kids[index].id;
  }
  return out;
}

function show(m) {
  chat.selected.set(keyOf(m), m.id);
}

// Show the branch of the newest message (the one last worked on), however many siblings were made after it.
function showLatest() {
  const byId = new Map(chat.messages.map(m => [m.id, m]));
  let m = chat.messages.reduce((a, b) => (a === null || b.id > a.id ? b : a), null);
  while (m) { show(m); m = byId.get(m.parent_id); }
}

// Icons drawn as SVG paths: emoji need a font that Debian's Chromium, for one, does not have.
const THUMB_UP = "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6C6.2 8 6 8.5 6 9v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1c.1-.2.2-.5.2-.7v-2z";
const THUMB_DOWN = "M15 3H6c-.8 0-1.5.5-1.8 1.2l-3 7.1c-.1.2-.2.5-.2.7v2a2 2 0 0 0 2 2h6.3l-1 4.6v.3c0 .4.2.8.4 1.1l1.1 1 6.6-6.6c.4-.4.6-.9.6-1.4V5a2 2 0 0 0-2-2zm4 0v12h4V3h-4z";
const PENCIL = "M3 17.25V21h3.75L17.81 9.94l-3.75-3.75L3 17.25zM20.71 7.04a1 1 0 0 0 0-1.41l-2.34-2.34a1 1 0 0 0-1.41 0l-1.83 1.83 3.75 3.75 1.83-1.83z";
const TRASH = "M6 19c0 1.1.9 2 2 2h8c1.1 0 2-.9 2-2V7H6v12zM19 4h-3.5l-1-1h-5l-1 1H5v2h14V4z";

function voteBox(m) {
  const comment = fw.el("input", { type: "text", placeholder: "comment (optional)", class: "vote-comment" });
  const send = (value, button) => async () => {
    try {
      await fw.call("POST", `/api/messages/${m.id}/votes`, { value, comment: comment.value, idempotency_key: fw.uuid() });
      m.vote = value; // the server keeps one vote per voter: the last
      up.classList.toggle("voted", value > 0);
      down.classList.toggle("voted", value < 0);
      fw.status(value > 0 ? "Thanks: thumbs up recorded." : "Thanks: thumbs down recorded.");
    } catch (e) { fw.status(e.message, true); }
  };
  const up = fw.el("button", { class: "secondary vote-up", title: "good answer", "aria-label": "good answer" }, fw.icon(THUMB_UP));
  const down = fw.el("button", { class: "secondary vote-down", title: "bad answer", "aria-label": "bad answer" }, fw.icon(THUMB_DOWN));
  up.addEventListener("click", send(1, up));
  down.addEventListener("click", send(-1, down));
  up.classList.toggle("voted", m.vote === 1); // the stored vote, shown again after a reload
  down.classList.toggle("voted", m.vote === -1);
  return [up, down, comment];
}

// "‹ answer 2 of 3 ›": move between the siblings of a message (regenerated answers, edited turns).
function branchNav(siblings, index, noun) {
  const go = step => () => {
    if (chat.busy) return;
    show(siblings[index + step]);
    chat.editing = null;
    render();
  };
  return fw.el("span", { class: "branch-nav" },
    fw.el("button", { class: "secondary nav-prev", "aria-label": `previous ${noun}`, title: `previous ${noun}`,
      disabled: index === 0 ? "" : null, onclick: go(-1) }, "‹"),
    fw.el("span", { class: "nav-count" }, `${noun} ${index + 1} of ${siblings.length}`),
    fw.el("button", { class: "secondary nav-next", "aria-label": `next ${noun}`, title: `next ${noun}`,
      disabled: index === siblings.length - 1 ? "" : null, onclick: go(1) }, "›"));
}

function answerContent(text) {
  const content = fw.el("div", { class: "content md" });
  content.append(md.render(text));
  for (const pre of content.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const copy = fw.el("button", { class: "secondary copy", title: "copy code", "aria-label": "copy code" }, "Copy");
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText(code.textContent).then(() => fw.status("Code copied."), e => fw.status(e.message, true));
    });
    pre.prepend(copy);
  }
  return content;
}

function editBox(m) {
  const box = fw.el("textarea", { class: "edit-box", "aria-label": "edit your message" });
  box.value = m.content;
  const save = fw.el("button", { class: "edit-send" }, "Send");
  const cancel = fw.el("button", { class: "secondary edit-cancel" }, "Cancel");
  save.addEventListener("click", () => resend(m, box.value));
  cancel.addEventListener("click", () => { chat.editing = null; render(); });
  box.addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); resend(m, box.value); }
    if (e.key === "Escape") { chat.editing = null; render(); }
  });
  return fw.el("div", { class: "editing" }, box, fw.el("div", { class: "row" }, save, cancel));
}

function messageNode({ message: m, siblings, index }, last) {
  const meta = fw.el("div", { class: "meta" });
  let content;
  if (m.role === "assistant") {
    content = answerContent(m.content);
    meta.append(fw.el("span", {}, m.model_version || ""));
    if (m.finish_reason === "cancelled") meta.append(fw.el("span", { class: "tag stopped" }, "stopped"));
    if (m.finish_reason === "length") meta.append(fw.el("span", { class: "tag" }, "cut at max tokens"));
    if (!m.content.trim()) meta.append(fw.el("span", { class: "tag empty" }, "empty answer"));
    if (siblings.length > 1) meta.append(branchNav(siblings, index, "answer"));
    meta.append(...voteBox(m));
    if (last) meta.append(fw.el("button", { class: "secondary regenerate", onclick: () => regenerate(m) }, "Regenerate"));
  } else if (m.role === "user") {
    content = chat.editing === m.id ? editBox(m) : fw.el("div", { class: "content" }, m.content);
    if (siblings.length > 1) meta.append(branchNav(siblings, index, "version"));
    // A turn left unanswered (the answer failed, or the server stopped mid-answer) can be answered again.
    if (last && !chat.busy) meta.append(fw.el("button", { class: "secondary answer-again", onclick: () => answerAgain(m) }, "Answer"));
    if (chat.editing !== m.id) {
      meta.append(fw.el("button", { class: "secondary edit", title: "edit and resend", "aria-label": "edit and resend",
        onclick: () => { if (!chat.busy) { chat.editing = m.id; render(); } } }, fw.icon(PENCIL)));
    }
  } else {
    content = fw.el("div", { class: "content" }, fw.el("span", { class: "label" }, "System prompt: "), m.content);
    if (siblings.length > 1) meta.append(branchNav(siblings, index, "version"));
  }
  return fw.el("div", { class: `msg ${m.role}`, "data-id": String(m.id) }, content, meta);
}

function render() {
  const box = document.getElementById("messages");
  const path = branch();
  box.replaceChildren(...path.map((item, i) => messageNode(item, i === path.length - 1)));
  const edit = box.querySelector(".edit-box");
  if (edit) edit.focus();
}

function conversationItem(c) {
  const rename = fw.el("button", { class: "secondary icon rename", title: "rename", "aria-label": "rename conversation" }, fw.icon(PENCIL));
  const remove = fw.el("button", { class: "secondary icon delete", title: "delete", "aria-label": "delete conversation" }, fw.icon(TRASH));
  const li = fw.el("li", { class: chat.conv === c.id ? "active" : "", "data-id": String(c.id) },
    fw.el("span", { class: "title" }, c.title || "(untitled)"), rename, remove);
  li.addEventListener("click", e => { if (e.target === li || e.target.classList.contains("title")) openConversation(c.id); });
  const title = li.querySelector(".title");
  title.tabIndex = 0; // reachable with Tab, opened with Enter or Space, as a click does
  title.setAttribute("role", "button");
  title.addEventListener("keydown", e => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openConversation(c.id); }
  });
  rename.addEventListener("click", () => startRename(li, c));
  remove.addEventListener("click", () => deleteConversation(c));
  return li;
}

let listLoads = 0;
async function loadConversations() {
  const load = ++listLoads;
  const data = await fw.call("GET", "/api/conversations");
  if (load !== listLoads) return;  // a later load started meanwhile: an older answer must not overwrite its list
  document.getElementById("conversations").replaceChildren(...data.conversations.map(conversationItem));
}

function startRename(li, c) {
  const input = fw.el("input", { type: "text", class: "rename-box", "aria-label": "new title", maxlength: "200" });
  input.value = c.title;
  let done = false;
  const finish = async save => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    try {
      if (save && title && title !== c.title) {
        await fw.call("PATCH", `/api/conversations/${c.id}`, { title });
        fw.status("Renamed.");
      }
    } catch (e) { fw.status(e.message, true); }
    await loadConversations();
  };
  input.addEventListener("keydown", e => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

async function deleteConversation(c) {
  if (!confirm(`Delete "${c.title || "(untitled)"}"? Its messages and votes are deleted for good.`)) return;
  try {
    await fw.call("DELETE", `/api/conversations/${c.id}`);
    if (chat.conv === c.id) newChat();
    fw.status("Conversation deleted.");
  } catch (e) { fw.status(e.message, true); }
  await loadConversations();
}

async function openConversation(id) {
  if (chat.busy) return;
  const data = await fw.call("GET", `/api/conversations/${id}`);
  chat.conv = id;
  chat.messages = data.messages;
  chat.selected = new Map();
  chat.editing = null;
  showLatest();
  render();
  await loadConversations();
}

function newChat() {
  chat.conv = null;
  chat.messages = [];
  chat.selected = new Map();
  chat.editing = null;
  render();
}

function streamingBubble() {
  const content = fw.el("div", { class: "content md" });
  document.getElementById("messages").append(fw.el("div", { class: "msg assistant streaming" }, content));
  return content;
}

function setBusy(busy) {
  chat.busy = busy;
  const button = document.getElementById("send");
  button.textContent = busy ? "Stop" : "Send";
  button.classList.toggle("stop", busy);
  button.setAttribute("aria-label", busy ? "stop generating" : "send");
}

// Stream an answer. Stop aborts the request; the server then stops generating and stores what it had generated
// (finish_reason "cancelled"), which is fetched and shown in place of the streamed text.
async function run(path, body) {
  setBusy(true);
  chat.abort = new AbortController();
  const before = new Set(chat.messages.map(m => m.id));
  fw.status("Generating…");
  let content = null;
  let text = "";
  let failed = false;
  let stored = false;
  try {
    await fw.stream(path, body, ev => {
      if (ev.type === "system" || ev.type === "user") {
        stored = true;
        chat.messages.push(ev.message);
        show(ev.message);
        if (ev.type === "user") { render(); content = streamingBubble(); }
      } else if (ev.type === "delta") {
        content = content || streamingBubble();
        text += ev.text;
        content.replaceChildren(md.render(text));
        content.scrollIntoView({ block: "end" });
      } else if (ev.type === "done") {
        chat.messages.push(ev.message);
        show(ev.message);
        render();
        fw.status("");
      } else if (ev.type === "error") { failed = true; fw.status(ev.message, true); }
    }, chat.abort.signal);
  } catch (e) {
    if (e.name === "AbortError") await fetchStopped(before);
    else { failed = true; fw.status(e.message, true); }
  } finally {
    chat.abort = null;
    setBusy(false);
  }
  // A failed answer: show what is stored (its turn, unanswered, offers Answer; the streamed text was not kept).
  if (failed && chat.conv !== null) {
    chat.messages = (await fw.call("GET", `/api/conversations/${chat.conv}`).catch(() => ({ messages: chat.messages }))).messages;
    render();
  }
  const last = document.querySelector("#messages .msg:last-child");
  if (last) last.scrollIntoView({ block: "end" });
  await loadConversations().catch(e => fw.status(e.message, true));
  return stored;
}

async function fetchStopped(before) {
  // The server stores the stopped answer once it sees the request end: poll for it, more slowly as time passes (a
  // loaded server can take seconds), for up to 30 s.
  fw.status("Stopped.");
  const deadline = Date.now() + 30_000;
  for (let wait = 100; chat.conv !== null; wait = Math.min(wait * 1.5, 1000)) {
    const data = await fw.call("GET", `/api/conversations/${chat.conv}`);
    const fresh = data.messages.filter(m => !before.has(m.id));
    if (fresh.some(m => m.role === "assistant") || Date.now() > deadline) {
      chat.messages = data.messages;
      fresh.forEach(show);
      render();
      return;
    }
    await new Promise(resolve => setTimeout(resolve, wait));
  }
}

async function send() {
  if (chat.busy) { chat.abort.abort(); return; }
  const input = document.getElementById("input");
  input.focus(); // typing goes on in the box, not to the Send button (which becomes Stop)
  const text = input.value.trim();
  if (!text) return;
  const path = branch();
  const parent = path.length ? path[path.length - 1].message.id : null;
  if (path.length && path[path.length - 1].message.role === "user") {
    fw.status("The last turn has no answer yet: press Answer under it (or edit it) before writing the next one.", true);
    return;
  }
  const created = chat.conv === null;
  try {
    if (created) chat.conv = (await fw.call("POST", "/api/conversations", {})).id;
  } catch (e) { fw.status(e.message, true); return; }
  const body = { content: text, parent_id: parent, ...sampling() };
  const system = loadSettings().system.trim();
  if (parent === null && system) body.system = system; // a new conversation starts with the system prompt
  input.value = "";
  const conv = chat.conv;
  if (await run(`/api/conversations/${conv}/messages`, body)) return;
  // Refused before it was stored (a setting out of range, a rate limit, ...): the text comes back to the box, and a
  // conversation made for it alone goes.
  if (!input.value) input.value = text;
  if (created && chat.conv === conv && chat.messages.length === 0) {
    await fw.call("DELETE", `/api/conversations/${conv}`).catch(() => {});
    chat.conv = null;
    await loadConversations().catch(() => {});
  }
}

async function resend(m, text) {
  // An edited turn is a new sibling of the old one: a new branch from the same point; the old branch stays.
  if (chat.busy || !text.trim()) return;
  chat.editing = null;
  await run(`/api/conversations/${chat.conv}/messages`, { content: text.trim(), parent_id: m.parent_id, ...sampling() });
}

async function regenerate(m) {
  if (chat.busy) return;
  const bubble = document.querySelector(`.msg[data-id="${m.id}"]`);
  if (bubble) bubble.remove();
  await run(`/api/messages/${m.id}/regenerate`, sampling());
}

async function answerAgain(m) {
  if (chat.busy) return;
  await run(`/api/messages/${m.id}/regenerate`, sampling());
}

function openSettings() {
  const s = loadSettings();
  document.getElementById("set-system").value = s.system;
  document.getElementById("set-temperature").value = s.temperature === null ? "" : String(s.temperature);
  document.getElementById("set-max-tokens").value = s.max_tokens === null ? "" : String(s.max_tokens);
  document.getElementById("settings-error").textContent = "";
  document.getElementById("settings").showModal();
}

function saveSettings() {
  const error = document.getElementById("settings-error");
  for (const [id, name] of [["set-temperature", "Temperature"], ["set-max-tokens", "Max tokens"]]) {
    if (document.getElementById(id).validity.badInput) { // typed, but no number: the field reads as empty
      error.textContent = `${name} is not a number: correct it, or clear it for the default.`;
      return;
    }
  }
  const t = document.getElementById("set-temperature").value.trim();
  const n = document.getElementById("set-max-tokens").value.trim();
  const temperature = t === "" ? null : Number(t);
  const maxTokens = n === "" ? null : Number(n);
  if (temperature !== null && !(temperature >= 0 && temperature <= 2)) {
    error.textContent = "Temperature must be a number from 0 to 2.";
    return;
  }
  if (maxTokens !== null && !(Number.isInteger(maxTokens) && maxTokens >= 1)) {
    error.textContent = "Max tokens must be a whole number of at least 1.";
    return;
  }
  const system = document.getElementById("set-system").value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({ system, temperature, max_tokens: maxTokens }));
  document.getElementById("settings").close();
  fw.status("Settings saved.");
}

document.addEventListener("DOMContentLoaded", () => {
  fw.tokenBox();
  document.getElementById("send").addEventListener("click", send);
  document.getElementById("input").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); if (!chat.busy) send(); }
  });
  document.getElementById("new-chat").addEventListener("click", () => { if (!chat.busy) { newChat(); loadConversations(); } });
  document.getElementById("open-settings").addEventListener("click", openSettings);
  document.getElementById("settings-save").addEventListener("click", saveSettings);
  document.getElementById("settings-cancel").addEventListener("click", () => document.getElementById("settings").close());
  document.getElementById("settings-reset").addEventListener("click", () => {
    localStorage.removeItem(SETTINGS_KEY);
    openSettings();
  });
  loadConversations().catch(e => fw.status(e.message, true));
});
