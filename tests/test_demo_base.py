"""The shipped toy-world base models: present, loadable, and made by the command their docs name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel.demo import config
from flywheel.demo.base import BASE_SEED, FINGERPRINT_STEPS, base_config, shipped_base
from flywheel.demo.config import SHIPPED_BASES, DemoConfig, demo_command, describe_model
from flywheel.errors import UserError
from flywheel.models import TINY_SIZES, load_causal_lm
from flywheel.tokenization import load_tokenizer


@pytest.mark.parametrize("name", list(SHIPPED_BASES))
def test_a_shipped_base_is_a_model_of_its_size_with_its_tokenizer_and_fingerprint(name):
    base = shipped_base(name)
    model, tok = load_causal_lm(str(base)), load_tokenizer(str(base))
    for key, value in TINY_SIZES[SHIPPED_BASES[name].size].items():
        assert getattr(model.config, key) == value
    assert model.config.vocab_size == len(tok)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    meta = json.loads((base / "flywheel.json").read_text())
    assert meta["stage"] == "pretrain" and len(meta["fingerprint"]) == FINGERPRINT_STEPS
    assert meta["command"] == "python -m flywheel.demo.base --out DIR" + (
        f" --base {name}" if name != "shipped" else ""
    )
    # It was trained: the loss fell well below a fresh model's (ln 2048 = 7.6 nats, ln 4096 = 8.3).
    assert meta["eval_loss"] < 1.5


def test_a_missing_shipped_base_is_a_user_error_that_says_how_to_get_it(tmp_path, monkeypatch):
    from flywheel.demo import base

    monkeypatch.setattr(base, "_package_dir", lambda name: tmp_path / name)
    with pytest.raises(UserError, match="'shipped-tiny' is missing .*--base shipped-tiny --install.*--from-scratch"):
        shipped_base("shipped-tiny")


def test_presets_start_from_a_shipped_base_and_from_scratch_pretrains(monkeypatch):
    from dataclasses import asdict

    assert DemoConfig(preset="default").resolved().base == "shipped"
    assert DemoConfig(preset="fp32").resolved().base == "shipped"
    quick = DemoConfig(quick=True).resolved()
    assert quick.base == "shipped-tiny"
    assert describe_model(asdict(quick)) == "the shipped toy-world base (tiny), fp32"
    scratch = DemoConfig(preset="default", from_scratch=True).resolved()
    assert scratch.base == "" and scratch.pretrain["epochs"] == 3.0
    assert demo_command(asdict(scratch)) == "flywheel demo --seed 0 --from-scratch"
    # bf16 follows the shipped base's own size: the 0.8M one stays in fp32 under the default preset too
    monkeypatch.setattr(config, "bf16_is_fast", lambda: True)
    assert DemoConfig(preset="default", base="shipped-tiny").resolved().bf16 is False
    assert DemoConfig(quick=True, base="shipped").resolved().bf16 is True
    quick_scratch = DemoConfig(quick=True, from_scratch=True).resolved()
    assert quick_scratch.base == "" and quick_scratch.size == "tiny"
    assert demo_command(asdict(quick_scratch)) == "flywheel demo --quick --seed 0 --from-scratch"
    with pytest.raises(UserError, match="--from-scratch .* cannot be combined with --base"):
        DemoConfig(from_scratch=True, base="runs/x/base/final").resolved()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED_BASES))
def test_the_documented_command_reproduces_a_shipped_base(tmp_path, monkeypatch, name):
    """`python -m flywheel.demo.base --base NAME` again, stopped after its first logged steps: the same world and
    tokenizer, byte for byte, and the same training losses as the shipped model recorded (to 0.1%: the test may run on
    a CPU without native bf16, which trains the small base in fp32; fp32 against the recorded bf16 run differed by
    2e-5 at most)."""
    from flywheel.demo.stages import read_metrics, stage_pretrain, stage_tokenizer, start_run
    from flywheel.train import loop

    class Stop(Exception):
        pass

    log = loop.MetricsLogger.log
    last = 10 * FINGERPRINT_STEPS

    def log_then_stop(self, step, metrics):
        log(self, step, metrics)
        if step >= last and "loss" in metrics:
            raise Stop

    monkeypatch.setattr(loop.MetricsLogger, "log", log_then_stop)
    cfg = base_config(tmp_path, name, progress=False)
    assert cfg.seed == BASE_SEED and cfg.base == "" and cfg.size == SHIPPED_BASES[name].size
    run = start_run(cfg, tmp_path, {})
    init = stage_tokenizer(run)
    shipped = shipped_base(name)
    assert json.loads((init / "tokenizer.json").read_text()) == json.loads((shipped / "tokenizer.json").read_text())
    with pytest.raises(Stop):
        stage_pretrain(run, init)
    got = {str(r["step"]): r["loss"] for r in read_metrics(Path(tmp_path) / "base" / "metrics.jsonl") if "loss" in r}
    want = json.loads((shipped / "flywheel.json").read_text())["fingerprint"]
    assert list(got) == list(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-3), step
