"""Our PPO step vs TRL's PPO step (`trl.experimental.ppo.PPOTrainer`, TRL 1.12.0) on the identical setup, in one run.

TRL 1.12.0 is the last release that ships PPO; install it once, apart from the venv's own TRL:

    pip install --no-deps --target .bench-trl-1.12 trl==1.12.0
    nice -n 5 python bench/ppo_vs_trl.py                    # PPO epochs 1 and 4, 3 timed steps x 2 repeats per side
    nice -n 5 python bench/ppo_vs_trl.py --threads 1 --clock cpu      # on a busy machine: CPU time, one thread
    nice -n 5 python bench/ppo_vs_trl.py --epochs 4 --trl-precision flag
    nice -n 5 python bench/ppo_vs_trl.py --threads 1 --clock cpu --ablate   # + ours on HF's forward (no fastforward)

Both sides start from the same saved directories: a tiny Llama policy (hidden 256 x 4 layers, the tokenizer's vocab
of 4096) that is also the reference, and a `LlamaForSequenceClassification` reward model built from it, which also
initialises the value model; the same 16 prompts rendered by `render_prompt`. One PPO step = sample 16 responses of
exactly 32 tokens at temperature 1, top_k 0, top_p 1 (EOS never stops a response: ours `ignore_eos=True`, TRL
`stop_token=None`), score them (reference, value, reward), then `--epochs` passes over one minibatch of 16 with a
clipped policy + value update and a fused AdamW step; no gradient clipping (TRL's PPO loop has none), no evaluation,
logging or saving. Ours is timed around `PPOTrainer.step(i)`; TRL's loop calls `on_step_end` once per PPO step, so a
callback's marks give its steps. Both run after `--warmup` steps; the sides alternate `--repeats` times in this
process (the machine's load varies) and each keeps its best median.

`--dtype bf16` (the default where the CPU has native bf16; elsewhere `fp32`, both sides in fp32, since an emulated
bf16 would time the emulation). Ours: `bf16=True` (bf16 autocast over fp32 weights; the engine samples from a bf16
copy). TRL builds its own `Accelerator(gradient_accumulation_steps=...)` with no precision, and transformers 5 no
longer exports `bf16=True` as ACCELERATE_MIXED_PRECISION, so `bf16=True, use_cpu=True` alone leaves TRL's PPO in fp32.
`--trl-precision` picks how TRL gets its bf16:
    bf16      its four models loaded in bf16: rollout and update all in bf16 (default: TRL's fastest)
    autocast  fp32 models + ACCELERATE_MIXED_PRECISION=bf16: autocast on the update's forward; rollouts in fp32
    flag      fp32 models, bf16=True only: runs in fp32 (shown for the record)

TRL runs from `.bench-trl-1.12`, which `import_trl_ppo` puts first on `sys.path` only while it imports it; our side
never imports trl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from flywheel.models import (
    load_causal_lm,
    load_sequence_classifier,
    save_pretrained,
)
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.ppo.trainer import PPOTrainer
from flywheel.utils import bf16_is_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_vs_hf import backbone_flops, matmul_roof  # noqa: E402  (bench/ is not a package)
from trainer_setup import CLOCKS, toy_policy  # noqa: E402

TRL_DIR = Path(__file__).resolve().parent.parent / ".bench-trl-1.12"
LR = 1e-5


@dataclass
class Setup:
    policy: str  # SFT policy dir (also the reference)
    reward: str  # reward model dir (also the value model's init)
    prompts_file: str  # JSONL {"messages"} for ours
    prompt_ids: list[list[int]]  # the same prompts rendered with render_prompt, for TRL
    tokenizer: Any


def make_setup(root: Path, n_prompts: int, seed: int = 0) -> Setup:
    tok, _, ids = toy_policy(root, n_prompts, seed)
    rm = load_sequence_classifier(str(root / "policy"))  # new scalar head, InstructGPT init
    save_pretrained(rm, tok, root / "reward")
    return Setup(str(root / "policy"), str(root / "reward"), str(root / "prompts.jsonl"), ids, tok)


def time_ours(
    s: Setup,
    epochs: int,
    steps: int,
    warmup: int,
    out: Path,
    clock: Callable[[], float],
    *,
    bf16: bool = True,
    hf_forward: bool = False,
) -> list[float]:
    """Our step; `hf_forward`: with flywheel.fastforward switched off, so the roles run HF's forward (--ablate)."""
    if hf_forward:
        with _fastforward_off():
            return time_ours(s, epochs, steps, warmup, out, clock, bf16=bf16)
    n = len(s.prompt_ids)
    cfg = PPOConfig(
        model=s.policy,
        reward_model=s.reward,
        prompts=s.prompts_file,
        out=str(out),
        rollout_batch_size=n,
        batch_size=n,
        ppo_epochs=epochs,
        max_new_tokens=32,
        ignore_eos=True,
        temperature=1.0,
        missing_eos_penalty=0.0,
        max_grad_norm=0.0,
        lr=LR,
        bf16=bf16,
        progress=False,
    )
    cfg.validate()
    trainer = PPOTrainer(cfg)
    times = []
    for step in range(warmup + steps):
        t0 = clock()
        stats, _, _ = trainer.step(step)
        if step >= warmup:
            times.append(clock() - t0)
    assert stats["response_length"] == 32, stats["response_length"]
    return times


@contextmanager
def _fastforward_off() -> Iterator[None]:
    from flywheel import fastforward

    original = fastforward.unsupported_reason
    fastforward.unsupported_reason = lambda *args, **kwargs: "switched off by the benchmark"
    try:
        yield
    finally:
        fastforward.unsupported_reason = original


def import_trl_ppo() -> tuple[Any, Any, Any]:
    """TRL 1.12's PPOTrainer/PPOConfig and a TrainerCallback base, imported from TRL_DIR (first on sys.path only
    while importing)."""
    if "trl" not in sys.modules:
        if not (TRL_DIR / "trl").is_dir():
            sys.exit(f"TRL 1.12 not found in {TRL_DIR}: pip install --no-deps --target {TRL_DIR} trl==1.12.0")
        sys.path.insert(0, str(TRL_DIR))
        try:
            import trl.experimental.ppo  # noqa: F401
        finally:
            sys.path.remove(str(TRL_DIR))
    import trl
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

    assert trl.__version__ == "1.12.0", f"expected TRL 1.12.0 from {TRL_DIR}, got {trl.__version__} ({trl.__file__})"
    return TRLPPOTrainer, TRLPPOConfig, TrainerCallback


def time_trl(
    s: Setup, epochs: int, steps: int, warmup: int, out: Path, precision: str, clock: Callable[[], float]
) -> list[float]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    TRLPPOTrainer, TRLPPOConfig, TrainerCallback = import_trl_ppo()
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        # TRL's loop calls on_step_end once per PPO step (rollout + update); the gap between two calls is a step.
        def on_train_begin(self, args, state, control, **kw):
            marks.append(clock())

        def on_step_end(self, args, state, control, **kw):
            marks.append(clock())

    n = len(s.prompt_ids)
    args = TRLPPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        total_episodes=n * (warmup + steps),
        num_ppo_epochs=epochs,
        response_length=32,
        stop_token=None,
        temperature=1.0,
        missing_eos_penalty=None,
        learning_rate=LR,
        bf16=precision != "fp32",
        use_cpu=True,
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
        local_rollout_forward_batch_size=n,
        dataloader_num_workers=0,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # fp32: --dtype fp32, both sides in fp32
    if precision == "autocast":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # read when TRL creates its Accelerator
    trainer = TRLPPOTrainer(
        args=args,
        processing_class=s.tokenizer,
        model=load_causal_lm(s.policy, dtype),
        ref_model=load_causal_lm(s.policy, dtype),
        reward_model=load_sequence_classifier(s.reward, dtype),
        value_model=load_sequence_classifier(s.reward, dtype),
        train_dataset=Dataset.from_dict({"input_ids": s.prompt_ids}),
        callbacks=[StepTimer()],
    )
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    assert trainer.policy_model.generation_config.eos_token_id is None, "TRL would stop at EOS"
    expected = "bf16" if precision == "autocast" else "no"
    assert trainer.accelerator.mixed_precision == expected, (precision, trainer.accelerator.mixed_precision)
    trainer.remove_callback(PrinterCallback)  # it would print TRL's metrics line every step
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    assert len(marks) == warmup + steps + 1, len(marks)
    return [b - a for a, b in zip(marks[warmup:], marks[warmup + 1 :], strict=False)]


def step_flops(policy: Any, prompt_lens: list[int], new_tokens: int, epochs: int) -> float:
    """Matmul FLOPs one PPO step needs at the least, on real tokens only (no padding): generation (every prompt and
    response token through the layers once, the LM head once per response token), the four scoring forwards
    (policy and reference with the LM head on the response positions, value and reward without), and per epoch the
    policy's and the value model's forward + backward (3x a forward). The same arithmetic for any implementation."""
    backbone = backbone_flops(policy, [p + new_tokens for p in prompt_lens])
    lm_head = 2 * policy.config.hidden_size * policy.config.vocab_size * new_tokens * len(prompt_lens)
    generation = backbone + lm_head
    scoring = 4 * backbone + 2 * lm_head
    update = 3 * (2 * backbone + lm_head)
    return generation + scoring + epochs * update


def measure(setup: Setup, root: Path, epochs: int, args: argparse.Namespace) -> tuple[float, float, float | None]:
    """Alternate the sides --repeats times (the machine's load varies); each keeps its best median."""
    clock = CLOCKS[args.clock]
    bf16 = args.dtype == "bf16"
    trl_precision = args.trl_precision if bf16 else "fp32"
    ours, trl, hf = [], [], []
    for r in range(args.repeats):
        ours.append(
            statistics.median(time_ours(setup, epochs, args.steps, args.warmup, root / f"o{r}", clock, bf16=bf16))
        )
        if args.ablate:
            hf.append(
                statistics.median(
                    time_ours(
                        setup, epochs, args.steps, args.warmup, root / f"h{r}", clock, bf16=bf16, hf_forward=True
                    )
                )
            )
        trl.append(
            statistics.median(time_trl(setup, epochs, args.steps, args.warmup, root / f"t{r}", trl_precision, clock))
        )
        unit = "s/step" if args.clock == "wall" else "CPU s/step"
        extra = f", ours with HF's forward {hf[-1]:.3f} {unit}" if hf else ""
        print(
            f"  epochs {epochs} repeat {r + 1}: ours {ours[-1]:.3f} {unit}, TRL {trl[-1]:.3f} {unit}{extra}",
            flush=True,
        )
    return min(ours), min(trl), min(hf) if hf else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 4], help="PPO epochs per step (one row each)")
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PPO steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="alternating measurements per side; best median kept")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout (= the one minibatch)")
    ap.add_argument(
        "--trl-precision",
        choices=["bf16", "autocast", "flag"],
        default="bf16",
        help="how TRL runs in bf16 (see above)",
    )
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16" if bf16_is_fast() else "fp32",
        help="both sides' precision (default: bf16 where the CPU multiplies it natively, else fp32: an "
        "emulated bf16 would time the emulation)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall-clock or process CPU seconds")
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also time ours with flywheel.fastforward switched off (the roles then run HF's forward)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = make_setup(root, args.prompts)
        policy = load_causal_lm(setup.policy)
        n_params = sum(p.numel() for p in policy.parameters())
        plen = [len(p) for p in setup.prompt_ids]
        print(
            f"policy: Llama h256 x 4 layers, {n_params / 1e6:.1f}M params, vocab {len(setup.tokenizer)}; "
            f"{args.prompts} prompts of {min(plen)}-{max(plen)} tokens x 32 new tokens, one minibatch; "
            + (
                f"ours bf16 autocast, TRL --trl-precision {args.trl_precision}; "
                if args.dtype == "bf16"
                else "both sides fp32; "
            )
            + f"{args.threads} threads, "
            f"{args.clock} clock; {args.steps} timed steps after {args.warmup} warm-up, best median of "
            f"{args.repeats}",
            flush=True,
        )
        rows = [(epochs, *measure(setup, root, epochs, args)) for epochs in args.epochs]
        roof = matmul_roof(torch.bfloat16 if args.dtype == "bf16" else torch.float32, clock=CLOCKS[args.clock])
    unit = "s/step" if args.clock == "wall" else "CPU s/step"
    print(
        f"\n{date.today()}, torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
        f"{args.dtype}" + (f", TRL {args.trl_precision}" if args.dtype == "bf16" else "")
    )
    print(
        f"| PPO epochs | ours {unit} | TRL {unit} | speed-up (TRL/ours) |"
        + (f" ours, HF forward {unit} | its speed-up |" if args.ablate else "")
    )
    print("|---:|---:|---:|---:|" + ("---:|---:|" if args.ablate else ""))
    for epochs, o, t, h in rows:
        print(f"| {epochs} | {o:.3f} | {t:.3f} | {t / o:.2f}x |" + (f" {h:.3f} | {t / h:.2f}x |" if h else ""))
    print(
        f"\nThe arithmetic's floor, at this run's {args.dtype} matmul roof ({roof / 1e9:.0f} GFLOP/s, a 2048^3 "
        "matmul): the fastest any implementation of this step could run here, so TRL / floor bounds every speed-up "
        "(generation counted at the roof too, though its decode steps are bound by memory, not arithmetic):"
    )
    print("| PPO epochs | GFLOP/step | floor s/step | ours / floor | TRL / floor |")
    print("|---:|---:|---:|---:|---:|")
    for epochs, o, t, _ in rows:
        floor = step_flops(policy, plen, 32, epochs) / roof
        print(f"| {epochs} | {floor * roof / 1e9:.1f} | {floor:.3f} | {o / floor:.2f}x | {t / floor:.2f}x |")


if __name__ == "__main__":
    main()
