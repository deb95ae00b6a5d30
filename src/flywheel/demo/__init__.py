"""`flywheel demo`: the whole ChatGPT loop on the toy world, judged by its hidden oracle, in minutes on a laptop CPU.

    flywheel demo                      # <= 10 min on 2 cores, from the shipped 5M-parameter base (demo/base.py)
    flywheel demo --from-scratch       # pretrain the base in the run too
    flywheel demo --quick              # ~1 min (CI): the shipped 0.8M base, smaller world, two rounds
    flywheel demo --seed 3 --out runs/demo-3 --ppo.kl-coef 0.2    # a trainer setting: --STAGE.FIELD
    flywheel demo --seed 3 --out runs/demo-3 --resume   # continue an interrupted run: finished stages are kept

Stages (`stages.py`, `rankings.py`, `evaluation.py`): world -> the shipped base, or (--from-scratch) tokenizer ->
pretrain the base -> SFT on imperfect demonstrations -> sample K (4..9) answers per prompt from the SFT policy ->
simulated labelers rank them (temperature recalibrated on these samples to 73% agreement) -> reward model on those
rankings (on-distribution) -> PPO (PPO-ptx where --ppo.ptx-coef > 0: the fp32 and quick presets) against the reward
model with a KL penalty to SFT -> [--rounds N: each further round has the last PPO policy answer new prompts, the same
labelers rank those answers, the reward model is fine-tuned on them and PPO continues, still held to SFT] -> oracle
evaluation of base, SFT and every round's PPO policy on held-out prompts. The reward model never sees the oracle and
the oracle alone decides whether the policy improved.

`base.py` makes the shipped bases (`python -m flywheel.demo.base`), `sweep.py` runs the demo over seeds (`flywheel
sweep`), `config.py` holds the demo's settings and presets (trainer settings are per-stage overrides of the trainers'
own configs), `state.py` what `--resume` keeps, `summary.py` the typed `DemoSummary` and the targets, `report.py`
report.md and the plots, `pipeline.py` the order of the stages (`run_demo`) and the command line (`main`).
"""

from flywheel.demo.config import PRESETS, DemoConfig, parse_demo_config
from flywheel.demo.pipeline import main, run_demo
from flywheel.demo.summary import DemoSummary

__all__ = ["PRESETS", "DemoConfig", "DemoSummary", "main", "parse_demo_config", "run_demo"]
