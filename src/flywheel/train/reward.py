"""Reward model: trained from K-way rankings (InstructGPT Eq. 1), and the scoring API that PPO and best-of-n use.

    flywheel rm --model runs/sft/final --data rankings.jsonl --out runs/rm
    flywheel rm --model runs/sft/final --data rankings.jsonl --reference-data demos.jsonl --out runs/rm --bf16
    flywheel rm --model runs/sft/final --data rankings.jsonl --out runs/rm --rm-ensemble 4  # an ensemble (ensemble.py)

The model is the backbone of `--model` (a causal LM, e.g. the SFT checkpoint, or an existing reward model) with a
scalar head, saved as `*ForSequenceClassification(num_labels=1)`. The reward of a response is the head applied to the
hidden state of the last token of the chat template's full rendering of prompt + response (as TRL's RewardTrainer and
OpenRLHF read it): after the answer's end-of-turn token and whatever the template writes after it (ChatML's and
Gemma's "\n", Phi-3's "\n<|endoftext|>"). Generated responses stop at the end-of-turn token; PPO and best-of-n append
the same markup (`flywheel.tokenization.TurnEnd`) before reading, so training, scoring, PPO and plain transformers
(`apply_chat_template` + `AutoModelForSequenceClassification`) read the reward at the same token.

Loss (InstructGPT Eq. 1): for a ranking of K answers, -1/C(K,2) * sum over (winner, loser) pairs of
log sigmoid(r_w - r_l - margin); tied pairs are dropped, so the mean is over the ranked pairs. One ranking is one batch
element; the loop's `weight` is the number of rankings, so the loss is the mean over rankings whatever the batching.
Each answer is scored once: K rewards per ranking, not 2 per pair. With `--share-prompt` (the default) the prompt is
computed once per ranking too: a ranking is one row `[prompt][answer 1]...[answer K]` whose answers see the prompt and
themselves only (a block attention mask; position ids restart after the prompt), which gives the same rewards as K
separate sequences.

After training, the mean raw score of reference answers is subtracted so that they score 0 on average (InstructGPT:
"so that the labeler demonstrations achieve a mean score of 0"). References are `--reference-data` conversations (the
last assistant turn after the messages before it) or, when none are given, the top-ranked answers of the training
rankings. The offset is stored in the model's config as `flywheel_reward_offset` and subtracted by
`RewardModel.score`. The `*ForSequenceClassification` heads of transformers have no bias, so plain transformers
gives raw scores: subtract `config.flywheel_reward_offset` (docs/chat-templates.md has the snippet). Only a head that
has a bias absorbs the offset there, and then the stored offset is 0.

    rm = RewardModel.from_pretrained("runs/rm/final")
    rm.score([[{"role": "user", "content": "2+2?"}]], ["4"])  # tensor([...]) normalised scores, shape (B,)
    rm.score_ids(prompt_ids, response_ids)                        # the same from token ids (PPO)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flywheel import distributed
from flywheel.data.batching import shared_prompt_mask, split_heldout, to_device
from flywheel.data.formats import Ranking
from flywheel.data.io import EVAL_DATASET_SPLIT_HELP, SKIP_BAD_HELP
from flywheel.errors import UserError
from flywheel.models import (
    count_parameters,
    disable_dropout,
    is_sequence_classifier,
    load_causal_lm,
    load_sequence_classifier,
    resize_for_tokenizer,
    reward_head,
)
from flywheel.tokenization import (
    CHAT_TEMPLATE_HELP,
    TurnEnd,
    load_tokenizer,
    render_prompt,
    render_scored_response,
    turn_end,
)
from flywheel.train.ensemble import (
    RewardEnsemble,
    assemble_ensemble,
    check_aggregation,
    ensemble_members,
    single_model_error,
)
from flywheel.train.likelihood import LikelihoodReward, check_same_tokenizer, has_likelihood_head, load_head
from flywheel.train.loop import (
    TrainConfig,
    autocast,
    check_resumed_settings,
    prepare_model,
    prepare_run_dir,
    save_final,
    save_run_config,
    train_loop,
)
from flywheel.utils import cpu_threads, log, seed_everything

OFFSET_KEY = "flywheel_reward_offset"  # config key: RewardModel.score returns raw score - offset
OVERLONG = ("drop", "truncate")


@dataclass
class PreferenceConfig(TrainConfig):
    """The data and batching fields the two trainers on rankings (reward model, DPO) share."""

    data: str = field(default="", metadata={"help": "rankings / comparisons: JSONL, TRL chosen/rejected, HH-RLHF"})
    eval_data: str = field(default="", metadata={"help": "held-out rankings (default: --eval-split of --data)"})
    eval_split: float = field(default=0.05, metadata={"help": "fraction of rankings held out when no --eval-data"})
    eval_dataset_split: str = field(default="test", metadata={"help": EVAL_DATASET_SPLIT_HELP})
    batch_size: int = field(default=8, metadata={"help": "rankings per micro-batch (all K answers of each)"})
    max_length: int = field(default=512, metadata={"help": "most tokens of prompt + answer"})
    overlong: str = field(
        default="drop",
        metadata={
            "help": "answers longer than --max-length: drop (their pairs go; rankings left without a pair go) or "
            "truncate (the prompt loses its oldest tokens, down to half the budget, then answers are cut)"
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "compute each ranking's prompt once (block attention mask); false = K separate padded sequences"
        },
    )
    eval_batch_size: int = field(default=32, metadata={"help": "answers per scoring batch (held-out, DPO reference)"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UserError("--data is required (rankings or chosen/rejected comparisons)")
        if not 0 <= self.eval_split < 1:
            raise UserError("--eval-split must be in [0, 1) (the fraction held out)")
        if self.max_length < 2:
            raise UserError("--max-length must be >= 2")
        if self.overlong not in OVERLONG:
            raise UserError(f"--overlong must be one of {', '.join(OVERLONG)}, got '{self.overlong}'")
        if not 0 <= self.eval_split < 1:
            raise UserError("--eval-split must be in [0, 1)")
        if self.eval_batch_size < 1:
            raise UserError("--eval-batch-size must be >= 1")


@dataclass
class RewardConfig(PreferenceConfig):
    model: str = field(default="", metadata={"help": "backbone: a causal LM (e.g. the SFT model) or a reward model"})
    reference_data: str = field(
        default="",
        metadata={
            "help": "conversations whose final assistant turns should score 0 on average (default: the top-ranked "
            "answers of the training rankings)"
        },
    )
    reference_limit: int = field(default=2000, metadata={"help": "most reference answers scored for the offset"})
    normalize: bool = field(default=True, metadata={"help": "after training, make reference answers score mean 0"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    margin: float = field(default=0.0, metadata={"help": "the loss asks r_winner - r_loser to exceed this margin"})
    chat_template: str = field(default="", metadata={"help": CHAT_TEMPLATE_HELP})
    rm_ensemble: int = field(
        default=1,
        metadata={
            "help": "train N reward models that differ in seed (--seed + i: head init and data order; same data and "
            "references), one after another in OUT/member<i>/; final/ holds them as final/member<i> with a "
            "flywheel_ensemble.json manifest (1 = one plain reward model)"
        },
    )
    parallel_members: int = field(
        default=1,
        metadata={
            "help": "with --rm-ensemble N: train up to P members at once, each in its own process with --threads / P "
            "threads (--threads 0: all cores); faster on a CPU whose cores a small model leaves idle. A member "
            "trained with T threads is the same model whatever runs beside it (1 = one after another)"
        },
    )
    likelihood_head: bool = field(
        default=False,
        metadata={
            "help": "after training, fit a small head on the training rankings that reads the reward model's score "
            "and --model's likelihood of the answer (its least likely token, first token, sum, length), and score "
            "with it: --model (the SFT policy) knows which values are likely right where the reward model does not "
            "(flywheel.train.likelihood); final/ then holds a copy of --model as the reference"
        },
    )
    likelihood_rankings: int = field(
        default=0,
        metadata={
            "help": "fit the likelihood head on at most this many of the training rankings, drawn with --seed (0 = "
            "all): the fit scores each answer with every member and --model once more, and the head's handful of "
            "weights needs far fewer rankings than a reward model"
        },
    )

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required (a causal LM such as the SFT model, or a reward model)")
        super().validate()
        if self.rm_ensemble < 1:
            raise UserError("--rm-ensemble must be >= 1")
        if self.parallel_members < 1:
            raise UserError("--parallel-members must be >= 1")
        if self.likelihood_rankings < 0:
            raise UserError("--likelihood-rankings must be >= 0 (0 = all)")
        if self.parallel_members > 1 and self.nproc > 1:
            raise UserError("--parallel-members trains members in separate processes: use it with --nproc 1")


def reward_offset(config: Any) -> float:
    """The normalisation offset `flywheel rm` stores in a reward model's config (0 for other models): what its raw
    score is reduced by, wherever it is read (scoring, PPO's reward and the critic that starts from it)."""
    return float(getattr(config, OFFSET_KEY, 0.0) or 0.0)


def ranking_loss(rewards: torch.Tensor, pairs: Sequence[tuple[int, int]], margin: float = 0.0) -> torch.Tensor:
    """InstructGPT Eq. 1 for one prompt: -mean over (winner, loser) pairs of log sigmoid(r_w - r_l - margin).

    rewards: (K,) one score per answer. With all C(K,2) pairs this is -1/C(K,2) * sum log sigmoid(...).
    """
    if not pairs:
        raise ValueError("a ranking needs at least one (winner, loser) pair")
    w = torch.tensor([p[0] for p in pairs], device=rewards.device)
    lo = torch.tensor([p[1] for p in pairs], device=rewards.device)
    return -F.logsigmoid(rewards[w] - rewards[lo] - margin).mean()


def grouped_ranking_loss(
    rewards: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    pair_group: torch.Tensor,
    n_groups: int,
    margin: float = 0.0,
) -> torch.Tensor:
    """`ranking_loss` of many rankings at once: (G,) the loss of each ranking (group).

    rewards: (N,) scores of all answers of the batch; winners, losers: (P,) indices into rewards;
    pair_group: (P,) the ranking each pair belongs to (every group must own at least one pair).
    """
    per_pair = -F.logsigmoid(rewards[winners] - rewards[losers] - margin)  # (P,)
    return group_means(per_pair, pair_group, n_groups)


@dataclass
class RankingGroup:
    """One prompt and its K answers as token ids, and the (winner, loser) pairs the loss compares."""

    prompt_ids: list[int]  # the rendered prompt incl. the generation prompt (what the policy sees)
    responses: list[list[int]]  # K answers, each as the policy writes it (incl. its end-of-turn token)
    pairs: list[tuple[int, int]]  # indices into responses; empty for scoring-only groups
    tails: list[list[int]] | None = None  # per answer: the template's markup after it; rewards are read at its end

    @property
    def k(self) -> int:
        return len(self.responses)

    def scored(self, k: int) -> list[int]:
        """Answer k followed by its tail: the tokens after the prompt that the reward model reads."""
        return self.responses[k] + self.tails[k] if self.tails else list(self.responses[k])


def fit_group(
    prompt: list[int], responses: list[list[int]], max_length: int, overlong: str
) -> tuple[list[int], list[list[int] | None], bool]:
    """Apply the `--overlong` policy: (prompt, answers with None for dropped ones, whether anything was cut)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, list(responses), False
    if overlong == "drop":
        return prompt, [r if len(prompt) + len(r) <= max_length else None for r in responses], False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    return prompt, [r[: max_length - keep] for r in responses], True


def check_tail(tokenizer: Any, tail: Sequence[int], expected: TurnEnd) -> None:
    """Generated answers are completed with the template's usual tail (`TurnEnd`); a conversation whose rendering
    ends otherwise would be read at another token in training than after generation."""
    if tuple(tail) != expected.tail:
        found, usual = (repr(tokenizer.decode(list(t), skip_special_tokens=False)) for t in (tail, expected.tail))
        raise UserError(
            f"the chat template ends this conversation with {found} after the answer, not with its usual {usual}: "
            "rewards read after generation would be read elsewhere (use a template that closes every answer alike)"
        )


def render_ranking(tokenizer: Any, ranking: Ranking, usual: TurnEnd) -> tuple[list[int], list[tuple[list[int], ...]]]:
    """(prompt ids, [(answer ids, tail ids) for each completion]) of one ranking."""
    messages = ranking.prompt_dicts()
    prompt = render_prompt(tokenizer, messages)
    rendered = [render_scored_response(tokenizer, messages, text) for text in ranking.completions]
    for _, tail in rendered:
        check_tail(tokenizer, tail, usual)
    return prompt, rendered


def encode_rankings(
    tokenizer: Any,
    rankings: Sequence[Ranking],
    *,
    max_length: int,
    overlong: str = "drop",
    source: str = "data",
    skip_bad: bool = False,
    skipped: list[Ranking] | None = None,
) -> list[RankingGroup]:
    """Render every ranking with the chat template; apply the length policy and say what it did in one line.
    Each answer carries the template's tail (`RankingGroup.tails`): its reward is read at the rendering's end.
    A ranking the chat template rejects is a FILE:LINE error, or skipped with `skip_bad` (and appended to
    `skipped`)."""
    from flywheel.data.io import render_records

    groups: list[RankingGroup] = []
    cut = dropped_answers = dropped_rankings = answers = 0
    usual = turn_end(tokenizer)
    renderings = render_records(
        rankings, lambda r: render_ranking(tokenizer, r, usual), skip_bad=skip_bad, source=source, skipped=skipped
    )
    for r, (prompt, rendered) in renderings:
        answers += len(rendered)
        prompt, fitted, was_cut = fit_group(prompt, [a + t for a, t in rendered], max_length, overlong)
        cut += was_cut
        kept = [j for j, ids in enumerate(fitted) if ids is not None]
        dropped_answers += len(fitted) - len(kept)
        new_index = {old: new for new, old in enumerate(kept)}
        pairs = [(new_index[w], new_index[lo]) for w, lo in r.pairs() if w in new_index and lo in new_index]
        if not pairs:
            dropped_rankings += 1
            continue
        split = [(fitted[j][: len(rendered[j][0])], fitted[j][len(rendered[j][0]) :]) for j in kept]  # type: ignore[index]
        groups.append(RankingGroup(prompt, [a for a, _ in split], pairs, [t for _, t in split]))
    if cut:
        log.warning(
            "%s: %d of %d rankings longer than %d tokens were truncated (prompt cut from the left, answers "
            "from the right)",
            source,
            cut,
            len(rankings),
            max_length,
        )
    if dropped_answers:
        log.warning(
            "%s: dropped %d of %d answers longer than %d tokens with their prompt, and %d rankings left "
            "without a ranked pair",
            source,
            dropped_answers,
            answers,
            max_length,
            dropped_rankings,
        )
    if not groups:
        raise UserError(
            f"no usable rankings: every one is longer than --max-length {max_length} "
            "(raise it, or pass --overlong truncate)",
            path=source,
        )
    return groups


def _group_rows(group: RankingGroup, share_prompt: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """(ids, position ids, segment ids) of the rows that hold a group: segment 0 = prompt, k + 1 = answer k."""
    p = len(group.prompt_ids)
    scored = [group.scored(k) for k in range(group.k)]
    if not share_prompt:
        return [
            (group.prompt_ids + r, list(range(p + len(r))), [0] * p + [k + 1] * len(r)) for k, r in enumerate(scored)
        ]
    ids, pos, seg = list(group.prompt_ids), list(range(p)), [0] * p
    for k, r in enumerate(scored):
        ids += r
        pos += range(p, p + len(r))
        seg += [k + 1] * len(r)
    return [(ids, pos, seg)]


def padded_tokens(group: RankingGroup, share_prompt: bool) -> int:
    """The tokens `group` occupies in a batch (its row, or its K rows padded to the longest answer)."""
    p = len(group.prompt_ids)
    scored = [len(group.scored(k)) for k in range(group.k)]
    return p + sum(scored) if share_prompt else group.k * (p + max(scored))


def collate_groups(
    groups: Sequence[RankingGroup], pad_id: int, *, share_prompt: bool = True, mask_dtype: torch.dtype = torch.bool
) -> dict[str, Any]:
    """One forward's worth of rankings: every answer of every group, with the indices the losses need.

    share_prompt: one row per group `[prompt][answer 1]..[answer K]` with a (R, 1, T, T) attention mask in which an
    answer sees the prompt and itself; otherwise one right-padded row per answer with a (R, T) padding mask.
    mask_dtype: bool for SDPA; a float dtype gives an additive mask (0 / -inf) for eager attention.
    """
    rows = [row for g in groups for row in _group_rows(g, share_prompt)]
    n_rows, length = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, length), dtype=torch.long)
    seg = torch.full((n_rows, length), -1, dtype=torch.long)
    for i, (row_ids, row_pos, row_seg) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        pos[i, : len(row_ids)] = torch.tensor(row_pos)
        seg[i, : len(row_ids)] = torch.tensor(row_seg)
    ends: list[int] = []  # flat index (row * T + column) of each answer's last token, where its reward is read
    pred: list[int] = []  # flat index of the position that predicts each answer token (for log-probs)
    targets: list[int] = []  # that answer token
    target_seq: list[int] = []  # which answer (0..N-1) the token belongs to
    answer_group: list[int] = []
    winners: list[int] = []
    losers: list[int] = []
    pair_group: list[int] = []
    row = n = 0
    for g, group in enumerate(groups):
        p = len(group.prompt_ids)
        start = p
        for k, resp in enumerate(group.responses):
            if not share_prompt and k > 0:
                row, start = row + 1, p
            base = row * length
            scored = len(group.scored(k))
            ends.append(base + start + scored - 1)  # the reward is read after the answer's tail
            pred += [base + p - 1] + [base + start + j for j in range(len(resp) - 1)]
            targets += resp
            target_seq += [n + k] * len(resp)
            start += scored
        winners += [n + w for w, _ in group.pairs]
        losers += [n + lo for _, lo in group.pairs]
        pair_group += [g] * len(group.pairs)
        answer_group += [g] * group.k
        n += group.k
        row += 1
    real = seg >= 0
    if share_prompt:
        mask = shared_prompt_mask(seg)  # (R, 1, T, T)
        if mask_dtype != torch.bool:
            mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(~mask, torch.finfo(mask_dtype).min)
    else:
        mask = real.long()  # (R, T)
    return {
        "input_ids": ids,  # (R, T)
        "position_ids": pos,  # (R, T)
        "attention_mask": mask,  # (R, 1, T, T) bool/additive, or (R, T) 0/1
        "ends": torch.tensor(ends),  # (N,) reward read-out positions, flat over R * T
        "pred_index": torch.tensor(pred),  # (M,) positions whose next-token logits score the answer tokens
        "target_ids": torch.tensor(targets),  # (M,)
        "target_seq": torch.tensor(target_seq),  # (M,) answer of each target token
        "winners": torch.tensor(winners, dtype=torch.long),  # (P,) indices into the N answers
        "losers": torch.tensor(losers, dtype=torch.long),  # (P,)
        "pair_group": torch.tensor(pair_group, dtype=torch.long),  # (P,) group of each pair
        "answer_group": torch.tensor(answer_group, dtype=torch.long),  # (N,) group of each answer
        "n_groups": len(groups),
        "n_answers": n,
        "weight": len(groups),  # the loss is a mean over rankings
        "tokens": int(real.sum()),
    }


def attention_mask_dtype(model: Any, share_prompt: bool) -> torch.dtype:
    """The mask type the model's attention implementation takes for a custom 4D mask (checked up front)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if not share_prompt or impl == "sdpa":
        return torch.bool
    if impl == "eager":
        return next(model.parameters()).dtype
    raise UserError(
        f"--share-prompt needs sdpa or eager attention, the model uses '{impl}': pass --share-prompt false"
    )


def backbone_hidden(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(R*T, H) last hidden states of the backbone (no LM or score head), flattened over rows."""
    base = model.base_model
    if base is model:
        raise UserError(f"{type(model).__name__} has no separate backbone (base_model)")
    hidden = base(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state  # (R, T, H)
    return hidden.reshape(-1, hidden.shape[-1])


def sequence_rewards(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(N,) float32 raw rewards: the score head at each answer's last token."""
    hidden = backbone_hidden(model, batch)[batch["ends"]]  # (N, H)
    return reward_head(model)(hidden).squeeze(-1).float()


def rm_loss(model: Any, batch: dict[str, Any], margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed ranking loss over the batch's groups, and per-group metric sums (the loop averages over groups)."""
    rewards = sequence_rewards(model, batch)  # (N,)
    per_group = grouped_ranking_loss(
        rewards, batch["winners"], batch["losers"], batch["pair_group"], batch["n_groups"], margin
    )
    with torch.no_grad():
        diff = rewards[batch["winners"]] - rewards[batch["losers"]]  # (P,)
        acc, margin_ = (group_means(x, batch["pair_group"], batch["n_groups"]) for x in ((diff > 0).float(), diff))
        mean_reward = group_means(rewards, batch["answer_group"], batch["n_groups"])
    return per_group.sum(), {
        "accuracy": float(acc.sum()),
        "margin": float(margin_.sum()),
        "reward_mean": float(mean_reward.sum()),
    }


def group_means(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) mean of `values` (X,) within each group; `group` (X,) says which group each value belongs to."""
    zeros = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    total = zeros.index_add(0, group, values)
    count = zeros.index_add(0, group, torch.ones_like(values))
    return total / count.clamp(min=1)


def make_batches(groups: Sequence[Any], max_answers: int) -> list[list[Any]]:
    """Consecutive groups (anything with `.k` answers), at most `max_answers` answers per batch (a bigger group is a
    batch of its own)."""
    batches: list[list[Any]] = []
    cur: list[Any] = []
    n = 0
    for g in groups:
        if cur and n + g.k > max_answers:
            batches.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += g.k
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def eval_rankings(
    model: Any,
    groups: Sequence[RankingGroup],
    pad_id: int,
    *,
    share_prompt: bool = True,
    max_answers: int = 32,
    margin: float = 0.0,
) -> dict[str, float]:
    """Mean ranking loss and pairwise accuracy (ties in score count half) of held-out groups."""
    was_training = model.training
    model.eval()
    mask_dtype = attention_mask_dtype(model, share_prompt)
    device = next(model.parameters()).device
    loss = correct = pairs = 0.0
    for chunk in make_batches(groups, max_answers):
        batch = to_device(collate_groups(chunk, pad_id, share_prompt=share_prompt, mask_dtype=mask_dtype), device)
        rewards = sequence_rewards(model, batch)
        loss += float(
            grouped_ranking_loss(
                rewards, batch["winners"], batch["losers"], batch["pair_group"], batch["n_groups"], margin
            ).sum()
        )
        diff = rewards[batch["winners"]] - rewards[batch["losers"]]
        correct += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        pairs += diff.numel()
    model.train(was_training)
    return {"eval_loss": loss / len(groups), "eval_accuracy": correct / max(pairs, 1)}


class RewardModel:
    """Batched, no-grad scoring with a trained reward model. Scores are normalised (raw - offset) unless asked not to.

    rm = RewardModel.from_pretrained("runs/rm/final", bf16=True)
    rm.score(prompts, responses)            # prompts: list of message lists; responses: list of strings -> (B,)
    rm.score_ids(prompt_ids, response_ids)  # token ids as the policy saw/produced them -> (B,)

    Answers to the same prompt are scored together with the prompt computed once (best-of-n, K-way evaluation).
    `max_length` caps prompt + answer (default: the model's context): longer inputs lose their oldest prompt tokens.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        bf16: bool = False,
        share_prompt: bool = True,
        max_length: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.bf16 = bf16
        self.share_prompt = share_prompt
        self.mask_dtype = attention_mask_dtype(model, share_prompt)
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = max_length or limit or 1 << 30
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
        if pad is None:
            raise UserError("the reward model has no pad token id")
        self.pad_id = int(pad)
        self.turn_end = turn_end(tokenizer)  # what generated answers get appended before their reward is read

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        ensemble_agg: str = "mean",
        ensemble_lambda: float = 1.0,
        likelihood: bool = True,
        **kwargs: Any,
    ) -> RewardModel | RewardEnsemble | LikelihoodReward:
        """A reward model directory or hub id (at `revision`) with its tokenizer; `kwargs` go to the constructor.
        An ensemble directory (`flywheel rm --rm-ensemble N`) gives a `RewardEnsemble` with the same scoring
        interface, aggregated with `ensemble_agg` (mean, min, mean-std) and `ensemble_lambda`; a single model takes
        only the default aggregation. A directory saved with `--likelihood-head` gives a `LikelihoodReward` (the
        same interface; `likelihood=False`: the reward model or ensemble without its head)."""
        hub = {"revision": revision, "trust_remote_code": trust_remote_code}
        check_aggregation(ensemble_agg, ensemble_lambda)
        if likelihood and Path(path).is_dir() and has_likelihood_head(path):
            inner = cls.from_pretrained(
                path,
                dtype=dtype,
                device=device,
                ensemble_agg=ensemble_agg,
                ensemble_lambda=ensemble_lambda,
                likelihood=False,
                **hub,
                **kwargs,
            )
            head, offset, ref_dir = load_head(path)
            check_same_tokenizer(load_tokenizer(str(ref_dir)), inner.tokenizer, "the reward model")
            reference = load_causal_lm(str(ref_dir), dtype=dtype)
            if device is not None:
                reference.to(device)
            return LikelihoodReward(inner, reference, head, offset, bf16=bool(kwargs.get("bf16", False)))
        members = ensemble_members(path) if Path(path).is_dir() else None
        if members is not None:
            one = {"dtype": dtype, "device": device, **hub, **kwargs}
            scorers = [cls.from_pretrained(m, **one) for m in members]
            return RewardEnsemble(scorers, agg=ensemble_agg, lam=ensemble_lambda)
        if ensemble_agg != "mean":
            raise UserError(single_model_error(ensemble_agg), path=str(path))
        model = load_sequence_classifier(str(path), dtype=dtype, trained=True, **hub)
        tokenizer = load_tokenizer(str(path), **hub)
        resize_for_tokenizer(model, tokenizer)  # a tokenizer without a pad token gets one: the batches pad with it
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, **kwargs)

    @property
    def offset(self) -> float:
        """What `score` subtracts from the raw head output (stored in the config by `flywheel rm`)."""
        return reward_offset(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_groups(self, groups: Sequence[RankingGroup], *, normalize: bool = True) -> list[torch.Tensor]:
        """Scores of each group's answers: a list of (K,) float32 CPU tensors, in the order of `groups`."""
        out: list[torch.Tensor] = []
        offset = self.offset if normalize else 0.0
        for chunk in make_batches(groups, self.batch_size):
            batch = to_device(
                collate_groups(chunk, self.pad_id, share_prompt=self.share_prompt, mask_dtype=self.mask_dtype),
                self.device,
            )
            with autocast(self.bf16):
                rewards = (sequence_rewards(self.model, batch) - offset).cpu()
            out += list(rewards.split([g.k for g in chunk]))
        return out

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        normalize: bool = True,
        close_cut: bool = True,
    ) -> torch.Tensor:
        """(B,) scores of response i after prompt i, as the engine returns them. A response that ends with the
        template's end-of-turn token gets the markup the template writes after it (`TurnEnd`), so it is read where
        training and plain transformers read it. A response without one (cut at a length limit) is read as an answer
        that ends there (`TurnEnd.close`: as the rankings a reward model learns from show such an answer);
        `close_cut=False` reads it where it stops, a position the reward model never trained at."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        for i, r in enumerate(response_ids):
            if len(r) == 0:
                raise UserError(f"response {i} is empty: there is no token to read its reward at")
        read = self.turn_end.close if close_cut else self.turn_end.complete
        return self._score_rows(prompt_ids, [read(r) for r in response_ids], normalize)

    def _score_rows(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], normalize: bool
    ) -> torch.Tensor:
        """(B,) scores read at the last token of prompt i + response i (the response already completed)."""
        if not prompt_ids:
            return torch.zeros(0)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompt_ids):
            by_prompt.setdefault(tuple(p), []).append(i)
        groups, order, cut = [], [], 0
        for p, rows in by_prompt.items():
            # Too long: keep every response's end (where the reward is read) and the prompt's most recent tokens.
            responses = [list(response_ids[i])[-(self.max_length - 1) :] for i in rows]
            keep = max(1, self.max_length - max(len(r) for r in responses))
            cut += len(p) > keep or any(len(r) < len(response_ids[i]) for r, i in zip(responses, rows, strict=True))
            groups.append(RankingGroup(list(p[-keep:]), responses, []))
            order += rows
        if cut:
            log.warning(
                "reward model: %d prompts (or their answers) lost their oldest tokens to fit %d tokens",
                cut,
                self.max_length,
            )
        flat = torch.cat(self.score_groups(groups, normalize=normalize))
        scores = torch.empty_like(flat)
        scores[torch.tensor(order)] = flat
        return scores

    def score(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *, normalize: bool = True
    ) -> torch.Tensor:
        """(B,) scores of `responses[i]` as the assistant's answer to the conversation `prompts[i]`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rendered: dict[tuple[tuple[str, str], ...], list[int]] = {}
        prompt_ids = []
        for msgs in prompts:
            key = tuple((m["role"], m["content"]) for m in msgs)
            if key not in rendered:
                rendered[key] = render_prompt(self.tokenizer, msgs)
            prompt_ids.append(rendered[key])
        rendered = [
            render_scored_response(self.tokenizer, msgs, text) for msgs, text in zip(prompts, responses, strict=True)
        ]
        return self._score_rows(prompt_ids, [answer + tail for answer, tail in rendered], normalize)


def scorable_conversations(tokenizer: Any, convs: Sequence[Any], *, skip_bad: bool, source: str) -> list[Any]:
    """The conversations whose final assistant turn the chat template renders for scoring; one it rejects is a
    FILE:LINE error, or skipped and summarised with `skip_bad` (`flywheel.data.render_records`)."""
    from flywheel.data.io import render_records

    def render(conv: Any) -> Any:
        messages = conv.as_dicts()
        return render_scored_response(tokenizer, messages[:-1], messages[-1]["content"])

    return [conv for conv, _ in render_records(convs, render, skip_bad=skip_bad, source=source)]


def reference_answers(
    cfg: RewardConfig, rankings: Sequence[Ranking], tokenizer: Any = None, *, seed: int | None = None
) -> tuple[list[Any], list[str], str]:
    """(prompts, answers, description) whose mean score becomes 0: --reference-data (checked against `tokenizer`'s
    chat template when given), or the top-ranked answers; at most --reference-limit of them, drawn with `seed`
    (default --seed)."""
    if cfg.reference_data:
        from flywheel.data.io import read_conversations

        convs = read_conversations(cfg.reference_data, skip_bad=cfg.skip_bad)
        if tokenizer is not None:
            convs = scorable_conversations(tokenizer, convs, skip_bad=cfg.skip_bad, source=cfg.reference_data)
        prompts = [c.as_dicts()[:-1] for c in convs]
        answers = [c.messages[-1].content for c in convs]
        what = f"final assistant turns of {cfg.reference_data}"
    else:
        prompts, answers = [], []
        for r in rankings:
            for i in r.order[0]:
                prompts.append(r.prompt_dicts())
                answers.append(r.completions[i])
        what = "top-ranked answers of the training rankings"
    if len(answers) > cfg.reference_limit:
        keep = sorted(
            random.Random(cfg.seed if seed is None else seed).sample(range(len(answers)), cfg.reference_limit)
        )
        prompts, answers = [prompts[i] for i in keep], [answers[i] for i in keep]
    return prompts, answers, what


def normalize_rewards(model: Any, mean_raw: float) -> float:
    """Make the model's scores shift by -mean_raw: in the head's bias if it has one, else in the config. Returns the
    offset stored in the config (what `RewardModel.score` subtracts)."""
    head = reward_head(model)
    if head.bias is not None:
        with torch.no_grad():
            head.bias.sub_(mean_raw)
        offset = 0.0
    else:
        offset = mean_raw
    setattr(model.config, OFFSET_KEY, offset)
    return offset


def split_rankings(
    cfg: Any, rankings: list[Ranking], *, seed: int | None = None
) -> tuple[list[Ranking], list[Ranking]]:
    """(train, held-out): --eval-data if given, else an --eval-split of --data drawn with `seed` (default --seed; none
    if it would empty train)."""
    from flywheel.data.io import read_preferences

    if cfg.eval_data:
        return rankings, read_preferences(
            cfg.eval_data, skip_bad=cfg.skip_bad, **cfg.hub_split(cfg.eval_dataset_split)
        )
    return split_heldout(rankings, cfg.eval_split, cfg.seed if seed is None else seed)


def describe(groups: Sequence[RankingGroup]) -> str:
    ks = [g.k for g in groups]
    pairs = sum(len(g.pairs) for g in groups)
    return f"{len(groups)} rankings (K = {min(ks)}..{max(ks)}, {pairs} pairs)"


def train_reward(cfg: RewardConfig) -> Path:
    """Train the reward model (or, with --rm-ensemble N, the N members of an ensemble); returns the run directory."""
    starts = ensemble_starts(cfg)  # before anything is written: a mismatched ensemble --model is one line
    if cfg.normalize and cfg.reference_data and not cfg.skip_bad:  # read after training: find a bad line first
        reference_answers(cfg, [], load_tokenizer(starts[0], cfg.chat_template, **cfg.hub_kwargs(starts[0])))
    reference = likelihood_reference(cfg) if cfg.likelihood_head else None
    run_dir = train_reward_ensemble(cfg, starts) if cfg.rm_ensemble > 1 else train_one_reward(cfg)
    if reference is not None:
        if distributed.is_main():
            fit_likelihood_head(cfg, run_dir / "final", reference)
        distributed.barrier()
    return run_dir


def likelihood_reference(cfg: RewardConfig) -> str:
    """The model whose likelihood the head reads: --model, or, where --model is a reward model saved with a likelihood
    head (a later round's fine-tuning), that head's reference."""
    if Path(cfg.model).is_dir() and has_likelihood_head(cfg.model):
        return str(load_head(cfg.model)[2])
    if Path(cfg.model).is_dir() and ensemble_members(cfg.model) is not None:
        raise UserError(
            f"--likelihood-head: --model {cfg.model} is a reward ensemble without a likelihood head: there is no "
            "language model to read the answers' likelihood from (start from the SFT model)"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model, **cfg.hub_kwargs(cfg.model))
    if is_sequence_classifier(config):
        raise UserError(
            f"--likelihood-head: --model {cfg.model} is a reward model ({config.architectures[0]}), not a language "
            "model: there is no likelihood to read (start from the SFT model)"
        )
    return cfg.model


def likelihood_sample(rankings: list[Ranking], n: int, seed: int) -> list[Ranking]:
    """The training rankings the likelihood head is fitted on: all of them for n = 0 or n >= their number, else n
    drawn with `seed`, in their order."""
    if not n or n >= len(rankings):
        return rankings
    keep = set(random.Random(f"{seed}:likelihood").sample(range(len(rankings)), n))
    return [r for i, r in enumerate(rankings) if i in keep]


def fit_likelihood_head(cfg: RewardConfig, final: Path, reference_src: str) -> None:
    """Fit the likelihood head on the training rankings (the members' split, drawn with --seed; at most
    --likelihood-rankings of them) and save it, with a
    copy of the reference, into `final` (`flywheel.train.likelihood`). The manifest is written last."""
    from flywheel.data.io import read_preferences
    from flywheel.train import likelihood as lk

    scorer = RewardModel.from_pretrained(final, bf16=cfg.bf16, batch_size=cfg.eval_batch_size, likelihood=False)
    tokenizer = scorer.tokenizer
    ref_tokenizer = load_tokenizer(reference_src, **cfg.hub_kwargs(reference_src))
    lk.check_same_tokenizer(ref_tokenizer, tokenizer, "the reward model")
    reference = load_causal_lm(reference_src, **cfg.hub_kwargs(reference_src)).eval()
    rankings, held_out = split_rankings(
        cfg, read_preferences(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split()), seed=cfg.seed
    )
    fit = {"max_length": cfg.max_length, "overlong": cfg.overlong, "skip_bad": cfg.skip_bad}
    rankings = likelihood_sample(rankings, cfg.likelihood_rankings, cfg.seed)
    groups = encode_rankings(tokenizer, rankings, source=cfg.data, **fit)
    eval_groups = encode_rankings(tokenizer, held_out, source=cfg.eval_data or cfg.data, **fit) if held_out else []
    members = getattr(scorer, "members", [scorer])

    def features(gs: list[RankingGroup], what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        log.info("rm: likelihood head: scoring the %s rankings' %d answers", what, sum(g.k for g in gs))
        read = lk.score_groups_with_logprobs(members, reference, gs, batch_size=cfg.eval_batch_size, bf16=cfg.bf16)
        means = [stacked.mean(0) for stacked, _ in read]
        return [lk.answer_features(mean, lps) for mean, (_, lps) in zip(means, read, strict=True)], means

    train_features, _ = features(groups, "training")
    head, train_accuracy = lk.fit_head(train_features, [g.pairs for g in groups], seed=cfg.seed)
    with torch.no_grad():
        top = [
            head(f)[[i for i in range(g.k) if all(lo != i for _, lo in g.pairs)]]
            for f, g in zip(train_features, groups, strict=True)
        ]
    offset = float(torch.cat(top).mean())  # the training rankings' top answers score 0 on average
    info: dict[str, Any] = {"seed": cfg.seed, "fit_rankings": len(groups), "train_accuracy": train_accuracy}
    if eval_groups:
        eval_features, eval_means = features(eval_groups, "held-out")
        pairs = [g.pairs for g in eval_groups]
        with torch.no_grad():
            info["eval_accuracy"] = lk.pair_accuracy([head(f) for f in eval_features], pairs)
        info["eval_accuracy_without"] = lk.pair_accuracy(eval_means, pairs)
        log.info(
            "rm: likelihood head: held-out pairwise accuracy %.1f%% (the reward model alone %.1f%%)",
            100 * info["eval_accuracy"],
            100 * info["eval_accuracy_without"],
        )
    log.info(
        "rm: likelihood head fitted (training pairs %.1f%% right), reference %s", 100 * train_accuracy, reference_src
    )
    ref_dir = final / lk.HEAD_DIR / "reference"
    reference.save_pretrained(ref_dir)
    ref_tokenizer.save_pretrained(ref_dir)
    lk.save_head(final, head, offset, info)


def ensemble_starts(cfg: RewardConfig) -> list[str]:
    """Where each of the --rm-ensemble members starts: --model for every member, or, where --model is itself an
    ensemble directory (the next round's fine-tuning), member i from its member i, which needs as many members."""
    members = ensemble_members(cfg.model) if Path(cfg.model).is_dir() else None
    if members is None:
        return [cfg.model] * cfg.rm_ensemble
    if len(members) != cfg.rm_ensemble:
        raise UserError(
            f"--model {cfg.model} is an ensemble of {len(members)} reward models: fine-tune it with "
            f"--rm-ensemble {len(members)} (each member from its own), got --rm-ensemble {cfg.rm_ensemble}"
        )
    return [str(m) for m in members]


def train_reward_ensemble(cfg: RewardConfig, starts: Sequence[str]) -> Path:
    """--rm-ensemble N: member i is a plain `flywheel rm` run in OUT/member<i>/ with seed --seed + i (head init and
    data order) and the held-out split and references of --seed; `final/` is assembled from their finals at the end.
    With --resume, members with a final model are kept and the ones in progress continue from their checkpoints.
    With --parallel-members P, up to P members train at once (`_train_members_in_processes`).
    starts: where each member starts (`ensemble_starts`)."""
    members = [
        replace(cfg, out=str(Path(cfg.out) / f"member{i}"), seed=cfg.seed + i, rm_ensemble=1, model=starts[i])
        for i in range(cfg.rm_ensemble)
    ]
    if cfg.resume:  # a kept member must have been trained with these settings (the top directory has no checkpoint)
        for member in members:
            if (Path(member.out) / "config.yaml").is_file():
                check_resumed_settings(member, Path(member.out) / "config.yaml")
    run_dir = prepare_run_dir(cfg)
    todo = []
    for i, member in enumerate(members):
        if cfg.resume and (Path(member.out) / "final" / "config.json").is_file():
            log.info("rm: ensemble member %d of %d is trained already (%s)", i + 1, cfg.rm_ensemble, member.out)
        else:
            todo.append(i)
    if cfg.parallel_members > 1 and len(todo) > 1:
        _train_members_in_processes(cfg, members, todo)
    else:
        for i in todo:
            log.info(
                "rm: ensemble member %d of %d (seed %d) in %s", i + 1, cfg.rm_ensemble, members[i].seed, members[i].out
            )
            train_one_reward(members[i], data_seed=cfg.seed, desc=f"rm {i + 1}/{cfg.rm_ensemble}")
    save_run_config(cfg, run_dir)  # each member has its own, written when it started
    finals, info = [], []
    for member in members:
        final = Path(member.out) / "final"
        finals.append(final)
        extra = json.loads((final / "flywheel.json").read_text()) if (final / "flywheel.json").is_file() else {}
        info.append({"seed": member.seed, **{k: v for k, v in extra.items() if k.startswith("eval_")}})
    if distributed.is_main():
        assemble_ensemble(run_dir / "final", finals, {"member_info": info})
        log.info("rm: ensemble of %d reward models in %s", cfg.rm_ensemble, run_dir / "final")
    distributed.barrier()
    return run_dir


def _train_members_in_processes(cfg: RewardConfig, members: Sequence[RewardConfig], todo: Sequence[int]) -> None:
    """Train members `todo` with up to --parallel-members at once, each in a fresh process (spawned: a forked
    OpenMP runtime can hang) with --threads / P threads, its progress bar on its own line. The first member that
    fails stops the others (their checkpoints stay for --resume); its error is raised here: a UserError as the
    member's own one-line message, anything else (a crash, a kill) as the member's exit status."""
    import multiprocessing
    from multiprocessing.connection import wait

    procs = min(cfg.parallel_members, len(todo))
    threads = member_threads(cfg.threads, procs)
    log.info(
        "rm: training ensemble members %s side by side, %d at a time with %d thread%s each",
        ", ".join(str(i + 1) for i in todo),
        procs,
        threads,
        "" if threads == 1 else "s",
    )
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.RLock()  # the members' progress bars draw one at a time
    waiting, running = list(todo), {}
    try:
        while waiting or running:
            while waiting and len(running) < procs:
                i = waiting.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                member = replace(members[i], threads=threads)
                args = (member, cfg.seed, f"rm {i + 1}/{cfg.rm_ensemble}", i, lock, send)
                proc = ctx.Process(target=_member_process, args=args, name=f"rm-member{i}")
                proc.start()
                send.close()
                running[proc.sentinel] = (i, proc, receive)
            for sentinel in wait(list(running)):
                i, proc, receive = running.pop(sentinel)
                proc.join()
                try:
                    message = receive.recv() if proc.exitcode != 0 else None
                except EOFError:  # it stopped without a word: a crash or a kill
                    message = None
                receive.close()
                if proc.exitcode != 0:
                    if message is not None:
                        raise UserError(message)
                    raise RuntimeError(
                        f"reward-model ensemble member {i + 1} stopped with exit status {proc.exitcode}"
                    )
    finally:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            proc.join()


def member_threads(threads: int, procs: int) -> int:
    """Threads of each of `procs` members side by side: their share of `threads` (0: `cpu_threads()`), at least 1."""
    return max(1, (threads or cpu_threads()) // procs)


def _member_process(member: RewardConfig, data_seed: int, desc: str, line: int, lock: Any, send: Any) -> None:
    """One ensemble member in its own process: its bad input goes back to the parent as the one-line message."""
    import sys

    from tqdm.auto import tqdm

    from flywheel.utils import setup_logging

    setup_logging()
    tqdm.set_lock(lock)
    try:
        train_one_reward(member, data_seed=data_seed, desc=desc, bar_position=line)
    except UserError as err:
        send.send(str(err))
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent reports it, once
        sys.exit(130)


def train_one_reward(
    cfg: RewardConfig, *, data_seed: int | None = None, desc: str = "rm", bar_position: int | None = None
) -> Path:
    """One reward model in --out: seeded by --seed, with the held-out split and references drawn with `data_seed`
    (default --seed); `bar_position`: the line of its progress bar when several train at once."""
    from flywheel.data.io import read_preferences

    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template, **cfg.hub_kwargs(cfg.model))
    seed_everything(cfg.seed)  # the new head's init: the same on every rank and in every run with this seed
    model = load_sequence_classifier(cfg.model, **cfg.load_kwargs(cfg.model))
    resize_for_tokenizer(model, tokenizer)
    disable_dropout(model)
    prepare_model(model, cfg)
    rankings, held_out = split_rankings(
        cfg, read_preferences(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split()), seed=data_seed
    )
    fit = {"max_length": cfg.max_length, "overlong": cfg.overlong, "skip_bad": cfg.skip_bad}
    rejected: list[Ranking] = []
    groups = encode_rankings(tokenizer, rankings, source=cfg.data, skipped=rejected, **fit)
    rejected_ids = {id(r) for r in rejected}
    rankings = [r for r in rankings if id(r) not in rejected_ids]  # their answers are no reference either
    eval_source = cfg.eval_data or cfg.data
    eval_groups = encode_rankings(tokenizer, held_out, source=eval_source, **fit) if held_out else []
    log.info("rm: %d params, training on %s, %d held out", count_parameters(model), describe(groups), len(eval_groups))
    pad = tokenizer.pad_token_id
    mask_dtype = attention_mask_dtype(model, cfg.share_prompt)

    def collate(batch: list[RankingGroup]) -> dict[str, Any]:
        return collate_groups(batch, pad, share_prompt=cfg.share_prompt, mask_dtype=mask_dtype)

    def evaluate() -> dict[str, float]:
        return eval_rankings(
            model, eval_groups, pad, share_prompt=cfg.share_prompt, max_answers=cfg.eval_batch_size, margin=cfg.margin
        )

    result = train_loop(
        model,
        cfg,
        run_dir,
        groups,
        collate,
        lambda m, b: rm_loss(m, b, cfg.margin),
        evaluate if eval_groups else None,
        desc=desc,
        lengths=[padded_tokens(g, cfg.share_prompt) for g in groups],
        bar_position=bar_position,
    )
    extra: dict[str, Any] = {"stage": "rm", "steps": result.steps, "max_length": cfg.max_length, **result.eval_metrics}
    if cfg.normalize:
        prompts, answers, what = reference_answers(cfg, rankings, tokenizer, seed=data_seed)
        scorer = RewardModel(
            model,
            tokenizer,
            batch_size=cfg.eval_batch_size,
            bf16=cfg.bf16,
            share_prompt=cfg.share_prompt,
            max_length=cfg.max_length,
        )
        mean_raw = float(result.call(lambda: scorer.score(prompts, answers, normalize=False)).mean())
        offset = normalize_rewards(model, mean_raw)
        log.info(
            "rm: reference answers (%d %s) scored %.4f on average: offset %.4f stored as config.%s",
            len(answers),
            what,
            mean_raw,
            offset,
            OFFSET_KEY,
        )
        extra.update(reference_mean_raw=mean_raw, reference=what, reference_count=len(answers))
    adapter_of = cfg.model if cfg.save_adapter else None
    save_final(model, tokenizer, run_dir / "final", extra=extra, wrapped=result.wrapped, adapter_of=adapter_of)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("rm", RewardConfig, train_reward, argv, __doc__, "reward model")
