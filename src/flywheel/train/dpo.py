"""Direct preference optimisation (Rafailov et al. 2023) on the reward model's data: rankings expanded to pairs.

    flywheel dpo --model runs/sft/final --data rankings.jsonl --out runs/dpo --beta 0.1

Per (winner w, loser l) pair: loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log
pi_ref(y_l))]), where log pi(y) is the sum of the log-probs of the answer's tokens (incl. its end-of-turn token) after
the rendered prompt. A K-way ranking gives all its ranked pairs (ties dropped) and every pair counts the same: the
loss is the mean over pairs. Each answer's log-prob is computed once per step (K sequences per ranking, the prompt
shared as in `flywheel rm`), however many pairs it is in.

Variants (`--loss`, as TRL's `loss_type`): `--label-smoothing eps` is conservative DPO (cDPO: each label is taken to
be wrong with probability eps, so the loss no longer pushes the margin to infinity); `--loss ipo` is IPO (Azar et al.
2023), a squared loss that pulls h towards 1 / (2 beta) instead. log pi(y) is the summed log-prob, as in the IPO
paper (TRL's `ipo` averages it over the answer's tokens).

Reference log-probs are computed once, before training, with `--ref-model` (default: `--model` itself, before any
update) and cached in RUN_DIR/reference_logps.pt, so no reference model is held during training. The cache is keyed
by a sha256 of the reference's weights (not its path: a model retrained in place is recomputed), of the token ids
scored (so the template, tokenizer, --max-length and --overlong) and of the pass's kernels; `--resume` and reruns
with the same key reuse it. The pass runs with the policy's kernels (`prepare_model` first: under bf16 on the CPU the
policy trains with eager attention, and so does the reference pass), so with policy = reference the first loss is
exactly ln 2. Logged like TRL: rewards/chosen and rewards/rejected (beta *
(log pi - log pi_ref) of winners and losers), rewards/margins, rewards/accuracy (winner's implicit reward higher).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flywheel import distributed
from flywheel.data.batching import _has_plain_head, to_device
from flywheel.errors import UserError
from flywheel.models import count_parameters, disable_dropout, load_causal_lm, resize_for_tokenizer
from flywheel.tokenization import CHAT_TEMPLATE_HELP, load_tokenizer
from flywheel.train.loop import autocast, prepare_model, prepare_run_dir, save_final, train_loop
from flywheel.train.reward import (
    PreferenceConfig,
    RankingGroup,
    attention_mask_dtype,
    backbone_hidden,
    collate_groups,
    describe,
    encode_rankings,
    make_batches,
    padded_tokens,
    split_rankings,
)
from flywheel.utils import log

CACHE_FILE = "reference_logps.pt"
LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(PreferenceConfig):
    model: str = field(default="", metadata={"help": "policy to optimise (usually the SFT model)"})
    ref_model: str = field(default="", metadata={"help": "reference policy (default: --model before training)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL penalty (higher = stay closer)"})
    chat_template: str = field(default="", metadata={"help": CHAT_TEMPLATE_HELP})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    loss: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid: DPO, -log sigmoid(beta h); ipo: IPO (Azar et al. 2023), (h - 1/(2 beta))^2, where h is "
            "the winner's minus the loser's log-ratio to the reference"
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "conservative DPO (sigmoid loss only): the probability eps in [0, 0.5) that a pair's label is "
            "flipped; the loss becomes -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)"
        },
    )

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required (the policy to optimise, e.g. the SFT model)")
        if self.beta <= 0:
            raise UserError("--beta must be > 0")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("--label-smoothing must be in [0, 0.5) (0.5 would make every label a coin flip)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError("--label-smoothing is for --loss sigmoid (conservative DPO)")
        super().validate()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards, all (P,): (loss, beta * chosen log-ratio, beta * rejected log-ratio).

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
      sigmoid (DPO; cDPO with label_smoothing eps): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo (IPO): (h - 1 / (2 beta))^2, a squared loss that stops pushing once h reaches its target 1 / (2 beta)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    if loss == "sigmoid":
        z = chosen - rejected  # beta * h
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} ({', '.join(LOSSES)})")
    return losses, chosen.detach(), rejected.detach()


def sequence_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(N,) float32 sum of log p(token | prefix) over each answer's tokens (`collate_groups` says where they are)."""
    if _has_plain_head(model):  # project only the positions that predict answer tokens through the LM head
        hidden = backbone_hidden(model, batch)[batch["pred_index"]]  # (M, H)
        logits = model.get_output_embeddings()(hidden)  # (M, V)
    else:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits  # (R, T, V)
        logits = logits.reshape(-1, logits.shape[-1])[batch["pred_index"]]
    token_logps = -F.cross_entropy(logits.float(), batch["target_ids"], reduction="none")  # (M,)
    out = torch.zeros(batch["n_answers"], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, batch["target_seq"], token_logps)


@dataclass
class DPOGroup:
    group: RankingGroup
    ref_logps: list[float]  # (K,) reference log-prob of each answer

    @property
    def k(self) -> int:
        return self.group.k


def collate_dpo(
    samples: Sequence[DPOGroup], pad_id: int, *, share_prompt: bool, mask_dtype: torch.dtype
) -> dict[str, Any]:
    batch = collate_groups([s.group for s in samples], pad_id, share_prompt=share_prompt, mask_dtype=mask_dtype)
    batch["ref_logps"] = torch.tensor([x for s in samples for x in s.ref_logps])  # (N,)
    batch["weight"] = int(batch["winners"].numel())  # the loss is a mean over pairs
    return batch


def dpo_batch_loss(model: Any, batch: dict[str, Any], cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the batch's pairs, and summed implicit-reward metrics (the loop averages over pairs)."""
    logps = sequence_logps(model, batch)  # (N,)
    ref = batch["ref_logps"].to(logps.device)
    w, lo = batch["winners"], batch["losers"]
    losses, chosen, rejected = dpo_loss(
        logps[w], logps[lo], ref[w], ref[lo], cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing
    )
    return losses.sum(), {
        "rewards/chosen": float(chosen.sum()),
        "rewards/rejected": float(rejected.sum()),
        "rewards/margins": float((chosen - rejected).sum()),
        "rewards/accuracy": float((chosen > rejected).float().sum()),
    }


@torch.no_grad()
def compute_logps(
    model: Any,
    groups: Sequence[RankingGroup],
    pad_id: int,
    *,
    share_prompt: bool,
    max_answers: int,
    bf16: bool,
    bar: tqdm | None = None,
) -> list[list[float]]:
    """Each group's answers' summed log-probs under `model` (eval mode, no grad), in the order of `groups`; `bar`
    counts the answers done."""
    was_training = model.training
    model.eval()
    mask_dtype = attention_mask_dtype(model, share_prompt)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for chunk in make_batches(groups, max_answers):
        batch = to_device(collate_groups(chunk, pad_id, share_prompt=share_prompt, mask_dtype=mask_dtype), device)
        with autocast(bf16):
            logps = sequence_logps(model, batch).cpu()
        out += [t.tolist() for t in logps.split([g.k for g in chunk])]
        if bar is not None:
            bar.update(sum(g.k for g in chunk))
    model.train(was_training)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the model's state dict (name, dtype, shape and bytes): the same digest means the
    same function, whatever path the weights were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def reference_key(cfg: DPOConfig, ref: Any, groups: Sequence[RankingGroup], *, weights: str | None = None) -> str:
    """What the reference log-probs of `groups` are a function of: the reference's weights (`weights`, its digest
    when given, else computed here), the kernels and precision of the pass (attention implementation, bf16, shared
    prompts, device type, torch version) and the exact token ids scored, which already reflect the chat template,
    the tokenizer, --max-length and --overlong."""
    kernels = (
        getattr(ref.config, "_attn_implementation", None),
        cfg.bf16,
        cfg.share_prompt,
        distributed.device().type,
        torch.__version__,
    )
    h = hashlib.sha256(repr((weights or weights_digest(ref), kernels)).encode())
    for g in groups:
        h.update(repr((g.prompt_ids, g.responses)).encode())
    return h.hexdigest()


def load_reference(cfg: DPOConfig, policy: Any, tokenizer: Any) -> Any:
    """--ref-model, ready to score like the policy: same vocabulary size, no dropout, the policy's attention kernel."""
    ref = load_causal_lm(cfg.ref_model, **cfg.load_kwargs(cfg.ref_model))
    resize_for_tokenizer(ref, tokenizer)
    disable_dropout(ref)
    impl = getattr(policy.config, "_attn_implementation", None)
    if impl and hasattr(ref, "set_attn_implementation"):
        ref.set_attn_implementation(impl)
    return ref


def reference_logps(
    cfg: DPOConfig,
    run_dir: Path,
    policy: Any,
    tokenizer: Any,
    splits: dict[str, list[RankingGroup]],
    *,
    policy_weights: str | None = None,
) -> dict[str, list[list[float]]]:
    """Reference log-probs of every split's answers: from the cache when its key matches, else one pass, then cached.

    `policy` is ready to train (`prepare_model` applied), so the pass runs with its kernels; without --ref-model the
    reference is the policy itself, whose weights before `prepare_model` have the digest `policy_weights`. A
    --ref-model is loaded even when the cache is used: the key needs its weights."""
    path = run_dir / CACHE_FILE
    ref = load_reference(cfg, policy, tokenizer) if cfg.ref_model else policy
    weights = weights_digest(ref) if cfg.ref_model else policy_weights or weights_digest(policy)
    keys = {name: reference_key(cfg, ref, groups, weights=weights) for name, groups in splits.items()}
    distributed.barrier()  # every rank decides on the cache before rank 0 (re)writes it
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 (a file cut short by a kill: computed again, as a changed key is)
            log.warning("dpo: %s is unreadable (%s): recomputing", path, str(err).splitlines()[0])
            cached = {}
        if cached.get("keys") == keys:
            log.info("dpo: reference log-probs from %s", path)
            return cached["logps"]
        if cached:
            log.warning("dpo: %s was computed for other data, weights or kernels: recomputing", path)
    ref.to(distributed.device())  # the pass runs where training will (the policy goes there anyway)
    n = sum(g.k for groups in splits.values() for g in groups)
    log.info("dpo: computing reference log-probs of %d answers (once)", n)
    show = cfg.progress and distributed.is_main()
    with tqdm(total=n, desc="reference log-probs", unit="answer", disable=not show, dynamic_ncols=True) as bar:
        logps = {
            name: compute_logps(
                ref,
                groups,
                tokenizer.pad_token_id,
                share_prompt=cfg.share_prompt,
                max_answers=cfg.eval_batch_size,
                bf16=cfg.bf16,
                bar=bar,
            )
            for name, groups in splits.items()
        }
    del ref
    if distributed.is_main():  # written beside it and renamed: a kill mid-write leaves the old file or none
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"keys": keys, "logps": logps}, tmp)
        os.replace(tmp, path)
    distributed.barrier()
    return logps


@torch.no_grad()
def eval_dpo(
    model: Any, samples: Sequence[DPOGroup], pad_id: int, cfg: DPOConfig, *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Held-out DPO loss and implicit-reward metrics, means over pairs. Batches go to `device` (default: where the
    model's weights are)."""
    device = next(model.parameters()).device if device is None else device
    mask_dtype = attention_mask_dtype(model, cfg.share_prompt)
    totals: dict[str, float] = {}
    loss = pairs = 0.0
    for chunk in make_batches(samples, cfg.eval_batch_size):
        batch = to_device(collate_dpo(chunk, pad_id, share_prompt=cfg.share_prompt, mask_dtype=mask_dtype), device)
        batch_loss, metrics = dpo_batch_loss(model, batch, cfg)
        loss += float(batch_loss)
        pairs += batch["weight"]
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
    return {"eval_loss": loss / pairs, **{f"eval_{k}": v / pairs for k, v in totals.items()}}


def train_dpo(cfg: DPOConfig) -> Path:
    from flywheel.data.io import read_preferences

    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template, **cfg.hub_kwargs(cfg.model))
    model = load_causal_lm(cfg.model, **cfg.load_kwargs(cfg.model))
    resize_for_tokenizer(model, tokenizer)
    disable_dropout(model)
    rankings, held_out = split_rankings(cfg, read_preferences(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split()))
    splits = {
        "train": encode_rankings(
            tokenizer,
            rankings,
            max_length=cfg.max_length,
            overlong=cfg.overlong,
            source=cfg.data,
            skip_bad=cfg.skip_bad,
        )
    }
    if held_out:
        splits["eval"] = encode_rankings(
            tokenizer,
            held_out,
            max_length=cfg.max_length,
            overlong=cfg.overlong,
            source=cfg.eval_data or cfg.data,
            skip_bad=cfg.skip_bad,
        )
    log.info(
        "dpo: %d params, training on %s, %d held out, %s loss, beta %g",
        count_parameters(model),
        describe(splits["train"]),
        len(splits.get("eval", [])),
        cfg.loss,
        cfg.beta,
    )
    pad = tokenizer.pad_token_id
    base = None if cfg.ref_model else weights_digest(model)  # the reference's weights: the policy's, before LoRA
    # Before the reference pass, so that it runs with the kernels the policy trains with (under bf16 on the CPU,
    # eager attention rather than SDPA): at the first step policy == reference exactly and the loss is ln 2. With
    # LoRA the adapters start at zero, so the reference is still the policy's initial weights.
    prepare_model(model, cfg)
    ref = reference_logps(cfg, run_dir, model, tokenizer, splits, policy_weights=base)
    samples = {
        name: [DPOGroup(g, r) for g, r in zip(groups, ref[name], strict=True)] for name, groups in splits.items()
    }
    mask_dtype = attention_mask_dtype(model, cfg.share_prompt)

    def collate(batch: list[DPOGroup]) -> dict[str, Any]:
        return collate_dpo(batch, pad, share_prompt=cfg.share_prompt, mask_dtype=mask_dtype)

    def evaluate() -> dict[str, float]:
        return eval_dpo(model, samples["eval"], pad, cfg)

    result = train_loop(
        model,
        cfg,
        run_dir,
        samples["train"],
        collate,
        lambda m, b: dpo_batch_loss(m, b, cfg),
        evaluate if "eval" in samples else None,
        desc="dpo",
        lengths=[padded_tokens(s.group, cfg.share_prompt) for s in samples["train"]],
    )
    save_final(
        model,
        tokenizer,
        run_dir / "final",
        extra={"stage": "dpo", "steps": result.steps, "beta": cfg.beta, "loss": cfg.loss, **result.eval_metrics},
        wrapped=result.wrapped,
        adapter_of=cfg.model if cfg.save_adapter else None,
    )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("dpo", DPOConfig, train_dpo, argv, __doc__, "policy")
