"""PPOConfig: every PPO setting, documented once (field name = YAML key = --kebab-flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.errors import UserError
from flywheel.tokenization import CHAT_TEMPLATE_HELP
from flywheel.train.ensemble import AGG_HELP, LAMBDA_HELP, check_aggregation
from flywheel.train.loop import TrainConfig


@dataclass
class PPOConfig(TrainConfig):
    """Shared fields keep their meaning with two PPO readings: --batch-size is the PPO minibatch (sequences per
    optimizer step), --epochs counts passes over the prompt set (when --max-steps is not given)."""

    model: str = field(
        default="",
        metadata={"help": "SFT policy dir: the policy starts here and it is the reference (unless --ref-model)"},
    )
    ref_model: str = field(
        default="",
        metadata={
            "help": "reference for the KL penalty (default: --model); a later round of the loop starts --model from "
            "the last PPO policy and keeps the SFT model here"
        },
    )
    reward_model: str = field(
        default="",
        metadata={
            "help": "reward model dir (a *ForSequenceClassification), or an ensemble dir (flywheel rm --rm-ensemble)"
        },
    )
    reward_fn: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Python reward functions, module:function (several allowed), beside or instead of "
            "--reward-model: fn(prompts, responses) -> list[float], on the last user message and the response text"
        },
    )
    reward_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "weight of each --reward-fn, in order (default: 1 each); the reward model's score weighs 1"},
    )
    reward_ensemble_agg: str = field(default="mean", metadata={"help": AGG_HELP})
    reward_ensemble_lambda: float = field(default=1.0, metadata={"help": LAMBDA_HELP})
    chat_template: str = field(default="", metadata={"help": CHAT_TEMPLATE_HELP})
    value_model: str = field(default="", metadata={"help": "value model init (default: the reward model)"})
    prompts: str = field(default="", metadata={"help": "prompts: JSONL {'messages'} ending with a user turn, or .txt"})
    ptx_data: str = field(default="", metadata={"help": "pretraining corpus for PPO-ptx (empty = plain PPO)"})
    ptx_coef: float = field(default=0.0, metadata={"help": "gamma: weight of the pretraining LM loss per minibatch"})
    ptx_batch_size: int = field(default=4, metadata={"help": "pretraining blocks per minibatch"})
    ptx_seq_len: int = field(default=128, metadata={"help": "tokens per pretraining block"})
    ptx_eval_blocks: int = field(default=64, metadata={"help": "held-out pretraining blocks (the alignment tax)"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts sampled per PPO step"})
    ppo_epochs: int = field(default=4, metadata={"help": "optimisation passes over each rollout batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit"})
    ignore_eos: bool = field(
        default=False,
        metadata={"help": "do not stop at EOS: every response is --max-new-tokens long (fixed-length benchmarks)"},
    )
    max_prompt_length: int = field(default=256, metadata={"help": "longer prompts are dropped (counted in a summary)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs are recomputed at it)"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: per-token KL penalty to the reference"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator in the reward: k1 or k3"})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL: target KL per response (nats)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL: horizon (in rollouts)"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip epsilon"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the per-token rewards (mean kept)"})
    missing_eos_penalty: float = field(
        default=1.0, metadata={"help": "subtracted from the score of a response that never emits EOS (0 = off)"}
    )
    close_truncated: bool = field(
        default=True,
        metadata={
            "help": "read the reward of a response cut at --max-new-tokens as that of an answer ending there (the "
            "end-of-turn token appended: where the reward model learned to read, as the rankings show such an "
            "answer); false: at its last token, a position the reward model never trained at, which PPO can learn "
            "to exploit by not stopping. --missing-eos-penalty applies either way"
        },
    )
    value_lr: float | None = field(default=None, metadata={"help": "value model learning rate (default: --lr)"})
    lr: float = field(default=1e-5, metadata={"help": "policy learning rate"})
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5, per the N+ details)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps of linear warmup"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "cosine decays to lr * min_lr_ratio (1 = constant)"})
    log_every: int = field(default=1, metadata={"help": "steps between metric lines"})
    sample_every: int = field(
        default=10, metadata={"help": "steps between logging sample responses (samples.jsonl; 0 = none)"}
    )
    save_policy_every: int = field(
        default=0,
        metadata={
            "help": "steps between saving the policy as a plain HF model in policies/step-N: candidates to compare "
            "(e.g. by labelers) before one is deployed (0 = only final/)"
        },
    )
    offload_frozen: bool = field(
        default=False,
        metadata={
            "help": "keep the frozen reference and reward models on the CPU and move each to the GPU only for its "
            "forward during scoring (saves their weights' GPU memory during generation and training; costs a "
            "host-to-device copy of each per step; results unchanged). No effect on the CPU; with --lora-r the "
            "reference is the policy itself and stays"
        },
    )
    kl_warn: float = field(default=30.0, metadata={"help": "warn when KL per response exceeds this many nats"})

    @property
    def sequences_per_step(self) -> int:
        """Responses sampled per step (one per prompt)."""
        return self.rollout_batch_size

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise UserError("--model is required (the SFT policy)")
        if not self.prompts:
            raise UserError("--prompts is required")
        try:
            self.reward_weights = [float(w) for w in self.reward_weights]
        except (TypeError, ValueError):
            raise UserError(f"--reward-weights must be numbers, got {self.reward_weights}") from None
        if self.reward_weights and len(self.reward_weights) != len(self.reward_fn):
            raise UserError(
                f"--reward-weights has {len(self.reward_weights)} values for {len(self.reward_fn)} --reward-fn"
            )
        check_aggregation(self.reward_ensemble_agg, self.reward_ensemble_lambda)
        if self.ref_model and self.lora_r:
            raise UserError("--ref-model cannot be used with --lora-r: the reference is the policy, adapters off")
        if self.kl_estimator not in ("k1", "k3"):
            raise UserError("--kl-estimator must be k1 or k3")
        if self.temperature <= 0:
            raise UserError("--temperature must be > 0 for PPO (it samples)")
        if self.value_lr is not None and self.value_lr <= 0:
            raise UserError("--value-lr must be > 0")
        if self.sequences_per_step % self.batch_size:
            raise UserError("--rollout-batch-size must be a multiple of --batch-size (the minibatch)")
        if self.batch_size % self.grad_accum:
            raise UserError("--batch-size must be a multiple of --grad-accum")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise UserError("--ptx-coef > 0 needs --ptx-data")
        if self.save_policy_every < 0:
            raise UserError("--save-policy-every must be >= 0")
        for name in ("ppo_epochs", "max_new_tokens", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("kl_coef", "vf_coef", "ptx_coef", "missing_eos_penalty"):  # each weighs a term in: never < 0
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (the clip's half-width)")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise UserError("--gamma and --lam must be in [0, 1]")
        if self.kl_target is not None and self.kl_target <= 0:
            raise UserError("--kl-target must be > 0 (nats per response)")
        if self.kl_target is not None and self.kl_coef == 0:
            raise UserError("--kl-target adapts --kl-coef by multiplying it, so it needs --kl-coef > 0 to start from")
        if self.kl_horizon < 1:
            raise UserError("--kl-horizon must be >= 1 (rollouts)")
        if self.sample_every < 0:
            raise UserError("--sample-every must be >= 0 (0: no samples.jsonl)")
