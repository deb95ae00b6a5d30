"""DPO: the loss, answer log-probs from the shared-prompt batch, and `flywheel dpo` end to end (ln 2 at the start)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from tests.test_reward import preference_rows, write_jsonl

from flywheel.cli import main
from flywheel.data.formats import Message, Ranking
from flywheel.models import load_causal_lm
from flywheel.tokenization import load_tokenizer
from flywheel.train import dpo
from flywheel.train.dpo import dpo_loss, sequence_logps
from flywheel.train.reward import collate_groups, encode_rankings


def test_dpo_loss_is_ln2_when_policy_equals_reference_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)
    losses, rc, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.3)
    assert torch.allclose(losses, torch.full((6,), math.log(2)), atol=1e-7)
    assert torch.equal(rc, torch.zeros(6)) and torch.equal(rr, torch.zeros(6))
    # -log sigmoid(beta * ((pc - rc) - (pr - rr))), by hand for one pair
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-3.0, -5.0, -4.0, -4.5))
    loss, rc, rr = dpo_loss(pc, pr, rc, rr, 0.5)
    z = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert abs(float(loss) - math.log(1 + math.exp(-z))) < 1e-6
    assert abs(float(rc) - 0.5) < 1e-7 and abs(float(rr) + 0.25) < 1e-7


def test_answer_logps_equal_a_plain_forward_per_sequence(tokenizer, tiny_model):
    rankings = [
        Ranking([Message("user", r["prompt"])], r["completions"], r["order"]) for r in preference_rows(3, seed=4)
    ]
    groups = encode_rankings(tokenizer, rankings, max_length=256)
    expected = []
    with torch.no_grad():
        for g in groups:
            for r in g.responses:
                ids = torch.tensor([g.prompt_ids + r])
                logp = F.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].float(), -1)
                targets = ids[0, 1:]
                expected.append(float(logp[torch.arange(len(targets)), targets][-len(r) :].sum()))
        for share in (True, False):
            got = sequence_logps(tiny_model, collate_groups(groups, tokenizer.pad_token_id, share_prompt=share))
            torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-6)


def test_eval_dpo_moves_batches_to_the_model_or_the_given_device(tokenizer, tiny_model, monkeypatch):
    """Held-out DPO batches are built on the CPU and must reach the model's device; `meta` plays the second device
    and the stubbed loss records where each batch arrived."""
    rankings = [
        Ranking([Message("user", r["prompt"])], r["completions"], r["order"]) for r in preference_rows(5, seed=4)
    ]
    samples = [dpo.DPOGroup(g, [0.0] * g.k) for g in encode_rankings(tokenizer, rankings, max_length=256)]
    cfg = dpo.DPOConfig(eval_batch_size=4)
    real = dpo.eval_dpo(tiny_model, samples, tokenizer.pad_token_id, cfg)
    assert math.isfinite(real["eval_loss"])
    seen: list[set[str]] = []

    def loss_where(model, batch, beta):
        seen.append({str(v.device) for v in batch.values() if isinstance(v, torch.Tensor)})
        return torch.tensor(0.0), {}

    monkeypatch.setattr(dpo, "dpo_batch_loss", loss_where)
    dpo.eval_dpo(tiny_model, samples, tokenizer.pad_token_id, cfg, device="meta")
    assert seen and all(s == {"meta"} for s in seen)
    n = len(seen)
    dpo.eval_dpo(tiny_model.to("meta"), samples, tokenizer.pad_token_id, cfg)  # default: where the weights are
    assert len(seen) == 2 * n and all(s == {"meta"} for s in seen)


@pytest.fixture
def prefs(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(48, seed=5, k_max=3))


def test_dpo_starts_at_ln2_caches_reference_logps_and_learns(tmp_path, model_dir, prefs, monkeypatch):
    out = tmp_path / "dpo"
    args = [
        "dpo",
        "--model",
        str(model_dir),
        "--ref-model",
        str(model_dir),
        "--data",
        prefs,
        "--out",
        str(out),
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--beta",
        "0.2",
        "--log-every",
        "1",
        "--eval-split",
        "0.1",
        "--progress",
        "false",
    ]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], [m for m in metrics if "loss" in m][-1]
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-6  # policy == reference at step 1
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracy"] == 0.0
    assert last["loss"] < first["loss"] - 0.05 and last["rewards/margins"] > 0 and last["rewards/accuracy"] > 0.6
    assert {"eval_loss", "eval_rewards/accuracy", "eval_rewards/margins"} <= set(metrics[-1])
    assert (out / "reference_logps.pt").is_file()
    tok, policy = load_tokenizer(str(out / "final")), load_causal_lm(str(out / "final"))
    assert tok.pad_token_id != tok.eos_token_id and policy.config.vocab_size == len(tok)
    # a rerun in the same directory reuses the cached reference log-probs (no reference pass)
    calls = []
    monkeypatch.setattr(dpo, "compute_logps", lambda *a, **k: calls.append(1) or [])
    assert main(args) == 0 and calls == []
    # ... unless the data changed
    write_jsonl(tmp_path / "prefs.jsonl", preference_rows(48, seed=6, k_max=3))
    with pytest.raises(ValueError):  # the stub returns no log-probs: proof that a reference pass was asked for
        main(args)
    assert calls == [1, 1]


def test_the_reference_pass_shows_its_progress(tmp_path, model_dir, prefs, capsys):
    """The reference log-probs are the longest silent step on a large dataset: a bar counts its answers."""
    args = ["dpo", "--model", str(model_dir), "--data", prefs, "--out", str(tmp_path / "dpo"), "--max-steps", "1"]
    assert main([*args, "--eval-split", "0", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    n = sum(len(json.loads(line)["completions"]) for line in open(prefs))
    assert "reference log-probs: 100%" in err and f"{n}/{n}" in err, err


def test_dpo_bad_flags_are_user_errors(tmp_path, model_dir, prefs, capsys):
    assert main(["dpo", "--model", str(model_dir), "--data", prefs, "--out", str(tmp_path / "o"), "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err


def _dpo_args(model_dir, prefs, out, *extra):
    return [
        "dpo",
        "--model",
        str(model_dir),
        "--data",
        prefs,
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--log-every",
        "1",
        "--eval-split",
        "0",
        "--progress",
        "false",
        *extra,
    ]


def _first_loss(out) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_reference_cache_follows_the_weights_not_the_path(tmp_path, model_dir, prefs):
    """A model retrained in place must not reuse the reference log-probs of its previous weights: the rerun into the
    same --out starts at ln 2 again (it was 0.8158 with a cache keyed by the path)."""
    out = tmp_path / "dpo"
    assert main(_dpo_args(model_dir, prefs, out)) == 0
    assert abs(_first_loss(out) - math.log(2)) < 1e-6
    # "retrain" the model at the same path: the DPO result itself replaces it
    for f in (out / "final").iterdir():
        shutil.copy(f, model_dir / f.name)
    assert main(_dpo_args(model_dir, prefs, out)) == 0
    assert abs(_first_loss(out) - math.log(2)) < 1e-6


def test_reference_cache_key_covers_weights_data_and_lengths(tokenizer, tiny_model):
    rankings = [
        Ranking([Message("user", r["prompt"])], r["completions"], r["order"]) for r in preference_rows(6, seed=4)
    ]
    cfg = dpo.DPOConfig(model="m", data="d")
    groups = encode_rankings(tokenizer, rankings, max_length=256)
    key = dpo.reference_key(cfg, tiny_model, groups)
    assert dpo.reference_key(cfg, tiny_model, groups) == key  # deterministic
    assert dpo.reference_key(dpo.DPOConfig(model="elsewhere", data="d"), tiny_model, groups) == key  # not the path
    short = encode_rankings(tokenizer, rankings, max_length=24, overlong="truncate")
    assert dpo.reference_key(cfg, tiny_model, short) != key  # what is scored changed
    assert dpo.reference_key(cfg, tiny_model, groups[1:]) != key
    assert dpo.reference_key(dpo.DPOConfig(model="m", data="d", bf16=True), tiny_model, groups) != key
    with torch.no_grad():
        next(tiny_model.parameters())[0, 0] += 1e-3  # the smallest change of the weights
    assert dpo.reference_key(cfg, tiny_model, groups) != key


@pytest.mark.parametrize("bf16", [False, True])
def test_reference_pass_uses_the_policy_kernels_and_step_one_is_ln2(tmp_path, model_dir, prefs, monkeypatch, bf16):
    """The reference log-probs are computed by the attention kernel the policy trains with (under bf16 on the CPU
    that is eager, not SDPA), so at the first step policy == reference exactly and the loss is ln 2."""
    seen: dict[str, list[str]] = {"reference": [], "policy": []}
    compute, seq = dpo.compute_logps, dpo.sequence_logps

    def spy_compute(model, *a, **k):
        seen["reference"].append(model.config._attn_implementation)
        return compute(model, *a, **k)

    def spy_seq(model, batch):
        if model.training:
            seen["policy"].append(model.config._attn_implementation)
        return seq(model, batch)

    monkeypatch.setattr(dpo, "compute_logps", spy_compute)
    monkeypatch.setattr(dpo, "sequence_logps", spy_seq)
    out = tmp_path / "dpo"
    extra = ["--bf16", "true"] if bf16 else []
    for ref in ([], ["--ref-model", str(model_dir)]):
        seen["reference"].clear(), seen["policy"].clear()
        assert main(_dpo_args(model_dir, prefs, out, "--max-steps", "1", *extra, *ref)) == 0
        assert seen["reference"] and seen["policy"]
        assert set(seen["reference"]) == set(seen["policy"]), seen
        assert abs(_first_loss(out) - math.log(2)) < 1e-6, _first_loss(out)
        (out / "reference_logps.pt").unlink()


def _brute_force_loss(pc, pr, rc, rr, beta, loss, eps):
    """One pair in float64 from the papers: DPO/cDPO (Rafailov et al. 2023; Mitchell 2023), IPO (Azar et al. 2023)."""
    h = (pc - rc) - (pr - rr)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    return -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0)])
def test_dpo_variants_match_a_float64_brute_force(loss, eps):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(4))
    for beta in (0.05, 0.5, 2.0):
        got, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss=loss, label_smoothing=eps)
        want = [_brute_force_loss(*map(float, x), beta, loss, eps) for x in zip(pc, pr, rc, rr, strict=True)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chosen - rejected, beta * ((pc - rc) - (pr - rr)), rtol=1e-12, atol=1e-12)


def test_dpo_variants_match_trl_formulas():
    """TRL's DPOTrainer.dpo_loss arranges the same quantities as logits = (pi_w - pi_l) - (ref_w - ref_l): sigmoid
    -logsigmoid(beta logits)(1 - ls) - logsigmoid(-beta logits) ls, ipo (logits - 1/(2 beta))^2. Written out here,
    on the same summed log-probs."""
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-30 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    beta, ls = 0.1, 0.2
    logits = (pc - pr) - (rc - rr)
    trl_sigmoid = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    trl_ipo = (logits - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, label_smoothing=ls)[0], trl_sigmoid)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, loss="ipo")[0], trl_ipo)


def test_dpo_variants_minimise_where_their_papers_say():
    """IPO's loss is smallest at h = 1/(2 beta); cDPO's at beta h = log((1 - eps) / eps); plain DPO never stops
    (its gradient stays negative); all three are ln 2 (DPO, cDPO) or 1/(4 beta^2) (IPO) when policy == reference."""
    beta, eps = 0.25, 0.1
    h = torch.linspace(-10, 30, 4001, dtype=torch.float64)
    zero = torch.zeros_like(h)
    ipo = dpo_loss(h, zero, zero, zero, beta, loss="ipo")[0]
    cdpo = dpo_loss(h, zero, zero, zero, beta, label_smoothing=eps)[0]
    assert abs(float(h[ipo.argmin()]) - 1 / (2 * beta)) < 0.01
    assert abs(float(h[cdpo.argmin()]) - math.log((1 - eps) / eps) / beta) < 0.01
    plain = dpo_loss(h.requires_grad_(), zero, zero, zero, beta)[0]
    (grad,) = torch.autograd.grad(plain.sum(), h)
    assert torch.all(grad < 0)
    same = torch.full((3,), -4.0, dtype=torch.float64)
    for loss, eps_, start in (("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.3, math.log(2)), ("ipo", 0.0, 4.0)):
        got = dpo_loss(same, same - 1, same, same - 1, beta, loss=loss, label_smoothing=eps_)[0]
        torch.testing.assert_close(got, torch.full((3,), start, dtype=torch.float64))


@pytest.mark.parametrize("variant", [["--loss", "ipo"], ["--label-smoothing", "0.2"]])
def test_dpo_cli_variants_start_where_expected_and_learn(tmp_path, model_dir, prefs, variant):
    out = tmp_path / "dpo"
    args = _dpo_args(model_dir, prefs, out, "--max-steps", "10", "--beta", "0.5", *variant)
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    start = 1.0 if variant[0] == "--loss" else math.log(2)  # IPO: (0 - 1/(2 * 0.5))^2
    assert abs(rows[0]["loss"] - start) < 1e-6
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    saved = json.loads((out / "final" / "flywheel.json").read_text())
    assert saved["loss"] == ("ipo" if variant[0] == "--loss" else "sigmoid")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--loss", "hinge"], "--loss must be one of sigmoid, ipo"),
        (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
        (["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing is for --loss sigmoid"),
    ],
)
def test_dpo_variant_flags_are_checked(tmp_path, model_dir, prefs, capsys, flags, message):
    assert main(["dpo", "--model", str(model_dir), "--data", prefs, "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
