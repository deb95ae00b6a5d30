"""Build tiny HF models from a config, load local HF directories, save checkpoints plain transformers can load.

Policies are `*ForCausalLM`; reward and value models are `*ForSequenceClassification(num_labels=1)` with a scalar head
read at the last real token, so `AutoModelForSequenceClassification.from_pretrained(dir)` loads them without flywheel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import UserError
from flywheel.utils import atomic_dir

log = logging.getLogger(__name__)

# Sizes measured on the 2-core CPU (DESIGN.md): "tiny" is for tests and CI, "mini" for the demo.
TINY_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
}


def tiny_llama_config(
    vocab_size: int,
    size: str = "tiny",
    *,
    max_position_embeddings: int = 1024,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    **overrides: Any,
) -> Any:
    from transformers import LlamaConfig

    if size not in TINY_SIZES:
        raise UserError(f"unknown model size '{size}' (choose from {', '.join(TINY_SIZES)})")
    kw: dict[str, Any] = dict(TINY_SIZES[size])
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    kw.update(overrides)
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **kw,
    )


def config_for_tokenizer(tokenizer: Any, size: str = "tiny", **overrides: Any) -> Any:
    return tiny_llama_config(
        len(tokenizer),
        size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )


def build_causal_lm(config: Any, seed: int | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def configure_new_model(model: Any, dtype: str, attn_implementation: str | None) -> None:
    """--dtype and --attn-implementation for a model built from a config (`auto` keeps float32, its dtype)."""
    if dtype != "auto":
        model.to(_dtype(dtype))
    if attn_implementation:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as err:
            raise UserError(f"--attn-implementation {attn_implementation}: {hub_error(err)}") from None


def check_model_dir(path: str | Path) -> Path:
    """`path` as a Path, or a UserError saying why it is not a local HF model directory."""
    p = Path(path)
    if not p.exists():
        parent = p.parent
        hint = f" ({parent}/ is a local directory, so this names a path, not a hub id)" if is_org_dir(p) else ""
        raise UserError(f"model directory does not exist: {p}{hint}")
    if not (p / "config.json").is_file():
        check_not_run_dir(p, "config.json")
        raise UserError(f"not a Hugging Face model directory (no config.json): {p}")
    return p


def check_not_run_dir(path: Path, marker: str) -> None:
    """A one-line error naming the model inside when `path`, which lacks `marker` (what a model or tokenizer
    directory holds), is a run directory whose `final/` has it: a trainer's `--out` given where its model belongs."""
    if (path / "final" / marker).is_file():
        raise UserError(f"{path} is a run directory, not a model: its model is {path / 'final'}")


def is_org_dir(path: Path) -> bool:
    """Whether `path` is `org/name` whose `org` is a local directory (`runs/sft`): a path, whatever its shape."""
    return len(path.parts) == 2 and path.parent.is_dir()


DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class HubOptions:
    """How `--model` (a local directory or a Hugging Face Hub id) is fetched: the config fields of every command that
    loads a model by name."""

    revision: str = field(
        default="",
        metadata={
            "help": "hub revision of --model: a branch, tag or commit hash (empty = main); local directories ignore it"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "run the Python code a hub model ships for its architecture (only for repositories you trust)"
        },
    )

    def hub_kwargs(self, path: str) -> dict[str, Any]:
        """The keyword arguments of the `load_*` functions for `path`: --revision is --model's, so another model of
        the same run (a reward model, a --ref-model) loads at its default revision."""
        revision = self.revision if path == getattr(self, "model", None) and self.revision else None
        return {"revision": revision, "trust_remote_code": self.trust_remote_code}


@dataclass
class ModelOptions(HubOptions):
    """How a trainer loads its models: where from (`HubOptions`), in which dtype, with which attention kernel."""

    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype every model of the run is loaded, trained and saved in: float32, bfloat16, float16, or "
            "auto (the checkpoint's own); --bf16 (autocast) is a separate setting on top (docs/trl.md)"
        },
    )
    attn_implementation: str = field(
        default="",
        metadata={
            "help": "attention kernel: eager, sdpa, flash_attention_2, flex_attention, ... (empty = transformers' "
            "default, and eager for --bf16 on CPU, where it is faster)"
        },
    )

    def validate(self) -> None:
        check_dtype(self.dtype)

    def load_kwargs(self, path: str) -> dict[str, Any]:
        """`hub_kwargs` plus the dtype and attention kernel: every model of a training run loads alike."""
        return {**self.hub_kwargs(path), "dtype": self.dtype, "attn_implementation": self.attn_implementation or None}


def check_dtype(name: str) -> None:
    """A one-line error unless `name` is a --dtype flywheel loads models in."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")


def _dtype(name: str | torch.dtype | None) -> str | torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise UserError(f"unknown dtype '{name}' (choose from {', '.join(table)}, auto)")
    return table[name]


def is_hub_id(path: str) -> bool:
    """Whether `path` names a model on the Hugging Face Hub (`name` or `org/name`) rather than a local directory: a
    path that exists is local, and so is anything shaped like a path (`./x`, `/x`, `~/x`, `a/b/c`, `x/`) and an
    `org/name` whose `org` is a local directory (`runs/sft1` mistyped is a missing directory, not a hub id to look
    up: offline, the hub client retries for most of a minute)."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith("/")
    return not (Path(path).exists() or looks_local or is_org_dir(Path(path)))


def resolve_model_path(path: str) -> str:
    """Local directories are checked up front; a name shaped like a hub id (`name` or `org/name`) is passed on to
    transformers (it loads when online or cached; `offline_if_hub_unreachable` first)."""
    if is_hub_id(path):
        offline_if_hub_unreachable()
        return path
    return str(check_model_dir(Path(path).expanduser()))


_HUB_CHECKED = False


def offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether the process loads from the hub cache only: HF_HUB_OFFLINE, or no connection to the hub's endpoint
    (tried once a process, for at most `timeout` seconds). With no network the hub client retries every file for
    most of a minute before it looks in its cache; switched to offline mode, a cached model loads at once and a
    missing one is an error at once."""
    global _HUB_CHECKED
    import os
    import socket
    from urllib.parse import urlsplit

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or _HUB_CHECKED:
        return bool(hub.HF_HUB_OFFLINE)
    _HUB_CHECKED = True
    url = urlsplit(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return False
    except OSError as err:
        log.warning(
            "%s cannot be reached (%s): models and datasets load from the local caches only", hub.ENDPOINT, err
        )
        hub.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True


def describe_source(path: str, revision: str | None = None) -> str:
    """`path`, and the revision when one is asked for: how an error names the model."""
    return f"{path} (revision {revision})" if revision and is_hub_id(path) else path


def hub_error(err: Exception, path: str | None = None, revision: str | None = None) -> str:
    """The first line of a loading error, and what to do when it is transformers' refusal to run a hub model's code.
    A `path` shaped like a hub id, asked for at no revision, that is no local directory either is said to be
    neither (a mistyped local path reads as a hub id: `runs/sft/fnal`)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if first.endswith(":"):  # a list follows ("... from one of:"): one line of it all
        first = " ".join(lines)
    if "trust_remote_code" in str(err):
        return f"{first} (the model ships its own code: pass --trust-remote-code to run it)"
    if path is not None and not revision and is_hub_id(path) and not Path(path).expanduser().exists():
        return f"no local directory of that name, and as a hub id: {first}"
    return first


def _pretrained_kwargs(
    dtype: str | torch.dtype | None, revision: str | None, trust_remote_code: bool, attn_implementation: str | None
) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return kw


def load_causal_lm(
    path: str,
    dtype: str | torch.dtype | None = "float32",
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """A `*ForCausalLM` from a local HF directory or a hub id (at `revision`; from the hub cache when offline). A
    reward model's directory (a `*ForSequenceClassification`) is a one-line error: it has no language-model head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model_path(path)
    kw = _pretrained_kwargs(dtype, revision, trust_remote_code, attn_implementation)
    try:
        config = AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
        if is_sequence_classifier(config):
            raise UserError(
                f"{describe_source(path, revision)} is a reward model ({config.architectures[0]}), not a language "
                "model: give a policy's directory (SFT, PPO, a base model)"
            )
        model = AutoModelForCausalLM.from_pretrained(src, config=config, **kw)
    except (OSError, ValueError, ImportError) as err:
        source = describe_source(path, revision)
        raise UserError(f"cannot load a causal LM from {source}: {hub_error(err, path, revision)}") from None
    return model


def is_sequence_classifier(config: Any) -> bool:
    """Whether a model config is a scalar-head model's (`*ForSequenceClassification`: a reward or value model)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def load_sequence_classifier(
    path: str,
    dtype: str | torch.dtype | None = "float32",
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    trained: bool = False,
) -> Any:
    """A scalar-head model (reward or value). From a causal-LM directory the head is new (InstructGPT init), unless
    `trained`: a reward model that scores must have its head, so a language model's directory is a one-line error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = resolve_model_path(path)
    kw = _pretrained_kwargs(dtype, revision, trust_remote_code, attn_implementation)
    try:
        config = AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
        is_classifier = is_sequence_classifier(config)
        if trained and not is_classifier:
            arch = (getattr(config, "architectures", None) or ["no architecture"])[0]
            raise UserError(
                f"{describe_source(path, revision)} is not a reward model ({arch}: no trained score head; a reward "
                "model is what `flywheel rm` writes, a *ForSequenceClassification)"
            )
        config.num_labels = 1
        # From a causal LM the head is missing by design; transformers' load report would call that a problem.
        with _quiet_transformers(not is_classifier):
            model = AutoModelForSequenceClassification.from_pretrained(src, config=config, **kw)
    except (OSError, ValueError, ImportError) as err:
        source = describe_source(path, revision)
        raise UserError(f"cannot load a sequence classifier from {source}: {hub_error(err, path, revision)}") from None
    if not is_classifier:
        init_reward_head(model)
    return model


@contextmanager
def _quiet_transformers(enabled: bool = True) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if enabled:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def reward_head(model: Any) -> torch.nn.Linear:
    head = getattr(model, "score", None)
    if head is None:
        raise UserError(f"{type(model).__name__} has no `score` head")
    return head


def init_reward_head(model: Any) -> None:
    """InstructGPT/N+ details: head weights ~ N(0, 1/sqrt(d+1)), bias 0."""
    head = reward_head(model)
    d = head.weight.shape[1]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (d + 1) ** 0.5)
        if head.bias is not None:
            head.bias.zero_()


def resize_for_tokenizer(model: Any, tokenizer: Any) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_pretrained(
    model: Any, tokenizer: Any | None, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Atomically write a plain HF directory (safetensors + config + tokenizer); `extra` goes to flywheel.json."""
    from flywheel.tokenization import save_tokenizer

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if extra:
            (tmp / "flywheel.json").write_text(json.dumps(extra, indent=2))
    return out_dir


def fast_cpu_attention(model: Any, bf16: bool, device: torch.device | str | None = None) -> None:
    """On CPU with bf16, eager attention trains ~1.6x faster than SDPA, whose CPU flash-attention backward is slow at
    these sizes (bench/sft_vs_trl.py: 0.38 vs 0.62 s/step for the 5M model, batch 16 x 128). `device` is where the
    model will run (default: where its weights are now; models are loaded on the CPU and moved later). The choice is
    runtime only; it is not saved with the model."""
    if not bf16 or not hasattr(model, "set_attn_implementation"):
        return
    if torch.device(device or next(model.parameters()).device).type == "cpu":
        model.set_attn_implementation("eager")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere in `model`: scores, log-probs and values must not depend on dropout noise (TRL and the
    N+ implementation details of RLHF do the same). Covers `nn.Dropout` modules, the float rates attention modules
    read at forward time (Llama-style `self.attention_dropout`), and the config's fields, so a saved model says so."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
