// The labelers' workbench: ranking tasks (K answers, ties allowed, unsafe flags) and role-play demonstrations.
"use strict";
fw.tokenKind = "staff"; // a labeler's or admin's token, kept apart from the chat page's

const lab = { tab: null, task: null, key: null, rp: { task: null, key: null, messages: [], suggestions: [], draft: null } };

// How many tasks of this kind the labeler could still take (the one shown included).
function showWaiting(id, n) {
  document.getElementById(id).textContent = n ? `${n} task${n === 1 ? "" : "s"} waiting for you.` : "";
}

function showMessages(box, messages) {
  box.replaceChildren(...messages.map(m => fw.el("div", { class: `msg ${m.role}` },
    fw.el("div", { class: "muted" }, m.role), fw.el("div", { class: "content" }, m.content))));
}

async function nextRanking() {
  const data = await fw.call("GET", "/api/label/next?kind=ranking");
  lab.task = data.task;
  showWaiting("rank-waiting", data.waiting);
  lab.key = fw.uuid(); // one key per task: a retried submission is recognised, never counted twice
  document.getElementById("rank-comment").value = "";
  const prompt = document.getElementById("rank-prompt");
  const box = document.getElementById("rank-candidates");
  if (!lab.task) {
    prompt.replaceChildren(fw.el("p", {}, "No ranking task is waiting. Thank you!"));
    box.replaceChildren();
    document.getElementById("rank-submit").disabled = true;
    document.getElementById("rank-skip").disabled = true;
    return;
  }
  document.getElementById("rank-submit").disabled = false;
  document.getElementById("rank-skip").disabled = false;
  showMessages(prompt, lab.task.prompt);
  const k = lab.task.candidates.length;
  box.replaceChildren(...lab.task.candidates.map((c, i) => {
    const select = fw.el("select", { class: "rank", "data-candidate": String(c.id), "aria-label": `rank of answer ${i + 1}` },
      ...Array.from({ length: k }, (_, r) => fw.el("option", { value: String(r + 1) }, String(r + 1))));
    select.value = String(i + 1);
    const unsafe = fw.el("input", { type: "checkbox", class: "unsafe", "data-candidate": String(c.id) });
    return fw.el("div", { class: "card candidate", "data-candidate": String(c.id) },
      fw.el("div", {}, fw.el("label", {}, "rank ", select), fw.el("label", { class: "muted" }, unsafe, " unsafe")),
      fw.el("div", { class: "text" }, c.text));
  }));
}

async function submitRanking() {
  if (!lab.task) return;
  const ranks = new Map();
  for (const s of document.querySelectorAll("#rank-candidates select.rank")) {
    const r = Number(s.value);
    if (!ranks.has(r)) ranks.set(r, []);
    ranks.get(r).push(Number(s.dataset.candidate));
  }
  const order = [...ranks.keys()].sort((a, b) => a - b).map(r => ranks.get(r));
  if (order.length < 2) { fw.status("All answers are tied: rank at least one answer above another.", true); return; }
  const unsafe = [...document.querySelectorAll("#rank-candidates input.unsafe:checked")].map(x => Number(x.dataset.candidate));
  try {
    await fw.call("POST", "/api/label/rankings", {
      task_id: lab.task.id, order, unsafe, comment: document.getElementById("rank-comment").value,
      idempotency_key: lab.key,
    });
    fw.status(`Ranking of task ${lab.task.id} saved.`);
    await nextRanking();
  } catch (e) { fw.status(e.message, true); }
}

// Pass a task over: the server stops offering it to this labeler (the comment box, if any, says why).
async function skipTask(task, reason) {
  await fw.call("POST", "/api/label/skip", { task_id: task.id, reason });
  fw.status(`Task ${task.id} skipped.`);
}

async function skipRanking() {
  if (!lab.task) return;
  try {
    await skipTask(lab.task, document.getElementById("rank-comment").value);
    await nextRanking();
  } catch (e) { fw.status(e.message, true); }
}

async function skipRoleplay() {
  if (!lab.rp.task) return;
  if (lab.rp.messages.length && !window.confirm("Skip this task and discard the exchanges you added?")) return;
  try {
    await skipTask(lab.rp.task, "");
    await nextRoleplay();
  } catch (e) { fw.status(e.message, true); }
}

async function nextRoleplay() {
  const data = await fw.call("GET", "/api/label/next?kind=roleplay");
  Object.assign(lab.rp, { task: data.task, key: fw.uuid(), messages: [], suggestions: [], draft: null });
  showWaiting("rp-waiting", data.waiting);
  document.getElementById("rp-instruction").replaceChildren(fw.el("p", {},
    data.task ? data.task.instruction : "No role-play task is waiting: write a free conversation."));
  document.getElementById("rp-skip").hidden = !data.task;
  showMessages(document.getElementById("rp-conversation"), []);
}

async function suggest() {
  const user = document.getElementById("rp-user").value.trim();
  if (!user) { fw.status("Write the user turn first.", true); return; }
  fw.status("Asking the model…");
  try {
    const data = await fw.call("POST", "/api/label/suggest", { messages: [...lab.rp.messages, { role: "user", content: user }] });
    lab.rp.draft = { text: data.text, model_version: data.model_version, user };
    document.getElementById("rp-assistant").value = data.text;
    fw.status("Draft from " + data.model_version + ": edit it as needed.");
  } catch (e) { fw.status(e.message, true); }
}

function addExchange() {
  const user = document.getElementById("rp-user").value.trim();
  const assistant = document.getElementById("rp-assistant").value.trim();
  if (!user || !assistant) { fw.status("Both turns are needed.", true); return false; }
  lab.rp.messages.push({ role: "user", content: user }, { role: "assistant", content: assistant });
  // The model's draft is a suggestion for this turn only if it answered this user turn (not one changed since).
  if (lab.rp.draft && lab.rp.draft.user === user) {
    lab.rp.suggestions.push({ turn: lab.rp.messages.length - 1, text: lab.rp.draft.text, model_version: lab.rp.draft.model_version });
  }
  lab.rp.draft = null;
  document.getElementById("rp-user").value = "";
  document.getElementById("rp-assistant").value = "";
  showMessages(document.getElementById("rp-conversation"), lab.rp.messages);
  fw.status("");
  return true;
}

async function submitDemo() {
  if (document.getElementById("rp-user").value.trim() && !addExchange()) return;
  if (!lab.rp.messages.length) { fw.status("Add at least one exchange.", true); return; }
  try {
    const data = await fw.call("POST", "/api/label/demonstrations", {
      task_id: lab.rp.task ? lab.rp.task.id : null, messages: lab.rp.messages, suggestions: lab.rp.suggestions,
      idempotency_key: lab.rp.key,
    });
    fw.status(`Demonstration ${data.demonstration.id} saved.`);
    await nextRoleplay();
  } catch (e) { fw.status(e.message, true); }
}

function tab(name) {
  lab.tab = name;
  for (const t of ["ranking", "roleplay"]) {
    document.getElementById(t).hidden = t !== name;
    document.getElementById("tab-" + t).className = t === name ? "" : "secondary";
  }
  (name === "ranking" ? nextRanking() : nextRoleplay()).catch(e => fw.status(e.message, true));
}

document.addEventListener("DOMContentLoaded", async () => {
  fw.tokenBox();
  document.getElementById("tab-ranking").addEventListener("click", () => tab("ranking"));
  document.getElementById("tab-roleplay").addEventListener("click", () => tab("roleplay"));
  document.getElementById("rank-submit").addEventListener("click", submitRanking);
  document.getElementById("rank-skip").addEventListener("click", skipRanking);
  document.getElementById("rp-skip").addEventListener("click", skipRoleplay);
  document.getElementById("rp-suggest").addEventListener("click", suggest);
  document.getElementById("rp-add").addEventListener("click", addExchange);
  document.getElementById("rp-submit").addEventListener("click", submitDemo);
  if (!fw.token()) { fw.status("Enter your labeler token (top right).", true); return; }
  try {
    const me = await fw.call("GET", "/api/me");
    document.getElementById("who").textContent = `${me.name} (${me.role})`;
    if (!lab.tab) tab("ranking");  // a tab the labeler chose while /api/me was on its way stays chosen
  } catch (e) { fw.status(e.message, true); }
});
