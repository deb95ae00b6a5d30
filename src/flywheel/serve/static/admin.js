// The admin page: the task queue, progress and agreement per labeler, new tasks, and the model switch.
"use strict";
fw.tokenKind = "staff"; // a labeler's or admin's token, kept apart from the chat page's

function table(id, head, rows) {
  document.getElementById(id).replaceChildren(
    fw.el("tr", {}, ...head.map(h => fw.el("th", {}, h))),
    ...rows.map(r => fw.el("tr", {}, ...r.map(c => fw.el("td", {}, String(c))))));
}

const pct = x => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");

async function refresh() {
  const o = await fw.call("GET", "/api/admin/overview");
  document.getElementById("model").textContent = `${o.model.version} (${o.model.path}); batches ${o.batching.batches}, rows ${o.batching.rows}, largest batch ${o.batching.max_rows}`;
  table("queue", ["kind", "tasks", "done", "labels given", "labels needed"],
    Object.entries(o.queue).map(([kind, q]) => [kind, q.tasks, q.done, q.labels, q.labels_needed]));
  const per = o.agreement.per_labeler;
  table("labelers", ["labeler", "role", "rankings", "demonstrations", "agreement with others", "pairs compared"],
    Object.entries(o.labelers).map(([name, p]) => [name, p.role, p.rankings, p.demonstrations,
      pct(per[name] && per[name].rate), per[name] ? per[name].pairs : 0]));
  document.getElementById("agreement").textContent =
    `Inter-labeler agreement: ${pct(o.agreement.rate)} over ${o.agreement.pairs} candidate pairs. Votes: ${o.votes.up} up, ${o.votes.down} down.`;
}

async function act(fn, done) {
  try { const r = await fn(); fw.status(done(r)); await refresh(); } catch (e) { fw.status(e.message, true); }
}

document.addEventListener("DOMContentLoaded", () => {
  fw.tokenBox();
  const lines = id => document.getElementById(id).value.split("\n").map(s => s.trim()).filter(Boolean);
  const num = id => Number(document.getElementById(id).value);
  document.getElementById("create-ranking").addEventListener("click", () => {
    fw.status("Sampling answers…");
    act(() => fw.call("POST", "/api/admin/tasks", {
      kind: "ranking", prompts: lines("prompts"), k: num("k"), labels_needed: num("labels-needed"),
      from_conversations: num("from-conversations"),
    }), r => `Created ${r.created.length} ranking tasks (${r.skipped} skipped: too few distinct answers).`);
  });
  document.getElementById("create-roleplay").addEventListener("click", () => act(() => fw.call("POST", "/api/admin/tasks", {
    kind: "roleplay", instructions: lines("instructions"), labels_needed: num("labels-needed"),
  }), r => `Created ${r.created.length} role-play tasks.`));
  document.getElementById("model-switch").addEventListener("click", () => {
    fw.status("Loading the model…");
    act(() => fw.call("POST", "/api/admin/model", { path: document.getElementById("model-path").value.trim() }),
      r => `Now serving ${r.version} (was ${r.previous}).`);
  });
  if (!fw.token()) { fw.status("Enter your admin token (top right).", true); return; }
  refresh().catch(e => fw.status(e.message, true));
});
