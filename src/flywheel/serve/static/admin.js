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
  table("queue", ["kind", "tasks", "done", "labels given", "labels needed", "skips"],
    Object.entries(o.queue).map(([kind, q]) => [kind, q.tasks, q.done, q.labels, q.labels_needed, q.skips]));
  table("skips", ["task", "kind", "labeler", "reason", "when (UTC)"],
    o.skips.map(k => [k.task_id, k.kind, k.labeler, k.reason || "–", k.created_at]));
  const per = o.agreement.per_labeler;
  table("labelers", ["labeler", "role", "rankings", "demonstrations", "skipped", "agreement with others", "pairs compared"],
    Object.entries(o.labelers).map(([name, p]) => [name, p.role, p.rankings, p.demonstrations, p.skipped,
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
  // A number field whose text is no number reads as empty: say so in the form's words, not the API's.
  const numbers = (...pairs) => {
    for (const [id, name] of pairs) {
      const field = document.getElementById(id);
      if (field.validity.badInput || field.value.trim() === "" || !field.checkValidity()) {
        fw.status(`"${name}" must be a whole number from ${field.min} to ${field.max}.`, true);
        return false;
      }
    }
    return true;
  };
  document.getElementById("create-ranking").addEventListener("click", () => {
    if (!numbers(["k", "answers per prompt (K)"], ["labels-needed", "labelers per task"], ["from-conversations", "+ latest chat prompts"])) return;
    if (!lines("prompts").length && !num("from-conversations")) {
      fw.status("Write at least one prompt, or take some of the latest chat prompts.", true);
      return;
    }
    fw.status("Sampling answers…");
    act(() => fw.call("POST", "/api/admin/tasks", {
      kind: "ranking", prompts: lines("prompts"), k: num("k"), labels_needed: num("labels-needed"),
      from_conversations: num("from-conversations"),
    }), r => `Created ${r.created.length} ranking tasks (${r.skipped} skipped: too few distinct answers).`);
  });
  document.getElementById("create-roleplay").addEventListener("click", () => {
    if (!numbers(["rp-labels-needed", "labelers per task"])) return;
    if (!lines("instructions").length) { fw.status("Write at least one instruction.", true); return; }
    act(() => fw.call("POST", "/api/admin/tasks", {
      kind: "roleplay", instructions: lines("instructions"), labels_needed: num("rp-labels-needed"),
    }), r => `Created ${r.created.length} role-play tasks.`);
  });
  document.getElementById("model-switch").addEventListener("click", () => {
    fw.status("Loading the model…");
    act(() => fw.call("POST", "/api/admin/model", { path: document.getElementById("model-path").value.trim() }),
      r => `Now serving ${r.version} (was ${r.previous}).`);
  });
  if (!fw.token()) { fw.status("Enter your admin token (top right).", true); return; }
  refresh().catch(e => fw.status(e.message, true));
});
