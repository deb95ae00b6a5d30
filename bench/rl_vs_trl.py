"""Our GRPO and RLOO steps (`flywheel rl --estimator grpo|rloo`) vs TRL's `GRPOTrainer` and `RLOOTrainer`, in one run.

    nice -n 5 python bench/rl_vs_trl.py                                 # grpo and rloo, 4 prompts x K 4 x 32 tokens
    nice -n 5 python bench/rl_vs_trl.py --estimator grpo --epochs 2 --dtype fp32
    nice -n 5 python bench/rl_vs_trl.py --threads 1 --clock cpu       # on a busy machine: CPU time, one thread
    nice -n 5 python bench/rl_vs_trl.py --profile                     # + where our step spends its time

Both sides start from the same saved directory: a tiny Llama policy (hidden 256 x 4 layers, the tokenizer's vocab of
4096, trained here) that is also the reference. The same `--batch-prompts` prompts (ours from a JSONL file rendered
by `render_prompt`; TRL's as conversations rendered by the tokenizer's chat template: the script checks that both
give the same ids) are each sampled `--num-generations` (K) times at temperature 1, top_k 0, top_p 1. The reward is
one Python function of the response text (`vowel_share`), given to ours as `--reward-fn bench/rl_vs_trl.py:vowel_share`
and to TRL as a `reward_funcs` callable over the same text. No reward model on either side.

Equal work: every response is exactly `--max-new-tokens` long on both sides. Ours samples with `ignore_eos=True`
(EOS never stops a response; every token counts); TRL gets `generation_kwargs={"min_new_tokens": L}` with
`max_completion_length=L`, so `generate` never samples EOS and no completion is cut or masked. The script checks
both (ours: the logged response length; TRL: its `completions/mean_length` metric). One RL step = sample B x K
responses, score them (reward function, reference log-probs; old log-probs where the side needs them), then
`--epochs` optimisation passes over one minibatch of all B x K responses (TRL: `num_iterations` = epochs,
`per_device_train_batch_size` = B x K, `steps_per_generation` = 1, no accumulation), each with clipping at norm 1
and an AdamW step. KL: `--beta` is GRPO's k3 KL in the loss (ours `--kl-loss-coef`, TRL `beta`) and RLOO's k1
sequence KL in the reward (ours `--kl-coef`, TRL `beta`), the same on both sides; with `--beta 0` TRL loads no
reference (ours still runs it, for the logged KL). Loss: token mean on both (TRL's GRPO `loss_type="dapo"`).

Timing: ours around `RLTrainer.step(i)`; TRL's loop calls `on_step_end` once per optimizer step, so E = `--epochs`
of them make one RL step (generation happens in the first). The first `--warmup` RL steps are not timed; the median
of `--steps` steps is kept per measurement, the sides alternate `--repeats` times in this process (the machine's load
varies) and each keeps its best median. Both sides run with the same `torch.set_num_threads(--threads)`.

`--dtype bf16` (the default where the CPU multiplies bf16 natively; elsewhere fp32, since an emulated bf16 would time
the emulation): ours `bf16=True` (autocast over fp32 weights; the engine samples from a bf16 copy); TRL `bf16=True`,
which makes its Accelerator autocast in bf16 (the script checks `accelerator.mixed_precision`). `--dtype fp32`: both
in fp32. Needs the `bench` extra (trl, datasets, accelerate).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import disable_progress_bar

from flywheel.models import load_causal_lm
from flywheel.utils import bf16_is_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_vs_hf import backbone_flops, matmul_roof  # noqa: E402  (bench/ is not a package)
from trainer_setup import CLOCKS, toy_policy  # noqa: E402

LR = 1e-6
EPSILON = 0.2  # the ratio clip, both sides
VOWELS = frozenset("aeiou")


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward (ours: `--reward-fn bench/rl_vs_trl.py:vowel_share`): the share of a response's letters that are
    vowels. Cheap, and it differs between samples, so every group has a spread to learn from."""
    out = []
    for text in responses:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return out


def trl_vowel_share(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """The same reward with TRL's signature: conversational completions are [{"role": "assistant", "content"}]."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return vowel_share([], texts)


@dataclass
class Setup:
    policy: str  # the policy dir (also the reference)
    prompts_file: str  # JSONL {"messages"} for ours
    conversations: list[list[dict[str, str]]]  # the same prompts as conversations, for TRL
    prompt_ids: list[list[int]]  # rendered with render_prompt
    tokenizer: Any


def make_setup(root: Path, n_prompts: int, seed: int = 0) -> Setup:
    tok, convs, ids = toy_policy(root, n_prompts, seed)
    templated = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert [list(x) for x in templated["input_ids"]] == ids, "TRL's chat template must give our prompt ids"
    return Setup(str(root / "policy"), str(root / "prompts.jsonl"), convs, ids, tok)


@dataclass
class Shape:
    estimator: str
    prompts: int  # B: prompts per step
    k: int  # responses per prompt
    new_tokens: int  # L: every response's length
    epochs: int  # optimisation passes over the batch
    beta: float
    bf16: bool


def _ours_config(s: Setup, sh: Shape, out: Path) -> Any:
    from flywheel.train.ppo.rl import RLConfig

    cfg = RLConfig(
        model=s.policy,
        prompts=s.prompts_file,
        out=str(out),
        estimator=sh.estimator,
        reward_fn=[f"{Path(__file__).resolve()}:vowel_share"],
        rollout_batch_size=sh.prompts,
        num_generations=sh.k,
        batch_size=sh.prompts * sh.k,
        ppo_epochs=sh.epochs,
        max_new_tokens=sh.new_tokens,
        ignore_eos=True,
        temperature=1.0,
        missing_eos_penalty=0.0,
        cliprange=EPSILON,
        kl_coef=sh.beta if sh.estimator == "rloo" else 0.0,
        kl_loss_coef=sh.beta if sh.estimator == "grpo" else 0.0,
        kl_estimator="k1",
        loss_agg="token-mean",
        max_grad_norm=1.0,
        lr=LR,
        bf16=sh.bf16,
        progress=False,
    )
    cfg.validate()
    return cfg


def ours_trainer(s: Setup, sh: Shape, out: Path) -> Any:
    from flywheel.train.ppo.rl import RLTrainer

    return RLTrainer(_ours_config(s, sh, out))


def time_ours(s: Setup, sh: Shape, steps: int, warmup: int, out: Path, clock: Callable[[], float]) -> list[float]:
    trainer = ours_trainer(s, sh, out)
    times = []
    for step in range(warmup + steps):
        t0 = clock()
        stats, _, _ = trainer.step(step)
        if step >= warmup:
            times.append(clock() - t0)
        assert stats["response_length"] == sh.new_tokens, stats["response_length"]
    return times


def time_trl(s: Setup, sh: Shape, steps: int, warmup: int, out: Path, clock: Callable[[], float]) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    marks: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        # One mark when training starts and one per optimizer step; E optimizer steps make one RL step.
        def on_train_begin(self, args, state, control, **kw):
            marks.append(clock())

        def on_step_end(self, args, state, control, **kw):
            marks.append(clock())

    n = sh.prompts * sh.k
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=sh.k,
        num_iterations=sh.epochs,
        max_completion_length=sh.new_tokens,
        generation_kwargs={"min_new_tokens": sh.new_tokens},  # EOS is never sampled: every completion is L long
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        epsilon=EPSILON,
        beta=sh.beta,
        learning_rate=LR,
        max_grad_norm=1.0,
        max_steps=(warmup + steps) * sh.epochs,
        bf16=sh.bf16,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=1,  # TRL computes its metrics every step anyway; logging each lets the script read lengths
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if sh.estimator == "grpo":
        args, trainer_cls = GRPOConfig(**common, loss_type="dapo", scale_rewards="group"), GRPOTrainer
    else:
        args, trainer_cls = RLOOConfig(**common), RLOOTrainer

    class Lengths(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = trainer_cls(
        model=load_causal_lm(s.policy),
        reward_funcs=trl_vowel_share,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": s.conversations}),
        processing_class=s.tokenizer,
        callbacks=[StepTimer(), Lengths()],
    )
    assert trainer.accelerator.mixed_precision == ("bf16" if sh.bf16 else "no"), trainer.accelerator.mixed_precision
    trainer.remove_callback(PrinterCallback)  # it would print TRL's metrics line every step
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    e = sh.epochs
    assert len(marks) == (warmup + steps) * e + 1, len(marks)
    assert lengths and all(x == sh.new_tokens for x in lengths), lengths
    rl_marks = marks[::e]  # the start of each RL step, and the end of the last
    return [b - a for a, b in zip(rl_marks[warmup:], rl_marks[warmup + 1 :], strict=False)]


def profile_ours(
    s: Setup, sh: Shape, steps: int, warmup: int, out: Path, clock: Callable[[], float]
) -> dict[str, float]:
    """Where our step spends its time (--clock) (median seconds per part over `steps` steps after `warmup`): sampling,
    the scoring passes (reference, reward function, and the old log-probs where the step needs a pass for them) and
    the update's parts, timed by wrapping the trainer's own objects."""
    trainer = ours_trainer(s, sh, out)
    parts: dict[str, list[float]] = {}
    current: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                current[name] = current.get(name, 0.0) + clock() - t0

        return wrapper

    trainer.engine.generate = timed("generate", trainer.engine.generate)
    trainer.actor.logprobs = timed("old log-probs (a pass of their own)", trainer.actor.logprobs)
    trainer.actor.forward = timed("update: policy forward", trainer.actor.forward)
    trainer._backward = timed("update: loss + backward", trainer._backward)
    trainer._step_optimizers = timed("update: clipping + AdamW", trainer._step_optimizers)
    trainer.ref.forward = timed("reference forward", trainer.ref.forward)
    trainer.reward.forward = timed("reward function", trainer.reward.forward)
    trainer.engine.update_weights = timed("engine weight refresh", trainer.engine.update_weights)
    for step in range(warmup + steps):
        current.clear()
        t0 = clock()
        trainer.step(step)
        current["step"] = clock() - t0
        if step >= warmup:
            for k, v in current.items():
                parts.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def step_flops(policy: Any, prompt_lens: list[int], sh: Shape) -> float:
    """Matmul FLOPs one RL step needs at the least, on real tokens only, every pass running each prompt through the
    layers once for its K responses (a shared prefix) and the LM head on the response positions only: generation,
    the reference's forward when beta > 0, and per epoch the policy's forward + backward (3x a forward). No old
    log-probs pass: the update's own forward can give them. The same arithmetic for any implementation."""
    full = [p + sh.new_tokens for p in prompt_lens for _ in range(sh.k)]
    repeated = [p for p in prompt_lens for _ in range(sh.k)]
    lm_head = 2 * policy.config.hidden_size * policy.config.vocab_size * sh.new_tokens * len(full)
    shared = backbone_flops(policy, prompt_lens) + backbone_flops(policy, full) - backbone_flops(policy, repeated)
    return (shared + lm_head) * (1 + (1 if sh.beta else 0) + 3 * sh.epochs)


def measure(setup: Setup, sh: Shape, root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Alternate the sides --repeats times (the machine's load varies); each keeps its best median."""
    clock = CLOCKS[args.clock]
    ours, trl = [], []
    for r in range(args.repeats):
        tag = f"{sh.estimator}-{sh.epochs}-{r}"
        ours.append(statistics.median(time_ours(setup, sh, args.steps, args.warmup, root / f"o-{tag}", clock)))
        trl.append(statistics.median(time_trl(setup, sh, args.steps, args.warmup, root / f"t-{tag}", clock)))
        unit = "s/step" if args.clock == "wall" else "CPU s/step"
        print(
            f"  {sh.estimator} epochs {sh.epochs} repeat {r + 1}: "
            f"ours {ours[-1]:.3f} {unit}, TRL {trl[-1]:.3f} {unit}",
            flush=True,
        )
    return min(ours), min(trl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimator", default="grpo,rloo", help="comma-separated: grpo, rloo (one row each)")
    ap.add_argument("--steps", type=int, default=3, help="timed RL steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed RL steps before them")
    ap.add_argument("--repeats", type=int, default=1, help="alternating measurements per side; best median kept")
    ap.add_argument("--batch-prompts", type=int, default=4, help="B: prompts per step")
    ap.add_argument("--num-generations", type=int, default=4, help="K: responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="L: every response's length")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1], help="optimisation passes per batch (a row each)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient, both sides (see above)")
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16" if bf16_is_fast() else "fp32",
        help="both sides' precision (default: bf16 where the CPU multiplies it natively, else fp32)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall-clock or process CPU seconds")
    ap.add_argument("--profile", action="store_true", help="also break our step down by part (--clock)")
    args = ap.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (bench/README.md)")
    estimators = [e.strip() for e in args.estimator.split(",") if e.strip()]
    if not estimators or any(e not in ("grpo", "rloo") for e in estimators):
        ap.error(f"--estimator: a comma-separated list of grpo and rloo, not {args.estimator!r}")
    if args.num_generations < 2:
        ap.error("--num-generations must be >= 2 (grpo and rloo compare a prompt's responses)")
    torch.set_num_threads(args.threads)
    disable_progress_bar()  # transformers' "Loading weights" bars, each time a side loads the policy
    bf16 = args.dtype == "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = make_setup(root, args.batch_prompts)
        n_params = sum(p.numel() for p in load_causal_lm(setup.policy).parameters())
        plen = [len(p) for p in setup.prompt_ids]
        print(
            f"policy: Llama h256 x 4 layers, {n_params / 1e6:.1f}M params, vocab {len(setup.tokenizer)}; "
            f"{args.batch_prompts} prompts of {min(plen)}-{max(plen)} tokens x K {args.num_generations} x "
            f"{args.max_new_tokens} new tokens, one minibatch; beta {args.beta}; {args.dtype} both sides; "
            f"{args.threads} threads, {args.clock} clock; {args.steps} timed steps after {args.warmup} warm-up, "
            f"best median of {args.repeats}",
            flush=True,
        )
        rows = []
        for est in estimators:
            for epochs in args.epochs:
                sh = Shape(est, args.batch_prompts, args.num_generations, args.max_new_tokens, epochs, args.beta, bf16)
                rows.append((sh, *measure(setup, sh, root, args)))
        policy = load_causal_lm(setup.policy)
        roof = matmul_roof(torch.bfloat16 if bf16 else torch.float32, clock=CLOCKS[args.clock])
        profiles = []
        if args.profile:
            for sh, _, _ in rows:
                profiles.append(
                    (sh, profile_ours(setup, sh, args.steps, args.warmup, root / "profile", CLOCKS[args.clock]))
                )
    unit = "s/step" if args.clock == "wall" else "CPU s/step"
    print(f"\n{date.today()}, torch {torch.__version__}, {args.threads} threads, {args.clock} clock, {args.dtype}")
    print(f"| estimator | epochs | B x K x L | ours {unit} | TRL {unit} | speed-up (TRL/ours) |")
    print("|---|---:|---|---:|---:|---:|")
    for sh, o, t in rows:
        shape = f"{sh.prompts} x {sh.k} x {sh.new_tokens}"
        print(f"| {sh.estimator} | {sh.epochs} | {shape} | {o:.3f} | {t:.3f} | {t / o:.2f}x |")
    print(
        f"\nThe arithmetic's floor at this run's {args.dtype} matmul roof ({roof / 1e9:.0f} GFLOP per "
        f"{args.clock} second, a 2048^3 matmul): the fastest any implementation could run the step, so TRL / floor "
        "bounds every speed-up (generation counted at the roof too, though its decode steps are bound by memory):"
    )
    print("| estimator | epochs | GFLOP/step | floor s/step | ours / floor | TRL / floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for sh, o, t in rows:
        flops = step_flops(policy, plen, sh)
        floor = flops / roof
        print(
            f"| {sh.estimator} | {sh.epochs} | {flops / 1e9:.1f} | {floor:.3f} | {o / floor:.2f}x | {t / floor:.2f}x |"
        )
    for sh, parts in profiles:
        step = parts.pop("step")
        print(f"\nours, {sh.estimator}, epochs {sh.epochs}: {step:.3f} {unit} (median)")
        for name, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<44} {sec:7.3f} s  {sec / step:5.1%}")


if __name__ == "__main__":
    main()
