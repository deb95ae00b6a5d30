"""LoRA through PEFT (sft, rm, dpo, ppo), merge-and-save to a plain HF checkpoint, and gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.test_ppo import _cfg, target_reward
from tests.test_reward import preference_rows, write_jsonl
from tests.test_sft import _demos

from flywheel.cli import main
from flywheel.lora import apply_lora, disable_adapters, lora_layers, merged_state_dict
from flywheel.models import build_causal_lm, config_for_tokenizer
from flywheel.train.ppo.roles import Reference
from flywheel.train.ppo.trainer import PPOTrainer

pytest.importorskip("peft")


def _lora_model(tokenizer):
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=64), seed=0)
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # B starts at 0 (adapter = identity); give it a value so merging has something to do
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def test_merged_state_dict_is_the_adapted_model_as_a_plain_one(tokenizer):
    model = _lora_model(tokenizer)
    ids = torch.tensor([[5, 9, 30, 2, 44, 17]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with disable_adapters(model):
            base = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters change the output, and can be switched off
    plain = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=64), seed=1).eval()
    merged = merged_state_dict(model, model.state_dict())
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # everything but the adapters is frozen


def test_lora_sft_trains_adapters_only_and_saves_a_merged_plain_checkpoint(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "demos.jsonl"
    _demos(data, 24)
    out = tmp_path / "sft"
    assert (
        main(
            [
                "sft",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-steps",
                "4",
                "--batch-size",
                "8",
                "--lr",
                "1e-2",
                "--lora-r",
                "4",
                "--lora-alpha",
                "8",
                "--log-every",
                "1",
                "--progress",
                "false",
                "--eval-split",
                "0",
                "--save-adapter",
            ]
        )
        == 0
    )
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()  # a plain checkpoint: no adapter tensors
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )  # the adapter merged in
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers loads it
    # --save-adapter: the adapter alone, as PEFT writes it, on the base model gives the merged model's logits
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "final_adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert json.loads((out / "final_adapter" / "adapter_config.json").read_text())["r"] == 4
    bad = ["sft", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "x"), "--save-adapter"]
    assert main(bad) == 2  # no adapter to save without --lora-r
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_lora_runs_are_deterministic_given_the_seed(tmp_path, model_dir):
    """The adapters' random init comes from the run's seed: two runs of one command give the same adapter."""
    data = tmp_path / "demos.jsonl"
    _demos(data, 16)
    adapters = []
    for name in ("a", "b"):
        args = ["sft", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / name), "--lr", "1e-2"]
        args += ["--max-steps", "3", "--batch-size", "4", "--lora-r", "4", "--save-adapter", "--progress", "false"]
        assert main([*args, "--eval-split", "0"]) == 0
        adapters.append(load_file(str(tmp_path / name / "final_adapter" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_lora_rm_trains_the_head_in_full_and_dpo_runs(tmp_path, model_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16, seed=0))
    common = [
        "--model",
        str(model_dir),
        "--data",
        data,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        "--progress",
        "false",
        "--eval-split",
        "0",
    ]
    assert main(["rm", *common, "--out", str(tmp_path / "rm"), "--lr", "1e-2", "--save-adapter"]) == 0
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert rm.score.weight.shape[0] == 1
    # --save-adapter: the adapter carries the head it trained in full, so base + adapter is the reward model
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    adapted = PeftModel.from_pretrained(base, tmp_path / "rm" / "final_adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(input_ids=ids).logits, rm.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )
    assert main(["dpo", *common, "--out", str(tmp_path / "dpo"), "--lr", "1e-2", "--save-adapter"]) == 0
    assert (tmp_path / "dpo" / "final_adapter" / "adapter_model.safetensors").is_file()
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "dpo" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])


def test_lora_ppo_reference_is_the_policy_with_adapters_off(tmp_path, model_dir, prompts_file):
    cfg = _cfg(tmp_path, model_dir, prompts_file, lora_r=4, lora_alpha=8, lr=5e-2, max_steps=2)
    trainer = PPOTrainer(cfg, reward_fn=target_reward)
    assert trainer.ref.module is trainer.actor.module  # no second copy of the policy
    trainer.step(0)
    exp = trainer.step(1)[1]
    args = (exp.sequences, exp.attention_mask, exp.position_ids, exp.prompt_len)
    from flywheel.models import load_causal_lm

    fresh = Reference(load_causal_lm(str(model_dir)), cfg.temperature)
    real = exp.response_mask.bool()  # padding after a response's end is computed by no defined rule (and unused)
    torch.testing.assert_close(trainer.ref.forward(*args)[real], fresh.forward(*args)[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        actor_lp, _ = trainer.actor.forward(*args)
    assert not torch.allclose(actor_lp, fresh.forward(*args), atol=1e-4)  # the policy moved, the reference did not
    assert any(p.requires_grad for p in trainer.actor.module.parameters())  # the reference did not freeze the actor


def test_lora_ppo_saves_plain_policy_and_value_model(tmp_path, model_dir, prompts_file):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from flywheel.train.ppo.trainer import train_ppo

    cfg = _cfg(tmp_path, model_dir, prompts_file, lora_r=4, max_steps=1)
    out = train_ppo(cfg, reward_fn=target_reward)
    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoModelForSequenceClassification.from_pretrained(out / "final_value")
    assert not any("lora" in k for k in load_file(str(out / "final" / "model.safetensors")))


def test_gradient_checkpointing_computes_the_same_update(tmp_path, model_dir, tiny_model):
    from flywheel.train.loop import TrainConfig, prepare_model

    prepare_model(tiny_model, TrainConfig(out="x", gradient_checkpointing=True))
    assert getattr(tiny_model, "is_activation_checkpointing", None) or tiny_model.is_gradient_checkpointing
    data = tmp_path / "demos.jsonl"
    _demos(data, 16)
    runs = []
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        assert (
            main(
                [
                    "sft",
                    "--model",
                    str(model_dir),
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / name),
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "8",
                    "--lr",
                    "1e-3",
                    "--progress",
                    "false",
                    "--eval-split",
                    "0",
                    "--gradient-checkpointing",
                    flag,
                ]
            )
            == 0
        )
        runs.append(load_file(str(tmp_path / name / "final" / "model.safetensors")))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-5, msg=k)


def test_target_modules_as_trl_writes_them_as_flags_and_yaml(tmp_path, model_dir):
    """TRL's `--lora_target_modules q_proj v_proj` (a list, in YAML too) and flywheel's comma form name the same
    modules; a YAML list for a text setting is an error naming the field, never its repr taken as text."""
    from flywheel.config import parse_config
    from flywheel.errors import UserError
    from flywheel.lora import lora_targets
    from flywheel.train.sft import SFTConfig

    assert lora_targets([]) == lora_targets(["all-linear"]) == lora_targets("all-linear") == "all-linear"
    assert lora_targets(["q_proj", "v_proj"]) == lora_targets(["q_proj,v_proj"]) == ["q_proj", "v_proj"]
    base = ["--model", str(model_dir), "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    flags = parse_config(SFTConfig, [*base, "--lora_target_modules", "q_proj", "v_proj"], "sft")
    yaml_file = tmp_path / "trl.yaml"
    yaml_file.write_text("lora_target_modules:\n  - q_proj\n  - v_proj\n")
    from_yaml = parse_config(SFTConfig, [*base, "--config", str(yaml_file)], "sft")
    assert flags.lora_target_modules == from_yaml.lora_target_modules == ["q_proj", "v_proj"]
    yaml_file.write_text("chat_template:\n  - a\n  - b\n")
    with pytest.raises(UserError, match=r"config field 'chat_template' must be str, got \['a', 'b'\]"):
        parse_config(SFTConfig, [*base, "--config", str(yaml_file)], "sft")
    data = tmp_path / "demos.jsonl"
    _demos(data, 8)
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", "1"]
    argv += ["--batch-size", "8", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--save-adapter"]
    assert main(argv) == 0
    adapter = json.loads((out / "final_adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
