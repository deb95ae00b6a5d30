"""Hugging Face Hub ids: `--model org/name` (with `--revision`, `--trust-remote-code`), `--dtype`,
`--attn-implementation`, and hub dataset names in `--data`. The machine is offline, so each test lays out a local hub
cache the way `huggingface_hub` writes one (`models--org--name/snapshots/<commit>/...`, `refs/<branch>`) and loads
from it with HF_HUB_OFFLINE=1, which is how an offline cluster node uses models and datasets downloaded beforehand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flywheel.cli import main
from flywheel.config import parse_config
from flywheel.errors import UserError
from flywheel.models import build_causal_lm, config_for_tokenizer, load_causal_lm, save_pretrained
from flywheel.tokenization import load_tokenizer
from flywheel.train.loop import prepare_model
from flywheel.train.sft import SFTConfig

REV_A = "a" * 40
REV_B = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline hub cache in tmp_path/hub (and HF_HOME beside it)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads the environment once, at import: point its constants here too.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, src: Path, commit: str, *, refs=("main",), kind: str = "models") -> Path:
    """Put the files of `src` in the hub cache as `repo_id` at `commit`, and point each branch of `refs` at it."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def _first_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().float()


@pytest.fixture
def two_revisions(hub_cache, tmp_path, tokenizer):
    """org/tiny on the hub cache: commit A on main, commit B (other weights) on branch v2; org/rm, a reward model
    (a sequence classifier) of each, the same way."""
    from flywheel.models import load_sequence_classifier

    for commit, seed, refs in ((REV_A, 0, ("main",)), (REV_B, 1, ("v2",))):
        model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=seed)
        src = save_pretrained(model, tokenizer, tmp_path / f"model-{seed}")
        publish(hub_cache, "org/tiny", src, commit, refs=refs)
        rm = save_pretrained(load_sequence_classifier(str(src)), tokenizer, tmp_path / f"rm-{seed}")
        publish(hub_cache, "org/rm", rm, commit, refs=refs)
    return hub_cache


def _demos(path: Path, n: int = 8) -> Path:
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    path.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(n)))
    return path


def test_a_hub_id_loads_from_the_cache_and_revision_picks_the_snapshot(two_revisions, tokenizer):
    main_model = load_causal_lm("org/tiny")
    by_branch = load_causal_lm("org/tiny", revision="v2")
    by_commit = load_causal_lm("org/tiny", revision=REV_B)
    snapshots = two_revisions / "models--org--tiny" / "snapshots"
    assert torch.equal(_first_weight(main_model), _first_weight(load_causal_lm(str(snapshots / REV_A))))
    assert torch.equal(_first_weight(by_branch), _first_weight(by_commit))
    assert not torch.equal(_first_weight(main_model), _first_weight(by_branch))
    tok = load_tokenizer("org/tiny", revision="v2")
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.pad_token_id == tokenizer.pad_token_id


def test_sft_trains_a_hub_model_at_the_given_revision(two_revisions, tmp_path):
    data = _demos(tmp_path / "demos.jsonl")
    out = tmp_path / "run"
    argv = ["sft", "--model", "org/tiny", "--revision", "v2", "--data", str(data), "--out", str(out)]
    argv += ["--max-steps", "1", "--lr", "1e-9", "--batch-size", "2", "--eval-split", "0", "--progress", "false"]
    assert main(argv) == 0
    trained = _first_weight(load_causal_lm(str(out / "final")))
    v2, main_branch = (
        _first_weight(load_causal_lm("org/tiny", revision="v2")),
        _first_weight(load_causal_lm("org/tiny")),
    )
    # One step at lr 1e-9 moves a weight by ~1e-9: the run started from v2, not from main.
    torch.testing.assert_close(trained, v2, rtol=0, atol=1e-6)
    assert (trained - main_branch).abs().max() > 1e-3
    saved = (out / "config.yaml").read_text()
    assert "revision: v2" in saved and "trust_remote_code: false" in saved


@pytest.mark.parametrize(
    ("model", "extra", "named"),
    [
        ("org/missing", [], "org/missing"),
        ("org/tiny", ["--revision", "nope"], "org/tiny (revision nope)"),
    ],
)
def test_a_missing_hub_model_or_revision_is_one_line_naming_it(two_revisions, tmp_path, capsys, model, extra, named):
    data = _demos(tmp_path / "demos.jsonl")
    argv = [
        "sft",
        "--model",
        model,
        *extra,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--progress",
        "false",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # the failed run left no directory behind
    # a name that is no local directory either says so (a mistyped local path reads as a hub id); org/tiny is cached
    assert ("no local directory of that name, and as a hub id" in err) == (model == "org/missing")


REMOTE_CONFIG = """
from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
"""
REMOTE_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
"""


def test_trust_remote_code_runs_the_repository_s_code_and_is_required_for_it(
    hub_cache, model_dir, tmp_path, monkeypatch
):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the code
    src = tmp_path / "remote"
    shutil.copytree(model_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "remote_llama"
    config["architectures"] = ["RemoteLlamaForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_remote.RemoteLlamaConfig",
        "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM",
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (src / "modeling_remote.py").write_text(REMOTE_MODEL)
    publish(hub_cache, "org/remote", src, REV_A)
    with pytest.raises(UserError, match=r"org/remote.*--trust-remote-code") as err:
        load_causal_lm("org/remote")
    assert "\n" not in str(err.value)
    model = load_causal_lm("org/remote", trust_remote_code=True)
    assert type(model).__name__ == "RemoteLlamaForCausalLM"
    assert torch.equal(_first_weight(model), _first_weight(load_causal_lm(str(model_dir))))


def test_dtype_and_attention_kernel_of_loaded_models(model_dir):
    model = load_causal_lm(str(model_dir), dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    model = load_causal_lm(str(model_dir), dtype="auto", attn_implementation="sdpa")  # the checkpoint's: float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="cannot load a causal LM"):
        load_causal_lm(str(model_dir), attn_implementation="no_such_kernel")


def _sft_cfg(model_dir, *flags: str) -> SFTConfig:
    return parse_config(SFTConfig, ["--model", str(model_dir), "--data", "d.jsonl", "--out", "o", *flags], "sft")


def test_an_explicit_attention_kernel_wins_over_the_cpu_bf16_default(model_dir):
    cfg = _sft_cfg(model_dir, "--bf16", "--attn-implementation", "sdpa")
    model = prepare_model(load_causal_lm(str(model_dir), **cfg.load_kwargs(cfg.model)), cfg)
    assert model.config._attn_implementation == "sdpa"
    cfg = _sft_cfg(model_dir, "--bf16")  # no choice: eager, the faster one for bf16 on the CPU
    model = prepare_model(load_causal_lm(str(model_dir), **cfg.load_kwargs(cfg.model)), cfg)
    assert model.config._attn_implementation == "eager"
    cfg = _sft_cfg(model_dir, "--dtype", "bfloat16")  # bfloat16 weights count as bf16 too
    model = prepare_model(load_causal_lm(str(model_dir), **cfg.load_kwargs(cfg.model)), cfg)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="--dtype must be one of float32, bfloat16, float16, auto"):
        _sft_cfg(model_dir, "--dtype", "float64")
    assert _sft_cfg(model_dir, "--torch_dtype", "bfloat16").dtype == "bfloat16"  # TRL's name


def test_sft_trains_and_saves_in_the_chosen_dtype(tmp_path, model_dir):
    data = _demos(tmp_path / "demos.jsonl")
    out = tmp_path / "run"
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--dtype", "bfloat16"]
    argv += ["--attn-implementation", "eager", "--max-steps", "2", "--batch-size", "2", "--eval-split", "0"]
    assert main([*argv, "--progress", "false"]) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    trained = load_causal_lm(str(out / "final"), dtype="auto")
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    assert not torch.equal(_first_weight(trained), _first_weight(load_causal_lm(str(model_dir))).bfloat16().float())


def test_pretrain_builds_a_new_model_in_the_chosen_dtype_and_kernel(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: the cat sat on the mat {i % 7} times." for i in range(40)))
    out = tmp_path / "base"
    argv = ["pretrain", "--data", str(corpus), "--out", str(out), "--size", "nano", "--vocab-size", "300"]
    argv += ["--seq-len", "32", "--max-steps", "1", "--dtype", "bfloat16", "--attn-implementation", "eager"]
    assert main([*argv, "--progress", "false"]) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"


DATASET_CARD = """---
configs:
- config_name: short
  default: true
  data_files:
  - split: train
    path: short/train.jsonl
  - split: test
    path: short/test.jsonl
- config_name: long
  data_files:
  - split: train
    path: long/train.jsonl
---
# org/demos
"""


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def hub_dataset(hub_cache, tmp_path, monkeypatch):
    """org/demos in the hub cache, as `hf download --repo-type dataset org/demos` leaves it: two configs (short, the
    default, with train and test splits; long, with train), JSON Lines files and a dataset card saying so."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # where it is prepared
    src = tmp_path / "demos-repo"
    for config, split, n in (("short", "train", 6), ("short", "test", 2), ("long", "train", 4)):
        rows = [_conversation(f"{config} {split} question {i}?", f"{config} answer {i}.") for i in range(n)]
        (src / config).mkdir(parents=True, exist_ok=True)
        (src / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "README.md").write_text(DATASET_CARD)
    publish(hub_cache, "org/demos", src, REV_A, kind="datasets")
    return hub_cache


def test_a_hub_dataset_name_reads_the_chosen_config_and_split(hub_dataset):
    from flywheel.data.io import read_conversations

    train = read_conversations("org/demos")
    assert [c.messages[0].content for c in train] == [f"short train question {i}?" for i in range(6)]
    test = read_conversations("org/demos", split="test")
    assert [c.messages[-1].content for c in test] == ["short answer 0.", "short answer 1."]
    long = read_conversations("org/demos", config="long", split="train[:3]")
    assert [c.messages[0].content for c in long] == [f"long train question {i}?" for i in range(3)]


def test_hub_dataset_errors_are_one_line_naming_the_dataset(hub_dataset):
    from flywheel.data.io import read_conversations, read_preferences

    with pytest.raises(UserError, match=r"org/missing: no such file or directory, and no Hugging Face Hub") as err:
        read_conversations("org/missing")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"org/demos\[validation\].*Unknown split") as err:
        read_conversations("org/demos", split="validation")
    with pytest.raises(UserError, match=r"org/demos\[nope:train\]") as err:
        read_conversations("org/demos", config="nope")
    assert "\n" not in str(err.value)
    # A record that is not of the expected kind is named by its row, as a file's line would be.
    with pytest.raises(UserError, match=r"^org/demos\[train\]:1: no known preference format"):
        read_preferences("org/demos")
    # Names that end like a data file are local files, never looked up on the Hub.
    with pytest.raises(UserError, match="no such file or directory") as err:
        read_conversations("demos.jsonl")
    assert "Hub" not in str(err.value)


def test_a_local_path_that_exists_wins_over_a_hub_dataset_of_the_same_name(hub_dataset, tmp_path, monkeypatch):
    from flywheel.data.io import is_hub_dataset_name, read_conversations

    monkeypatch.chdir(tmp_path)
    assert is_hub_dataset_name("org/demos")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "demos").write_text(json.dumps(_conversation("local?", "local.")) + "\n")
    assert not is_hub_dataset_name("org/demos")
    assert [c.messages[0].content for c in read_conversations("org/demos")] == ["local?"]
    assert not any(is_hub_dataset_name(p) for p in ("a/b/c", "./x", "/x", "x.jsonl", "data.parquet", "x y"))


def test_sft_trains_on_a_hub_dataset_with_its_eval_split(hub_dataset, model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["sft", "--model", str(model_dir), "--data", "org/demos", "--eval-data", "org/demos", "--out", str(out)]
    argv += ["--dataset_config", "short", "--dataset_test_split", "test", "--max-steps", "2", "--batch-size", "2"]
    assert main([*argv, "--progress", "false"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "dataset_config: short" in saved and "eval_dataset_split: test" in saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows)


def test_every_command_that_loads_a_model_by_name_has_the_hub_fields():
    import dataclasses

    from flywheel.chat import ChatConfig
    from flywheel.eval.reward import RMEvalConfig
    from flywheel.sample import SampleConfig
    from flywheel.score import ScoreConfig
    from flywheel.train.dpo import DPOConfig
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.ppo.rl import RLConfig
    from flywheel.train.pretrain import PretrainConfig
    from flywheel.train.reward import RewardConfig

    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    hub, data = {"revision", "trust_remote_code"}, {"dataset_config", "dataset_split"}
    trainer = hub | data | {"dtype", "attn_implementation", "report_to"}
    for cls in (PretrainConfig, SFTConfig, RewardConfig, DPOConfig, PPOConfig, RLConfig):
        assert trainer <= names(cls), cls.__name__
    for cls in (SampleConfig, ScoreConfig, RMEvalConfig):
        assert hub | data <= names(cls), cls.__name__
    assert hub <= names(ChatConfig)
    for cls in (PretrainConfig, SFTConfig, RewardConfig, DPOConfig):
        assert "eval_dataset_split" in names(cls), cls.__name__


def test_reward_models_load_from_a_hub_id_at_a_revision(two_revisions, tokenizer):
    from flywheel.models import load_sequence_classifier
    from flywheel.train.reward import RewardModel

    v2 = load_sequence_classifier("org/tiny", revision="v2")  # a reward model to train: its head is new
    assert torch.equal(_first_weight(v2), _first_weight(load_causal_lm("org/tiny", revision=REV_B)))
    rm = RewardModel.from_pretrained("org/rm", revision="v2")
    assert torch.equal(_first_weight(rm.model), _first_weight(v2))
    assert not torch.equal(_first_weight(RewardModel.from_pretrained("org/rm").model), _first_weight(v2))
    assert rm.tokenizer.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(UserError, match=r"org/tiny \(revision v2\) is not a reward model \(LlamaForCausalLM"):
        RewardModel.from_pretrained("org/tiny", revision="v2")  # a reward model that scores has a trained head
    with pytest.raises(UserError, match=r"cannot load a sequence classifier from org/tiny \(revision v3\)"):
        load_sequence_classifier("org/tiny", revision="v3")


def test_revision_is_the_model_s_only(two_revisions):
    from flywheel.train.ppo.config import PPOConfig

    argv = ["--model", "org/tiny", "--revision", "v2", "--reward-model", "org/rm", "--prompts", "p.jsonl"]
    cfg = parse_config(PPOConfig, [*argv, "--out", "o", "--trust-remote-code", "--dtype", "bfloat16"], "ppo")
    assert cfg.load_kwargs("org/tiny") == {
        "revision": "v2",
        "trust_remote_code": True,
        "dtype": "bfloat16",
        "attn_implementation": None,
    }
    assert cfg.hub_kwargs("org/rm") == {"revision": None, "trust_remote_code": True}


@pytest.mark.parametrize("stage", ["rm", "dpo", "ppo", "rl"])
def test_every_trainer_runs_from_a_hub_id_at_a_revision_in_bfloat16(two_revisions, tmp_path, prompts_file, stage):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / stage
    argv = [stage, "--model", "org/tiny", "--revision", "v2", "--dtype", "bfloat16", "--out", str(out)]
    argv += ["--max-steps", "1", "--batch-size", "2", "--progress", "false", "--report-to", "none"]
    if stage in ("rm", "dpo"):
        argv += ["--data", str(pairs), "--eval-split", "0.25"]
    else:
        argv += ["--reward-model", "org/rm", "--prompts", str(prompts_file), "--rollout-batch-size", "2"]
        argv += ["--ppo-epochs", "1", "--max-new-tokens", "4"]
        argv += ["--num-generations", "2"] if stage == "rl" else []
    assert main(argv) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    assert "revision: v2" in (out / "config.yaml").read_text()


def test_a_hub_dataset_without_the_datasets_package_says_how_to_install(hub_dataset, monkeypatch):
    import sys

    from flywheel.data.io import read_conversations

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"'org/demos' is no local file or directory.*pip install datasets"):
        read_conversations("org/demos")


def test_with_no_network_a_hub_id_loads_from_the_cache_at_once(hub_dataset, two_revisions, tmp_path, monkeypatch):
    """Not told it is offline, on a machine that cannot reach the hub: one connection attempt, then the caches only
    (the hub client would retry each file for most of a minute before looking in its cache)."""
    import time

    import datasets
    import huggingface_hub.constants as hub_constants

    import flywheel.models as models
    from flywheel.data.io import read_conversations

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(models, "_HUB_CHECKED", False)
    started = time.monotonic()
    snapshot = two_revisions / "models--org--tiny" / "snapshots" / REV_A
    assert torch.equal(_first_weight(load_causal_lm("org/tiny")), _first_weight(load_causal_lm(str(snapshot))))
    assert hub_constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE is False  # datasets: when it is used
    with pytest.raises(UserError, match="cannot load a causal LM from org/nope: no local directory of that name"):
        load_causal_lm("org/nope")
    assert len(read_conversations("org/demos")) == 6 and datasets.config.HF_HUB_OFFLINE
    assert time.monotonic() - started < 20


def test_a_reachable_hub_is_asked_and_the_check_runs_once(monkeypatch):
    import socket

    import huggingface_hub.constants as hub_constants

    import flywheel.models as models

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(models, "_HUB_CHECKED", False)
    try:
        assert models.offline_if_hub_unreachable() is False and hub_constants.HF_HUB_OFFLINE is False
    finally:
        server.close()
    assert models.offline_if_hub_unreachable() is False  # checked once a process: the closed port is not tried
