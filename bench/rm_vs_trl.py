"""Our reward-model step vs TRL's RewardTrainer step on the identical model, data, batch and dtype, in one run.

    nice -n 10 python bench/rm_vs_trl.py                      # K = 2 (TRL's format) and K = 4, fp32
    nice -n 10 python bench/rm_vs_trl.py --k 2 --dtype bf16 --threads 1 --clock cpu   # on a busy machine

Model: a tiny Llama (h256 x 4 layers; its tokenizer, asked for 4096 tokens, learns ~440 here) with a scalar head,
one set of initial weights copied to both.
Data: synthetic chat rankings rendered once by flywheel's chat template (a system prompt + a question of 12..40 words,
or the question alone with --no-system; answers of 8..48 words); TRL gets the very same token ids as pre-tokenized
`chosen_ids` / `rejected_ids` (prompt + answer + what the template writes after it: the sequence flywheel scores).

- K = 2: each step trains on --batch comparisons in both trainers. Before timing, both losses are computed on one
  identical batch with identical weights and must agree (they are the same Eq. 1 for K = 2).
- K = 4: each step trains on --batch rankings of 4 answers. flywheel scores the 4 answers (4 forwards per ranking,
  the prompt computed once); TRL needs the 6 pairs per ranking expanded (6 x --batch pairs, 12 sequences per ranking)
  to see the same comparisons. With a fixed K every ranking has 6 pairs, so both losses weigh every pair equally.
Both see identical batches: TRL samples sequentially from the pairs listed in the order flywheel's data order visits
the rankings.
- "ours, K separate rows" is flywheel with --share-prompt false: K padded sequences per ranking, what the K-forward
  scheme costs without prompt sharing.

Timing: both trainers run their real training loops (flywheel's `train_loop`, TRL's `Trainer.train`), and a step is
the wall time from one step to the next (data collation, forward, backward, clipping, AdamW, logging), after --warmup
steps. The trainers take turns for --rounds rounds (who goes first rotates); the median step of each is reported, and
the ratio ours / TRL.
TRL's gradient checkpointing (its default) is turned off so that both do the same arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flywheel.data.formats import Message, Ranking
from flywheel.models import config_for_tokenizer, init_reward_head
from flywheel.tokenization import train_tokenizer
from flywheel.train.loop import DataOrder, train_loop
from flywheel.train.reward import RankingGroup, RewardConfig, collate_groups, encode_rankings, rm_loss

CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU time (steadier on a busy machine)
WORDS = (
    "the a cat dog sat on mat and ran to see big red blue small house tree river city what why how is are was "
    "were capital of number sort list reverse word count letters please answer question short long"
).split()
SYSTEM = "You are a helpful assistant. Answer the question truthfully, briefly and politely."


def make_rankings(n: int, k: int, seed: int = 0, system: bool = True) -> tuple[list[Ranking], list[str]]:
    rng = random.Random(seed)
    rankings, texts = [], []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "?"
        answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48))) + f" {j}." for j in range(k)]
        texts += [question, *answers]
        prompt = [Message("system", SYSTEM)] * system + [Message("user", question)]
        rankings.append(Ranking(prompt, answers, [[j] for j in range(k)]))
    return rankings, texts


def build_model(tok, size: str, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = config_for_tokenizer(tok, size)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    init_reward_head(model)
    return model


def time_ours(model, groups: list[RankingGroup], pad: int, args, *, share_prompt: bool) -> list[float]:
    stamps: list[float] = []

    def collate(batch: list[RankingGroup]):
        stamps.append(CLOCK())  # a step starts with its collation
        return collate_groups(batch, pad, share_prompt=share_prompt)

    steps = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RewardConfig(
            out=tmp,
            model="-",
            data="-",
            max_steps=steps,
            batch_size=args.batch,
            lr=1e-5,
            warmup_ratio=0.0,
            bf16=args.dtype == "bf16",
            progress=False,
            log_every=10_000,
            share_prompt=share_prompt,
            threads=args.threads,
        )
        train_loop(model, cfg, Path(tmp), groups, collate, lambda m, b: rm_loss(m, b), desc="rm")
    return [b - a for a, b in itertools.pairwise(stamps)][args.warmup :]


def trl_rows(groups: list[RankingGroup], *, seed: int | None = None) -> list[dict[str, list[int]]]:
    """Every (winner, loser) pair as TRL's pre-tokenized preference example; with `seed`, the rankings in the order
    flywheel's loop visits them (so that TRL's sequential sampler builds the same batches)."""
    order = DataOrder(len(groups), seed).indices(0, len(groups)) if seed is not None else range(len(groups))
    return [
        {
            "chosen_ids": groups[i].prompt_ids + groups[i].scored(w),
            "rejected_ids": groups[i].prompt_ids + groups[i].scored(lo),
        }
        for i in order
        for w, lo in groups[i].pairs
    ]


def trl_config(out: str, batch: int, steps: int, args):
    from trl import RewardConfig as TRLRewardConfig

    return TRLRewardConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-5,
        bf16=args.dtype == "bf16",
        gradient_checkpointing=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        max_length=None,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        seed=0,
        train_sampling_strategy="sequential",
    )


def time_trl(model, rows: list[dict], tok, batch: int, args) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardTrainer

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(CLOCK())

    steps = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RewardTrainer(
            model=model,
            args=trl_config(tmp, batch, steps, args),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[Timer()],
        )
        trainer.train()
    return [b - a for a, b in itertools.pairwise(stamps)][args.warmup :]


def check_same_loss(model, groups: list[RankingGroup], tok, args) -> tuple[float, float]:
    """Eq. 1 on one batch, computed by both trainers from identical weights (K = 2: one pair per ranking)."""
    from datasets import Dataset
    from trl import RewardTrainer

    batch = groups[: args.batch]
    ours = copy.deepcopy(model).eval()
    b = collate_groups(batch, tok.pad_token_id)
    with torch.no_grad():
        loss_ours = float(rm_loss(ours, b)[0]) / b["weight"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RewardTrainer(
            model=copy.deepcopy(model).eval(),
            args=trl_config(tmp, args.batch, 1, args),
            train_dataset=Dataset.from_list(trl_rows(batch)),
            processing_class=tok,
        )
        inputs = trainer.data_collator(trl_rows(batch))
        with torch.no_grad():
            loss_trl = float(trainer.compute_loss(trainer.model, inputs))
    return loss_ours, loss_trl


def tokens(groups: list[RankingGroup]) -> str:
    p = statistics.mean(len(g.prompt_ids) for g in groups)
    r = statistics.mean(len(x) for g in groups for x in g.responses)
    return f"prompt {p:.0f} tokens, answer {r:.0f} tokens on average"


def run_k(k: int, tok, model, args) -> None:
    rankings, _ = make_rankings(args.rankings, k, seed=k, system=not args.no_system)
    groups = encode_rankings(tok, rankings, max_length=1024, source=f"K={k}")
    rows = trl_rows(groups, seed=0)  # flywheel's RewardConfig seed is 0 too
    trl_batch = args.batch * (k * (k - 1) // 2)
    print(f"\nK = {k}: {args.batch} rankings per step ({tokens(groups)}); TRL: {trl_batch} pairs per step")
    if k == 2:
        ours_loss, trl_loss = check_same_loss(model, groups, tok, args)
        print(
            f"  same batch, same weights: loss ours {ours_loss:.6f}  TRL {trl_loss:.6f}  "
            f"(|diff| {abs(ours_loss - trl_loss):.1e})"
        )
        assert abs(ours_loss - trl_loss) < 1e-4, "the two trainers disagree on the loss"
    runs = {
        "TRL RewardTrainer": lambda: time_trl(copy.deepcopy(model), rows, tok, trl_batch, args),
        "ours": lambda: time_ours(copy.deepcopy(model), groups, tok.pad_token_id, args, share_prompt=True),
        "ours, K separate rows": lambda: time_ours(
            copy.deepcopy(model), groups, tok.pad_token_id, args, share_prompt=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first, so drifting load hits all alike
            times[name] += runs[name]()
    trl = statistics.median(times["TRL RewardTrainer"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:<24} {med:7.3f} {args.clock} s/step  (min {min(ts):.3f}, {len(ts)} steps)  "
            f"{args.batch / med:6.1f} rankings/s  ratio vs TRL {med / trl:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4], help="answers per ranking (2 = TRL's pairs)")
    parser.add_argument("--batch", type=int, default=8, help="rankings per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per trainer per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the trainers")
    parser.add_argument("--rankings", type=int, default=256, help="rankings generated per K")
    parser.add_argument("--size", default="small", help="model size from flywheel.models.TINY_SIZES")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both trainers use this")
    parser.add_argument(
        "--no-system",
        action="store_true",
        help="prompts without the system message (shorter prompts: less for prompt sharing to save)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (less noisy when cores are shared)",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (bench/README.md)")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    rankings, texts = make_rankings(200, 4, seed=99)
    tok = train_tokenizer(texts + [SYSTEM], vocab_size=4096)
    model = build_model(tok, args.size, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama {args.size} ({n_params / 1e6:.1f}M params), {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock; torch {torch.__version__}"
    )
    for k in args.k:
        run_k(k, tok, model, args)


if __name__ == "__main__":
    main()
