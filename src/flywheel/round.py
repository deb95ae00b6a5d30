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

Each stage's settings can be given as YAML (`--sft-config`, `--rm-config`, `--ppo-config`: the trainers' own fields);
`--max-steps` caps every stage (smoke tests). OUT/round.json records what ran and what is served.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import config_from_dict, load_yaml, parse_config
from flywheel.errors import UserError
from flywheel.utils import atomic_write_text

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

    def validate(self) -> None:
        for name in ("export", "policy", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        if not Path(self.export).is_dir():
            raise UserError("not a directory (run `flywheel export` first)", path=self.export)


def _rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


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
    policy = cfg.policy
    if _rows(data / "demos.jsonl"):
        extra = {"eval_data": str(data / "demos.eval.jsonl")} if _rows(data / "demos.eval.jsonl") else {}
        sft = _stage(
            SFTConfig, cfg.sft_config, cfg, model=policy, data=str(data / "demos.jsonl"), out=str(out / "sft"), **extra
        )
        policy = str(train_sft(sft) / "final")
        report["stages"]["sft"] = policy
    else:
        log.info("round: no demonstrations in %s: SFT skipped, PPO starts from %s", data, policy)
    if not _rows(data / "rankings.jsonl"):
        raise UserError("no rankings to train a reward model on", path=str(data / "rankings.jsonl"))
    extra = {"eval_data": str(data / "rankings.eval.jsonl")} if _rows(data / "rankings.eval.jsonl") else {}
    if _rows(data / "demos.jsonl"):
        extra["reference_data"] = str(data / "demos.jsonl")
    rm = _stage(
        RewardConfig, cfg.rm_config, cfg, model=policy, data=str(data / "rankings.jsonl"), out=str(out / "rm"), **extra
    )
    reward_model = str(train_reward(rm) / "final")
    report["stages"]["rm"] = reward_model
    if not _rows(data / "prompts.jsonl"):
        raise UserError("no prompts for PPO", path=str(data / "prompts.jsonl"))
    ppo = _stage(
        PPOConfig,
        cfg.ppo_config,
        cfg,
        model=policy,
        reward_model=reward_model,
        prompts=str(data / "prompts.jsonl"),
        out=str(out / "ppo"),
    )
    final = str((train_ppo(ppo) / "final").resolve())
    report["stages"]["ppo"] = final
    report["final"] = final
    if cfg.server:
        report["deployed"] = deploy(cfg.server, final)
    atomic_write_text(out / "round.json", json.dumps(report, indent=2) + "\n")
    return report


def deploy(server: str, model_dir: str, token: str | None = None, timeout: float = 600) -> dict[str, Any]:
    """Ask a running server to serve `model_dir` (POST /api/admin/model); returns its answer (new version)."""
    import httpx

    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"deploying needs an admin token in the environment variable {TOKEN_ENV}")
    try:
        r = httpx.post(
            server.rstrip("/") + "/api/admin/model",
            json={"path": model_dir},
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the server at {server}: {err}") from None
    if r.status_code != 200:
        message = (
            r.json().get("error", {}).get("message", r.text)
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        raise UserError(f"the server refused the model switch ({r.status_code}): {message}")
    body = r.json()
    log.info("round: the server now serves %s (was %s)", body["version"], body["previous"])
    return body


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RoundConfig, argv, "flywheel round", __doc__.splitlines()[0])
    report = run_round(cfg)
    print(json.dumps(report, indent=2))
    return 0
