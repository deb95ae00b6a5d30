"""Python reward functions (`--reward-fn module:function`), beside or instead of the reward model.

    flywheel rl --estimator grpo --model runs/sft/final --prompts prompts.jsonl --out runs/rlvr \
        --reward-fn mytask.rewards:exact_answer mytask.rewards:brevity --reward-weights 1.0 0.1

A function is named `module:function` (the module importable) or `path/to/file.py:function`; it is any callable
`fn(prompts: list[str], responses: list[str]) -> list[float]`: prompts are the last user message of each rollout's
prompt, responses the sampled text (special tokens, such as the end of turn, removed). It is called once per rollout
batch. The reward of a response is the weighted sum of the functions' values (weights from --reward-weights, 1 each
by default), plus the reward model's score (weight 1) when --reward-model is given too. Each function's batch mean is
logged as `reward/<function>`. The missing-EOS penalty and the KL terms apply as with a reward model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import UserError
from flywheel.tokenization import render_prompt

TextRewardFn = Callable[[list[str], list[str]], Sequence[float]]


def _import(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):  # a file: loaded under its own name, whether or not its folder is on sys.path
        path = Path(module_name)
        if not path.is_file():
            raise UserError(f"--reward-fn {spec}: no such file {module_name}")
        name = f"flywheel_reward_fn_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        # Registered before it runs, as `import` does: a dataclass (or pickle, typing.get_type_hints) in the file
        # looks its module up in sys.modules while the file executes.
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--reward-fn {spec}: cannot import {module_name} ({err})") from None


def load_reward_fn(spec: str) -> TextRewardFn:
    """Import `module:function` or `path/to/file.py:function` (a dotted attribute path after the colon is allowed);
    a bad spec is a UserError."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--reward-fn {spec!r}: expected module:function, e.g. mypackage.rewards:exact_match")
    obj: Any = _import(spec, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--reward-fn {spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--reward-fn {spec}: {attr} is not callable")
    return obj


def last_user_texts(prompts: Sequence[Sequence[Any]], tokenizer: Any) -> dict[tuple[int, ...], str]:
    """Rendered prompt ids -> the text of the prompt's last user message (what a reward function checks against)."""
    out: dict[tuple[int, ...], str] = {}
    for messages in prompts:
        dicts = [m.as_dict() if hasattr(m, "as_dict") else dict(m) for m in messages]
        user = [m["content"] for m in dicts if m["role"] == "user"]
        out[tuple(render_prompt(tokenizer, dicts))] = user[-1] if user else ""
    return out


class RewardFunctions:
    """Weighted sum of text reward functions, with the token-id interface of the Reward role: (prompt ids, response
    ids) per rollout -> (B,) scores. `last` holds each function's batch mean after a call."""

    def __init__(
        self,
        fns: Sequence[tuple[str, TextRewardFn, float]],
        tokenizer: Any,
        prompt_texts: dict[tuple[int, ...], str],
    ):
        self.fns = list(fns)
        self.tokenizer = tokenizer
        self.prompt_texts = prompt_texts
        self.last: dict[str, float] = {}

    def texts(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> tuple[list[str], list[str]]:
        prompts = [
            self.prompt_texts.get(tuple(p), self.tokenizer.decode(p, skip_special_tokens=True)) for p in prompt_ids
        ]
        responses = [self.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
        return prompts, responses

    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        prompts, responses = self.texts(prompt_ids, response_ids)
        total = torch.zeros(len(responses), dtype=torch.float32)
        self.last = {}
        for name, fn, weight in self.fns:
            values = fn(prompts, responses)
            try:
                values = list(values)
            except TypeError:
                raise UserError(
                    f"--reward-fn {name} returned {type(values).__name__}, not a list of numbers"
                ) from None
            if len(values) != len(responses):
                raise UserError(f"--reward-fn {name} returned {len(values)} values for {len(responses)} responses")
            try:
                scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
            except (TypeError, ValueError):
                raise UserError(f"--reward-fn {name} returned a value that is not a number: {values[:3]}") from None
            if not torch.isfinite(scores).all():
                raise UserError(f"--reward-fn {name} returned a value that is not finite: {values[:3]}")
            key = f"reward/{name.rpartition(':')[2]}"
            if key in self.last:  # two functions of one name (from two modules, or one given twice): both logged
                key = f"reward/{name}"
            self.last[key] = float(scores.mean())
            total += weight * scores
        return total


def build_reward_functions(
    specs: Sequence[str], weights: Sequence[float], tokenizer: Any, prompts: Sequence[Sequence[Any]]
) -> RewardFunctions:
    """The --reward-fn / --reward-weights of a config, imported and checked (UserError on a bad one)."""
    if weights and len(weights) != len(specs):
        raise UserError(f"--reward-weights has {len(weights)} values for {len(specs)} --reward-fn functions")
    ws = list(weights) if weights else [1.0] * len(specs)
    fns = [(spec, load_reward_fn(spec), float(w)) for spec, w in zip(specs, ws, strict=True)]
    return RewardFunctions(fns, tokenizer, last_user_texts(prompts, tokenizer))
