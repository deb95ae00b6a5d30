// The chat page: conversations (a tree of messages; the newest branch is shown), streaming, regenerate, votes.
"use strict";

const chat = { conv: null, messages: [], busy: false };

function branch() {
  // From the root, follow the newest child at each step (a regenerated answer is a newer sibling).
  const children = new Map();
  for (const m of chat.messages) {
    const key = m.parent_id === null ? "root" : m.parent_id;
    if (!children.has(key)) children.set(key, []);
    children.get(key).push(m);
  }
  const out = [];
  let key = "root";
  while (children.has(key)) {
    const kids = children.get(key);
    const m = kids[kids.length - 1];
    out.push({ message: m, siblings: kids.length });
    key = m.id;
  }
  return out;
}

// Thumbs drawn as SVG paths: emoji need a font that Debian's Chromium, for one, does not have.
const THUMB_UP = "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6C6.2 8 6 8.5 6 9v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1c.1-.2.2-.5.2-.7v-2z";
const THUMB_DOWN = "M15 3H6c-.8 0-1.5.5-1.8 1.2l-3 7.1c-.1.2-.2.5-.2.7v2a2 2 0 0 0 2 2h6.3l-1 4.6v.3c0 .4.2.8.4 1.1l1.1 1 6.6-6.6c.4-.4.6-.9.6-1.4V5a2 2 0 0 0-2-2zm4 0v12h4V3h-4z";

function voteBox(m) {
  const comment = fw.el("input", { type: "text", placeholder: "comment (optional)", class: "vote-comment" });
  const send = (value, button) => async () => {
    try {
      await fw.call("POST", `/api/messages/${m.id}/votes`, { value, comment: comment.value, idempotency_key: fw.uuid() });
      button.classList.add("voted");
      fw.status(value > 0 ? "Thanks: thumbs up recorded." : "Thanks: thumbs down recorded.");
    } catch (e) { fw.status(e.message, true); }
  };
  const up = fw.el("button", { class: "secondary vote-up", title: "good answer", "aria-label": "good answer" }, fw.icon(THUMB_UP));
  const down = fw.el("button", { class: "secondary vote-down", title: "bad answer", "aria-label": "bad answer" }, fw.icon(THUMB_DOWN));
  up.addEventListener("click", send(1, up));
  down.addEventListener("click", send(-1, down));
  return [up, down, comment];
}

function render() {
  const box = document.getElementById("messages");
  box.replaceChildren();
  const path = branch();
  path.forEach(({ message: m, siblings }, i) => {
    const meta = fw.el("div", { class: "meta" });
    if (m.role === "assistant") {
      meta.append(fw.el("span", {}, m.model_version || ""));
      if (siblings > 1) meta.append(fw.el("span", {}, `answer ${siblings} of ${siblings}`));
      meta.append(...voteBox(m));
      if (i === path.length - 1) {
        meta.append(fw.el("button", { class: "secondary regenerate", onclick: () => regenerate(m) }, "Regenerate"));
      }
    }
    box.append(fw.el("div", { class: `msg ${m.role}`, "data-id": String(m.id) }, fw.el("div", { class: "content" }, m.content), meta));
  });
}

async function loadConversations() {
  const list = document.getElementById("conversations");
  const data = await fw.call("GET", "/api/conversations");
  list.replaceChildren(...data.conversations.map(c => fw.el("li", {
    class: chat.conv === c.id ? "active" : "", "data-id": String(c.id), onclick: () => openConversation(c.id),
  }, c.title || "(untitled)")));
}

async function openConversation(id) {
  const data = await fw.call("GET", `/api/conversations/${id}`);
  chat.conv = id;
  chat.messages = data.messages;
  render();
  await loadConversations();
}

function streamingBubble() {
  const content = fw.el("div", { class: "content" });
  const bubble = fw.el("div", { class: "msg assistant streaming" }, content);
  document.getElementById("messages").append(bubble);
  return content;
}

async function run(path, body, onUser) {
  chat.busy = true;
  document.getElementById("send").disabled = true;
  fw.status("Generating…");
  let content = null;
  try {
    await fw.stream(path, body, ev => {
      if (ev.type === "user") { onUser(ev.message); content = streamingBubble(); }
      else if (ev.type === "delta") { content = content || streamingBubble(); content.textContent += ev.text; }
      else if (ev.type === "done") { chat.messages.push(ev.message); render(); fw.status(""); }
      else if (ev.type === "error") fw.status(ev.message, true);
    });
    await loadConversations();
  } catch (e) {
    fw.status(e.message, true);
  } finally {
    chat.busy = false;
    document.getElementById("send").disabled = false;
  }
}

async function send() {
  const input = document.getElementById("input");
  const text = input.value.trim();
  if (!text || chat.busy) return;
  try {
    if (chat.conv === null) chat.conv = (await fw.call("POST", "/api/conversations", {})).id;
  } catch (e) { fw.status(e.message, true); return; }
  const path = branch();
  const parent = path.length ? path[path.length - 1].message.id : null;
  input.value = "";
  await run(`/api/conversations/${chat.conv}/messages`, { content: text, parent_id: parent }, m => {
    chat.messages.push(m);
    render();
  });
}

async function regenerate(m) {
  if (chat.busy) return;
  const bubble = document.querySelector(`.msg[data-id="${m.id}"]`);
  if (bubble) bubble.remove();
  await run(`/api/messages/${m.id}/regenerate`, {}, () => {});
}

document.addEventListener("DOMContentLoaded", () => {
  fw.tokenBox();
  document.getElementById("send").addEventListener("click", send);
  document.getElementById("input").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  document.getElementById("new-chat").addEventListener("click", () => {
    chat.conv = null; chat.messages = []; render(); loadConversations();
  });
  loadConversations().catch(e => fw.status(e.message, true));
});
