"""The shared loop: accumulation invariance, schedule, every parameter learns, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flywheel.data.batching import collate_lm, lm_loss, pack, pack_masked
from flywheel.models import build_causal_lm, config_for_tokenizer
from flywheel.train.loop import DataOrder, TrainConfig, lr_lambda, train_loop


def _samples(tokenizer, n=16):
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        prompt = tokenizer(f"What is {a} + {b}? ")["input_ids"]
        answer = tokenizer(f"It is {a + b}.")["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": prompt + answer, "loss_mask": [0] * len(prompt) + [1] * len(answer)})
    return out


def _train(tmp_path, tokenizer, name, **kw):
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=128), seed=0)
    cfg = TrainConfig(out=str(tmp_path / name), progress=False, lr=1e-3, warmup_ratio=0.0, **kw)
    pad = tokenizer.pad_token_id
    res = train_loop(model, cfg, Path(cfg.out), _samples(tokenizer), lambda b: collate_lm(b, pad), lm_loss)
    return model, res


def test_grad_accumulation_invariance(tmp_path, tokenizer):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 (padding differs, the per-token mean does not)."""
    big, _ = _train(tmp_path, tokenizer, "a", batch_size=8, grad_accum=1, max_steps=3)
    small, _ = _train(tmp_path, tokenizer, "b", batch_size=2, grad_accum=4, max_steps=3)
    for (name, p), q in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)  # Adam amplifies ~1e-8 grad noise


def test_training_changes_every_parameter_and_lowers_the_loss(tmp_path, tokenizer):
    before = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=128), seed=0)
    model, res = _train(tmp_path, tokenizer, "c", batch_size=8, max_steps=30, log_every=1)
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        assert not torch.equal(p, q), f"{name} did not change"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < 0.75 * losses[0]
    assert res.steps == 30


def test_a_diverged_loss_is_a_one_line_error_at_its_step(tmp_path, tokenizer):
    """A NaN loss would leave NaN weights to save as a model: the loop stops at that step with a UserError."""
    from flywheel.errors import UserError

    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=128), seed=0)
    cfg = TrainConfig(out=str(tmp_path / "nan"), progress=False, lr=1e-3, batch_size=4, max_steps=5)
    calls = []

    def nan_at_step_3(m, batch):
        loss, more = lm_loss(m, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), more

    pad = tokenizer.pad_token_id
    with pytest.raises(UserError, match="training diverged at step 3: loss is nan"):
        train_loop(model, cfg, Path(cfg.out), _samples(tokenizer), lambda b: collate_lm(b, pad), nan_at_step_3)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    vals = [lr_lambda(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[10:], vals[11:], strict=False))
    assert vals[-1] == pytest.approx(0.1, abs=1e-3)


def test_data_order_is_a_function_of_seed_and_position():
    a, b = DataOrder(10, seed=3), DataOrder(10, seed=3)
    assert a.indices(5, 20) == b.indices(5, 20)
    first_epoch = a.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert a.indices(10, 10) != first_epoch  # each epoch is reshuffled
    assert DataOrder(10, seed=4).indices(0, 10) != first_epoch


def test_length_grouped_order_pads_less_and_stays_a_function_of_seed_and_position():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]  # 1000 is not a multiple of the step: epochs straddle steps
    group, steps = 8, 3 * 1000 // 8

    def waste(order: DataOrder) -> float:
        batches = [[lengths[i] for i in order.indices(s * group, group)] for s in range(steps)]
        return 1 - sum(map(sum, batches)) / sum(group * max(b) for b in batches)

    grouped, again = DataOrder(1000, 3, lengths, group=group), DataOrder(1000, 3, lengths, group=group)
    assert grouped.indices(0, 3000) == again.indices(0, 3000)
    for epoch in range(3):  # still a permutation of the samples per epoch, and reshuffled every epoch
        assert sorted(grouped.indices(epoch * 1000, 1000)) == list(range(1000))
    assert grouped.indices(0, 1000) != grouped.indices(1000, 1000)
    assert DataOrder(1000, 4, lengths, group=group).indices(0, 1000) != grouped.indices(0, 1000)
    random_order = DataOrder(1000, 3)
    assert waste(random_order) > 0.3 and waste(grouped) < 0.1
    # steps are not sorted over the epoch: long and short steps alternate
    firsts = [lengths[grouped.indices(s * group, 1)[0]] for s in range(100)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # equal lengths (packed pretraining blocks): exactly the ungrouped order
    assert DataOrder(1000, 3, [256] * 1000, group=group).indices(0, 3000) == random_order.indices(0, 3000)


def test_packing():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, sep_id=0)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    masked = pack_masked(
        [
            {"input_ids": [1, 2], "loss_mask": [0, 1]},
            {"input_ids": [3, 4, 5], "loss_mask": [0, 1, 1]},
            {"input_ids": [6], "loss_mask": [1]},
        ],
        seq_len=4,
    )
    assert [b["input_ids"] for b in masked] == [[1, 2], [3, 4, 5, 6]]
    assert [b["loss_mask"] for b in masked] == [[0, 1], [0, 1, 1, 1]]


def test_collate_counts_only_masked_targets():
    batch = collate_lm(
        [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["target_mask"].tolist() == [[True, True], [True, False]]
    assert batch["weight"] == 3 and batch["tokens"] == 5


def test_eval_lm_loss_moves_batches_to_the_model_or_the_given_device(tokenizer, tiny_model, monkeypatch):
    """The held-out loss builds batches on the CPU: they must reach the model's device (a GPU in real runs). `meta`
    plays the second device here; the stubbed loss records where each batch arrived."""
    from flywheel.data import batching

    samples, pad = _samples(tokenizer, n=5), tokenizer.pad_token_id
    real = batching.eval_lm_loss(tiny_model, samples, pad, batch_size=2)
    seen: list[set[str]] = []

    def loss_where(model, batch):
        seen.append({str(v.device) for v in batch.values() if isinstance(v, torch.Tensor)})
        return torch.tensor(float(batch["weight"])), {}

    monkeypatch.setattr(batching, "lm_loss", loss_where)
    assert batching.eval_lm_loss(tiny_model, samples, pad, batch_size=2, device="meta") == 1.0
    assert seen == [{"meta"}] * 3
    seen.clear()
    batching.eval_lm_loss(tiny_model.to("meta"), samples, pad, batch_size=2)  # default: where the weights are
    assert seen == [{"meta"}] * 3
    assert real > 0 and real == real  # the unstubbed loss on the CPU is a number


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    from tests.conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{doc} ({i})" for i in range(40) for doc in CORPUS))
    steps = 16
    base = [
        sys.executable,
        "-m",
        "flywheel",
        "pretrain",
        "--data",
        str(corpus),
        "--size",
        "nano",
        "--vocab-size",
        "300",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--save-every",
        "1",
        "--progress",
        "false",
        "--log-every",
        "1",
        "--seed",
        "7",
        "--threads",
        "1",
        "--bf16",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(base + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        base + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_after = random.Random(1729).randint(2, steps - 3)  # any step must resume exactly: a seeded draw of one
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / f"step-{kill_after}").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it was killed"
    resumed = subprocess.run(base + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    full, again = _final_weights(tmp_path / "full"), _final_weights(killed)
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k

    def rows(run):  # the metrics log of the resumed run has no lines duplicated by the killed one
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in lines]

    assert rows(killed) == rows(tmp_path / "full")


def test_split_heldout_is_seeded_disjoint_and_keeps_order():
    from flywheel.data.batching import split_heldout

    items = [f"doc{i}" for i in range(40)]
    train, held = split_heldout(items, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert sorted(train + held) == sorted(items) and not set(train) & set(held)
    assert train == [x for x in items if x in train] and held == [x for x in items if x in held]  # items' order
    assert split_heldout(items, 0.1, seed=3) == (train, held)
    assert split_heldout(items, 0.1, seed=4)[1] != held
    assert split_heldout(items, 0.001, seed=0)[1] != []  # at least one held out
    assert split_heldout(items, 0.0, seed=0) == (items, [])
    assert split_heldout(items[:1], 0.5, seed=0) == (items[:1], [])


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog):
    from flywheel import utils
    from flywheel.train.loop import autocast

    assert isinstance(utils.bf16_is_fast("cpu"), bool)
    monkeypatch.setattr(utils, "bf16_is_fast", lambda device_type="cpu": False)
    utils.warn_if_slow_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="flywheel"):
        for _ in range(3):
            with autocast(True):
                pass
        with autocast(False):
            pass
    utils.warn_if_slow_bf16.cache_clear()
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == 1 and "drop --bf16" in warned[0].getMessage()


def test_a_write_cut_short_by_a_kill_leaves_no_temporary_files_behind(tmp_path):
    """A kill inside a checkpoint's or final/'s atomic write leaves its temporary directory; the next run into that
    --out removes it (it held half-written weights nobody reads)."""
    from flywheel.train.loop import prepare_run_dir

    run = tmp_path / "run"
    for tmp in (run / ".final.abc.tmp", run / "checkpoints" / ".step-2.def.tmp"):
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
    (run / ".config.yaml.xyz.tmp").write_text("half")
    prepare_run_dir(TrainConfig(out=str(run), progress=False))
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints"]  # config.yaml: when training starts
