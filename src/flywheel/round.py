"""`flywheel round`: the next round of the loop from an export — SFT -> reward model -> PPO — then redeploy.

    flywheel export --db feedback.db --out data/round2
    FLYWHEEL_ADMIN_TOKEN=fw-... flywheel round --export data/round2 --policy runs/round1/ppo/final \\
        --out runs/round2 --server http://127.0.0.1:8000

Stages (each skipped when its data is missing, and logged):
1. SFT of `--policy` on `demos.jsonl` (held-out labelers' `demos.eval.jsonl` is the eval set) -> OUT/sft/final;
2. reward model from the SFT model on `rankings.jsonl` (eval: `rankings.eval.jsonl`; references: the demos)
   -> OUT/rm/final;
3. PPO of the SFT model against that reward model on `prompts.jsonl` -> OUT/ppo/final;
4. with `--server`, POST OUT/ppo/final to the running server's `/api/admin/model` (admin token from the environment
   variable FLYWHEEL_ADMIN_TOKEN, never a flag: flags show in process lists and shell history). The server switches
   between batches, with no restart; every answer keeps the version that wrote it.

With `--gate-prompts FILE` (held-out prompts, never trained on) the labelers decide what is deployed, as InstructGPT
chose its policies: the served policy's and each PPO policy's greedy answers (PPO's saved `policies/step-N` and its
final one) to every prompt become a ranking task in the workbench (`POST /api/admin/gate`; the answers in random
order, the labelers blind to which policy wrote which). Once every task has `--gate-labels` rankings (or after
`--gate-timeout` seconds: then on those given), the policy the labelers prefer to the served one with 95% confidence
is deployed, the most preferred among several (`flywheel.eval.gate`; each prompt counts once, its outcome the mean
over its rankings); if none is, the served policy stays.

Each stage's settings can be given as YAML (`--sft-config`, `--rm-config`, `--ppo-config`: the trainers' own fields);
`--max-steps` caps every stage (smoke tests). OUT/round.json records what ran and what is served.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flywheel.config import config_from_dict, load_yaml, parse_config
from flywheel.errors import UserError
from flywheel.utils import atomic_write_text, read_text

log = logging.getLogger(__name__)
TOKEN_ENV = "FLYWHEEL_ADMIN_TOKEN"


@dataclass
class RoundConfig:
    export: str = field(default="", metadata={"help": "directory written by `flywheel export`"})
    policy: str = field(default="", metadata={"help": "the model now served (SFT starts from it)"})
    out: str = field(default="", metadata={"help": "run directory of this round (sft/, rm/, ppo/, round.json)"})
    server: str = field(default="", metadata={"help": "URL of the running server to switch (empty = do not deploy)"})
    sft_config: str = field(default="", metadata={"help": "YAML of SFTConfig fields for the SFT stage"})
    rm_config: str = field(default="", metadata={"help": "YAML of RewardConfig fields for the reward model stage"})
    ppo_config: str = field(default="", metadata={"help": "YAML of PPOConfig fields for the PPO stage"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on the optimizer steps of every stage"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    gate_prompts: str = field(
        default="",
        metadata={
            "help": "held-out prompts (.txt or JSONL, as for PPO): the labelers rank the served and the new policies' "
            "answers to them in the workbench, and the one they prefer is deployed (needs --server; empty = deploy "
            "the PPO policy)"
        },
    )
    gate_labels: int = field(default=1, metadata={"help": "rankings per gate prompt"})
    gate_timeout: float = field(
        default=86400.0, metadata={"help": "seconds to wait for the gate's rankings; then it decides on those given"}
    )
    gate_poll: float = field(default=15.0, metadata={"help": "seconds between two looks at the gate's rankings"})
    gate_max_new_tokens: int = field(default=64, metadata={"help": "tokens of each gate answer (greedy)"})

    def validate(self) -> None:
        for name in ("export", "policy", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        if not Path(self.export).is_dir():
            raise UserError("not a directory (run `flywheel export` first)", path=self.export)
        if self.gate_prompts:
            if not self.server:
                raise UserError("--gate-prompts needs --server (the labelers rank the answers in its workbench)")
            if not Path(self.gate_prompts).is_file():
                raise UserError("no such file", path=self.gate_prompts)
        if self.gate_labels < 1:
            raise UserError("--gate-labels must be >= 1")
        if self.gate_timeout < 0 or self.gate_poll <= 0:
            raise UserError("--gate-timeout must be >= 0 and --gate-poll > 0")
        if self.gate_max_new_tokens < 1:
            raise UserError("--gate-max-new-tokens must be >= 1")


def _rows(path: Path) -> int:
    return sum(1 for line in read_text(path).splitlines() if line.strip()) if path.is_file() else 0


def _stage(cls: type, yaml_path: str, cfg: RoundConfig, **values: Any) -> Any:
    merged: dict[str, Any] = {"seed": cfg.seed, "progress": False}
    if cfg.max_steps is not None:
        merged["max_steps"] = cfg.max_steps
    if yaml_path:
        merged.update(load_yaml(yaml_path))
    merged.update(values)  # the data and model paths of the round always win
    return config_from_dict(cls, merged, source=yaml_path or "round")


def run_round(cfg: RoundConfig) -> dict[str, Any]:
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.ppo.trainer import train_ppo
    from flywheel.train.reward import RewardConfig, train_reward
    from flywheel.train.sft import SFTConfig, train_sft

    data, out = Path(cfg.export), Path(cfg.out)
    report: dict[str, Any] = {"export": str(data.resolve()), "policy": cfg.policy, "stages": {}}
    if not _rows(data / "rankings.jsonl"):
        raise UserError("no rankings to train a reward model on", path=str(data / "rankings.jsonl"))
    if not _rows(data / "prompts.jsonl"):
        raise UserError("no prompts for PPO", path=str(data / "prompts.jsonl"))
    # Every stage's config is built (its YAML file read and checked) before the first one trains: a mistake in
    # --ppo-config is found now, not after SFT and the reward model.
    sft = None
    policy = cfg.policy
    if _rows(data / "demos.jsonl"):
        extra = {"eval_data": str(data / "demos.eval.jsonl")} if _rows(data / "demos.eval.jsonl") else {}
        sft = _stage(
            SFTConfig, cfg.sft_config, cfg, model=policy, data=str(data / "demos.jsonl"), out=str(out / "sft"), **extra
        )
        policy = str((out / "sft" / "final").resolve())
    else:
        log.info("round: no demonstrations in %s: SFT skipped, PPO starts from %s", data, policy)
    extra = {"eval_data": str(data / "rankings.eval.jsonl")} if _rows(data / "rankings.eval.jsonl") else {}
    if _rows(data / "demos.jsonl"):
        extra["reference_data"] = str(data / "demos.jsonl")
    rm = _stage(
        RewardConfig, cfg.rm_config, cfg, model=policy, data=str(data / "rankings.jsonl"), out=str(out / "rm"), **extra
    )
    reward_model = str((out / "rm" / "final").resolve())
    ppo = _stage(
        PPOConfig,
        cfg.ppo_config,
        cfg,
        model=policy,
        reward_model=reward_model,
        prompts=str(data / "prompts.jsonl"),
        out=str(out / "ppo"),
    )
    if sft is not None:
        report["stages"]["sft"] = str((train_sft(sft) / "final").resolve())
    report["stages"]["rm"] = str((train_reward(rm) / "final").resolve())
    final = str((train_ppo(ppo) / "final").resolve())
    report["stages"]["ppo"] = final
    report["final"] = final
    if cfg.gate_prompts:
        gate = human_gate(cfg, cfg.policy, final)
        report["gate"] = gate
        report["deployed"] = deploy(cfg.server, gate["deployed"]) if gate["deployed"] != cfg.policy else None
    elif cfg.server:
        report["deployed"] = deploy(cfg.server, final)
    atomic_write_text(out / "round.json", json.dumps(report, indent=2) + "\n")
    return report


MAX_GATE_CANDIDATES = 8  # with the served policy, 9 answers: the most a ranking task holds


def human_gate(cfg: RoundConfig, incumbent: str, ppo_final: str) -> dict[str, Any]:
    """The labelers' gate (module doc): ranking tasks of greedy answers on the server, their rankings, the choice.
    Returns what round.json records: the candidates' win rates and intervals, the prompts, the tasks, the prompts
    behind each win rate (each one outcome: the mean over its rankings), the rankings given, and the deployed path."""
    from flywheel.data.io import read_prompts
    from flywheel.eval.gate import choose, judge, prompt_outcome, saved_policies
    from flywheel.eval.policy import greedy_answers

    prompts = [[m.as_dict() for m in p] for p in read_prompts(cfg.gate_prompts)]
    if not prompts:
        raise UserError("no prompts", path=cfg.gate_prompts)
    candidates = saved_policies(Path(ppo_final))
    if len(candidates) > MAX_GATE_CANDIDATES:
        log.info("round: gate: %d saved policies; the last %d compared", len(candidates), MAX_GATE_CANDIDATES)
        candidates = candidates[-MAX_GATE_CANDIDATES:]
    policies = [incumbent, *(str(path) for _, path in candidates)]
    answers: list[list[str]] = []
    for path in policies:
        texts = greedy_answers(path, prompts, max_new_tokens=cfg.gate_max_new_tokens, seed=cfg.seed)
        answers.append([t.replace("\x00", "") for t in texts])  # no database stores NUL (the server's rule)
    versions = [_version(path) for path in policies]
    rng = random.Random(f"{cfg.seed}:gate")
    items = []
    for i, prompt in enumerate(prompts):
        order = list(range(len(policies)))
        rng.shuffle(order)  # the server stores them in this order; the workbench shuffles again per labeler
        answered = [
            {"text": answers[j][i], "model_version": versions[j], "model_path": policies[j]}
            for j in order
            if answers[j][i].strip()
        ]
        if len({a["text"].strip() for a in answered}) >= 2:
            items.append((i, {"prompt": prompt, "answers": answered}))
    tasks: list[int | None] = [None] * len(prompts)  # per prompt, its ranking task (None: nothing to rank)
    if items:
        body = {"items": [item for _, item in items], "labels_needed": cfg.gate_labels}
        created = _admin(cfg.server, "POST", "/api/admin/gate", body)["tasks"]
        for (i, _), task_id in zip(items, created, strict=True):
            tasks[i] = task_id
    log.info("round: gate: %d ranking tasks for the labelers in the workbench", sum(t is not None for t in tasks))
    results = _await_rankings(cfg, [t for t in tasks if t is not None])
    outcomes: list[list[float]] = [[] for _ in candidates]  # per candidate, one outcome per judged prompt
    rankings = 0
    by_task = {r["id"]: r for r in results}
    for i, task_id in enumerate(tasks):
        texts = [answers[j][i].strip() for j in range(len(policies))]
        if task_id is None:  # fewer than two different answers: nothing was ranked
            for c in range(len(candidates)):
                outcomes[c].append(_unranked_outcome(texts[c + 1], texts[0]))
            continue
        orders = [ranking["order"] for ranking in by_task[task_id]["rankings"]]
        rankings += len(orders)
        if not orders:  # not ranked before --gate-timeout: the prompt does not count
            continue
        position = {c["text"].strip(): c["position"] for c in by_task[task_id]["candidates"]}
        for c in range(len(candidates)):
            mine, theirs = position.get(texts[c + 1]), position.get(texts[0])
            if mine is None or theirs is None:  # an empty answer was not put to the labelers
                outcomes[c].append(_unranked_outcome(texts[c + 1], texts[0]))
            else:  # one outcome per prompt, however many labelers ranked it
                outcomes[c].append(prompt_outcome(orders, mine, theirs))
    if not outcomes[0]:
        log.warning("round: gate: no rankings arrived; the served policy stays")
        judged = []
    else:
        judged = [judge(str(path), step, o) for (step, path), o in zip(candidates, outcomes, strict=True)]
    chosen = choose(judged)
    for c in judged:
        log.info(
            "round: gate: step %d preferred to the served policy %.1f%% [%.1f%%, %.1f%%]",
            c.step,
            100 * c.win_rate,
            100 * c.ci95_low,
            100 * c.ci95_high,
        )
    log.info("round: gate: %s", f"deploys {chosen.policy}" if chosen else "keeps the served policy")
    return {
        "prompts": len(prompts),
        "tasks": [t for t in tasks if t is not None],
        "judged_prompts": len(outcomes[0]),  # behind each win rate: ranked prompts and those without a task
        "rankings": rankings,
        "candidates": [asdict(c) for c in judged],
        "deployed": chosen.policy if chosen else incumbent,
    }


def _unranked_outcome(mine: str, theirs: str) -> float:
    """A candidate's answer against the served policy's where the labelers ranked nothing: the same answer ties,
    an empty one loses to any other."""
    return 0.5 if mine == theirs else 0.0 if not mine else 1.0


def _version(path: str) -> str:
    from flywheel.serve.worker import model_version

    return model_version(path)


def _await_rankings(cfg: RoundConfig, task_ids: list[int]) -> list[dict[str, Any]]:
    """Poll the server until every task has its rankings, or --gate-timeout passes; -> the tasks' results."""
    if not task_ids:
        return []
    deadline = time.monotonic() + cfg.gate_timeout
    needed = len(task_ids) * cfg.gate_labels
    with tqdm(total=needed, desc="gate: rankings", unit="ranking", disable=None) as bar:
        while True:
            results = []
            for start in range(0, len(task_ids), 200):
                ids = ",".join(str(t) for t in task_ids[start : start + 200])
                results += _admin(cfg.server, "GET", f"/api/admin/gate?ids={ids}")["tasks"]
            given = sum(min(len(r["rankings"]), r["labels_needed"]) for r in results)
            bar.update(given - bar.n)
            if given >= needed:
                return results
            if time.monotonic() >= deadline:
                log.warning(
                    "round: gate: %d of %d rankings after %.0f s; deciding on those", given, needed, cfg.gate_timeout
                )
                return results
            time.sleep(min(cfg.gate_poll, max(0.0, deadline - time.monotonic())))


def _admin(
    server: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout: float = 600,
) -> Any:
    """One admin API call (token from FLYWHEEL_ADMIN_TOKEN) -> its JSON; a clear UserError when it fails."""
    import httpx

    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"{path.split('?')[0]} needs an admin token in the environment variable {TOKEN_ENV}")
    try:
        r = httpx.request(
            method, server.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the server at {server}: {err}") from None
    if r.status_code not in (200, 201):
        message = (
            r.json().get("error", {}).get("message", r.text)
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        raise UserError(f"the server refused {method} {path.split('?')[0]} ({r.status_code}): {message}")
    return r.json()


def deploy(server: str, model_dir: str, token: str | None = None, timeout: float = 600) -> dict[str, Any]:
    """Ask a running server to serve `model_dir` (POST /api/admin/model); returns its answer (new version)."""
    body = _admin(server, "POST", "/api/admin/model", {"path": model_dir}, token=token, timeout=timeout)
    log.info("round: the server now serves %s (was %s)", body["version"], body["previous"])
    return body


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RoundConfig, argv, "flywheel round", __doc__.splitlines()[0])
    report = run_round(cfg)
    print(json.dumps(report, indent=2))
    return 0
