"""Shared fixtures: a tokenizer trained in the test session and tiny Llama models built from a config."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

CORPUS = [
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is Rome.",
    "What is 12 + 30? It is 42. What is 7 + 8? It is 15. Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12.",
    "The cat says meow. The dog says woof. I don't know. Sorry, I can't help with that.",
    "hello world, system, user, assistant, reverse the word, count the letters, sort the list.",
    "Émile a mangé une crêpe à Paris — naïve café, 日本語のテキスト, emoji 🙂 test.",
]


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a test that draws without its own seed is still
    reproducible, alone or in any order."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from flywheel.tokenization import train_tokenizer

    return train_tokenizer(CORPUS * 20, vocab_size=400)


@pytest.fixture
def tiny_model(tokenizer):
    from flywheel.models import build_causal_lm, config_for_tokenizer

    return build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)


@pytest.fixture
def model_dir(tmp_path, tiny_model, tokenizer):
    from flywheel.models import save_pretrained

    return save_pretrained(tiny_model, tokenizer, tmp_path / "model")


@pytest.fixture
def prompts_file(tmp_path):
    """48 one-turn prompts for the RL trainers (PPO, `flywheel rl`, LoRA, distributed), in their JSONL format."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i} cats."}]} for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
