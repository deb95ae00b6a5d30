"""What the trainer benchmarks against TRL (`ppo_vs_trl.py`, `rl_vs_trl.py`) share: their clocks and a saved tiny
policy with its tokenizer and prompts."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
from flywheel.tokenization import render_prompt, train_tokenizer

# --clock cpu: time.process_time, this process's CPU seconds (all threads): steadier when the machine is shared
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def toy_policy(root: Path, n_prompts: int, seed: int = 0) -> tuple[Any, list[list[dict[str, str]]], list[list[int]]]:
    """A tokenizer (vocab 4096) trained on words of random syllables, a random "small" Llama saved with it in
    `root/policy`, and `n_prompts` one-turn conversations of those words written to `root/prompts.jsonl` as
    {"messages"}: (tokenizer, conversations, their `render_prompt` ids)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)})
    tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(50)) for _ in range(2000)], vocab_size=4096)
    save_pretrained(build_causal_lm(config_for_tokenizer(tok, "small"), seed=seed), tok, root / "policy")
    convs = [
        [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))}]
        for _ in range(n_prompts)
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return tok, convs, [render_prompt(tok, c) for c in convs]
