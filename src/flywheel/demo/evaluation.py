"""The demo's last stage: every policy judged by the hidden oracle on the held-out eval prompts, and in-context
learning measured on a few-shot probe held out from every split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flywheel.demo.stages import DemoRun, read_metrics
from flywheel.demo.state import Stage
from flywheel.demo.summary import PolicyResult, WinRate
from flywheel.eval.policy import (
    compare,
    deflection_log_odds,
    evaluate_policy,
    fewshot_plain_accuracy,
    heldout_lm_loss,
    kl_to_reference,
    lm_blocks,
    prompt_ids_for,
)
from flywheel.models import load_causal_lm
from flywheel.tokenization import load_tokenizer
from flywheel.utils import atomic_write_text
from flywheel.world import SHOTS, SPLITS, fewshot_probe, load_tasks

# Few-shot prompts per number of shots in the in-context-learning probe. The eval split's ~10 per number of shots put
# a standard error of ~20 points on the 4-shot minus 0-shot gain that the target compares with 20 points; 50 bring
# it to ~10-12 (0 shots has fewer: `fewshot_probe`), for a few seconds of decoding per policy.
FEWSHOT_PROBE_PER_SHOT = 50


@dataclass
class Evaluation:
    policies: dict[str, PolicyResult]
    win_rates: dict[str, WinRate]
    kl_ppo_sft: dict[str, float]
    kl_to_sft: dict[str, float]
    ppo_curve: list[dict[str, Any]]


def stage_evaluate(run: DemoRun, models: dict[str, Path]) -> Evaluation:
    """Greedy answers of every policy in `models` (base, sft, ppo_round<r>..., ppo) judged by the oracle; win rates
    between them, KL of each PPO policy to SFT, held-out LM loss. Writes eval_samples.jsonl (every answer)."""
    cfg = run.cfg
    with Stage(run.timings, "evaluate") as st:
        tasks = load_tasks(run.files["eval_tasks"])
        taken = {t.prompt_key() for split in SPLITS for t in load_tasks(run.files[f"{split}_tasks"])}
        probe = fewshot_probe(run.world.seed, taken, FEWSHOT_PROBE_PER_SHOT)
        probe_counts = {str(k): sum(t.shots == k for t in probe) for k in SHOTS}
        tok = load_tokenizer(str(models["sft"]))
        _, held_docs = run.corpus_split()  # no model was trained on these
        blocks = lm_blocks(tok, held_docs, run.pretrain_config().seq_len)
        loaded = {name: load_causal_lm(str(path)) for name, path in models.items()}
        evals, policies = {}, {}
        for name in tqdm(list(models), desc="evaluate", disable=not cfg.progress, dynamic_ncols=True):
            evals[name] = evaluate_policy(
                loaded[name],
                tok,
                tasks,
                name=name,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.eval_temperature,
                seed=cfg.seed,
                bf16=cfg.bf16,
            )
            on_probe = evaluate_policy(
                loaded[name], tok, probe, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, bf16=cfg.bf16
            )
            policies[name] = PolicyResult(
                **{**evals[name].summary, "fewshot_accuracy": on_probe.summary["fewshot_accuracy"]},
                heldout_lm_loss=heldout_lm_loss(loaded[name], blocks, tok.pad_token_id),
                deflection_log_odds=deflection_log_odds(loaded[name], tok, tasks),
                fewshot_plain_accuracy=(
                    fewshot_plain_accuracy(loaded[name], tok, probe, bf16=cfg.bf16) if name == "base" else None
                ),
                fewshot_prompts=probe_counts,
            )
        ids = prompt_ids_for(tok, tasks)
        rounds = [n for n in models if n.startswith("ppo_round")]  # earlier rounds' policies, when there are any
        kls = {
            n: kl_to_reference(
                loaded[n], loaded["sft"], tok, ids, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, bf16=cfg.bf16
            )
            for n in [*rounds, "ppo"]
        }
        pairs = [("ppo", "sft"), ("sft", "base"), ("ppo", "base")]
        pairs += [(n, "sft") for n in rounds] + [(n, "base") for n in rounds] + [("ppo", n) for n in rounds]
        wins = {f"{a}_vs_{b}": WinRate(**compare(evals[a], evals[b])) for a, b in pairs}
        samples = [
            {
                "prompt": t.messages,
                "family": t.family,
                **{n: e.responses[i] for n, e in evals.items()},
                **{f"{n}_score": e.scores[i].total for n, e in evals.items()},
            }
            for i, t in enumerate(tasks)
        ]
        atomic_write_text(run.out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        st.done(
            "oracle score base %.3f / SFT %.3f / PPO %.3f; PPO beats SFT %.1f%%, SFT beats base %.1f%%; "
            "KL(PPO||SFT) %.2f nats",
            policies["base"].score,
            policies["sft"].score,
            policies["ppo"].score,
            100 * wins["ppo_vs_sft"].win_rate,
            100 * wins["sft_vs_base"].win_rate,
            kls["ppo"]["kl"],
        )
    return Evaluation(
        policies=policies,
        win_rates=wins,
        kl_ppo_sft=kls["ppo"],
        kl_to_sft={n: k["kl"] for n, k in kls.items()},
        ppo_curve=ppo_curve(run, 1 + len(rounds)),
    )


def ppo_curve(run: DemoRun, rounds: int) -> list[dict[str, Any]]:
    """Every round's PPO metric rows in order, each with its round and a step count running on across rounds."""
    rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        steps = [x for x in read_metrics(run.round_dir(r) / "ppo" / "metrics.jsonl") if "score" in x]
        offset = rows[-1]["step"] if rows else 0
        rows += [{**x, "round": r, "step": offset + x["step"]} for x in steps]
    return rows
