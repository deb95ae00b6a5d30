"""TRL's flag names: every trainer accepts them (and snake-case flags) as aliases, as flags and as YAML keys; the
table in docs/trl.md is the one the parser uses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.config import TRL_ALIASES, build_parser, parse_config
from flywheel.errors import UserError
from flywheel.train.dpo import DPOConfig
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.pretrain import PretrainConfig
from flywheel.train.reward import RewardConfig
from flywheel.train.sft import SFTConfig

TRAINERS = {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig, "pretrain": PretrainConfig}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "trl.md"


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("stage", list(TRAINERS))
def test_every_trainer_takes_trl_names_and_snake_case_for_the_same_settings(stage):
    cls = TRAINERS[stage]
    names = _fields(cls)
    values = {"model": "m", "data": "d.jsonl", "out": "runs/x", "lr": "0.002", "epochs": "2", "batch_size": "3"}
    values |= {"grad_accum": "4", "max_steps": "7", "warmup_ratio": "0.1", "log_every": "2", "save_every": "5"}
    values |= {"max_length": "64", "beta": "0.3", "reward_model": "rm", "prompts": "p.jsonl", "ppo_epochs": "2"}
    values |= {"max_new_tokens": "9", "eval_batch_size": "6", "adam_eps": "1e-6", "keep_checkpoints": "3"}
    values = {k: v for k, v in values.items() if k in names}
    if stage == "ppo":
        values |= {"batch_size": "4", "rollout_batch_size": "8"}
    ours, trl = [], []
    for name, value in values.items():
        ours += ["--" + name.replace("_", "-"), value]
        alias = next((a for a, target in TRL_ALIASES.items() if target == name and a not in names), None)
        trl += ["--" + (alias or name), value]  # the TRL name, else the field's own name in snake case
    assert parse_config(cls, trl, stage) == parse_config(cls, ours, stage)
    assert any(a in " ".join(trl) for a in ("--learning_rate", "--output_dir", "--model_name_or_path"))


def test_the_common_trl_flags_reach_their_fields():
    argv = "--model_name_or_path m --dataset_name d.jsonl --output_dir o --per_device_train_batch_size 4 "
    argv += "--learning_rate 5e-5 --num_train_epochs 3 --gradient_accumulation_steps 2 --max_length 128 --beta 0.2 "
    argv += "--logging_steps 5 --save_steps 50 --save_total_limit 1 --warmup_ratio 0.1 --max_steps 9 --bf16"
    argv += " --loss_type ipo"
    cfg = parse_config(DPOConfig, argv.split(), "dpo")
    assert cfg.loss == "ipo"
    assert (cfg.model, cfg.data, cfg.out, cfg.batch_size, cfg.lr, cfg.epochs) == ("m", "d.jsonl", "o", 4, 5e-5, 3.0)
    assert (cfg.grad_accum, cfg.max_length, cfg.beta, cfg.log_every, cfg.save_every) == (2, 128, 0.2, 5, 50)
    assert (cfg.keep_checkpoints, cfg.warmup_ratio, cfg.max_steps, cfg.bf16) == (1, 0.1, 9, True)
    ppo = "--sft_model_path s --reward_model_path r --num_ppo_epochs 2 --response_length 16 --prompts p --output_dir o"
    cfg = parse_config(PPOConfig, ppo.split(), "ppo")
    assert (cfg.model, cfg.reward_model, cfg.ppo_epochs, cfg.max_new_tokens) == ("s", "r", 2, 16)


def test_trl_names_in_yaml_and_flags_override_them(tmp_path):
    conf = tmp_path / "sft.yaml"
    conf.write_text(
        "model_name_or_path: m\ndataset_name: d.jsonl\nlearning_rate: 0.001\nnum_train_epochs: 2\noutput_dir: o\n"
    )
    cfg = parse_config(SFTConfig, ["--config", str(conf), "--lr", "0.5"], "sft")
    assert (cfg.model, cfg.data, cfg.lr, cfg.epochs) == ("m", "d.jsonl", 0.5, 2.0)
    conf.write_text("model: m\nmodel_name_or_path: n\ndata: d.jsonl\nout: o\n")
    with pytest.raises(UserError, match="both 'model' and its TRL name 'model_name_or_path'"):
        parse_config(SFTConfig, ["--config", str(conf)], "sft")
    conf.write_text("model: m\ndata: d.jsonl\nout: o\nlearning_rat: 0.1\n")
    with pytest.raises(
        UserError, match=r"unknown field\(s\) learning_rat \(learning_rat: did you mean learning_rate\?"
    ):
        parse_config(SFTConfig, ["--config", str(conf)], "sft")


def test_help_lists_flywheel_flags_only_and_points_to_the_table(capsys):
    with pytest.raises(SystemExit):
        build_parser(SFTConfig, "flywheel sft").parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--lr FLOAT" in out and "--max-steps" in out and "docs/trl.md" in out
    assert not any(
        f"--{name}" in out for name in ("num_train_epochs", "model_name_or_path", "max_steps", "max_length")
    )


def test_every_alias_has_a_target_and_docs_trl_md_has_the_table():
    from flywheel.chat import ChatConfig

    fields = set().union(*(_fields(c) for c in [*TRAINERS.values(), ChatConfig]))
    assert set(TRL_ALIASES.values()) <= fields
    docs = DOCS.read_text()
    for alias, target in TRL_ALIASES.items():
        assert f"`--{alias}`" in docs and f"`--{target.replace('_', '-')}`" in docs, alias


def test_sft_runs_with_trl_flags_only(tmp_path, model_dir):
    data = tmp_path / "demos.jsonl"
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    data.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(4)))
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir"]
    argv += [str(tmp_path / "run"), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps"]
    argv += ["2", "--eval_split", "0", "--progress", "false"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_wrong_flag_is_one_line_with_the_closest_real_one(capsys):
    from flywheel.cli import main

    for argv, message in (
        (["sft", "--model", "m", "--data", "d", "--out", "o", "--learnin-rate", "3"], "did you mean --learning_rate?"),
        (["sft", "--model", "m", "--data", "d", "--out", "o", "--epoch", "2"], "did you mean --epochs?"),
        (["ppo", "--model", "m", "--prompts", "p", "--out", "o", "--data", "d"], "unrecognized arguments: --data d"),
        (["demo", "--sft.epoch", "3"], "did you mean --sft.epochs?"),
        (["chat", "m", "--prompt", "hi", "--temp", "0"], "did you mean --temperature?"),  # no abbreviations
        (["chat", "m", "--prompt", "hi", "--fewshot", "f"], "did you mean --few-shot?"),  # not its snake case
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.endswith("--help` lists the flags)") and len(err.splitlines()) == 1, err
