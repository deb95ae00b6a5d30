"""LoRA through PEFT: low-rank adapters on every linear layer, the rest frozen; merged into plain HF weights on save.

    flywheel sft --model Qwen/Qwen2.5-0.5B --data demos.jsonl --out runs/sft --lora-r 16 --lora-alpha 32
    flywheel ppo ... --lora-r 16        # the reference = the policy with its adapters switched off (no second copy)

Adapters are injected with `peft.inject_adapter_in_model`, which keeps the model's own class (a `LlamaForCausalLM`
stays one): the trainers' code paths (`model.base_model`, the `score` head, the engine) work unchanged, and nothing
wraps the model in a `PeftModel`. `disable_adapters(model)` is what `PeftModel.disable_adapter()` does (peft's
`enable_adapters(False)` on every LoRA layer). A scalar head (`score`, new in a reward or value model) is trained in
full. `final/` is always merged: W + (alpha / r) * B @ A, written as a plain HF checkpoint; with `--save-adapter` the
adapter alone is written beside it (`final_adapter/`, a PEFT directory).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import UserError
from flywheel.utils import log

HEADS = ("score", "lm_head")  # never adapted: the LM head is tied to the embeddings, a scalar head is trained in full


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    """PEFT's `target_modules` of `--lora-target-modules`: names given as items, comma-separated or both (TRL's list
    and flywheel's older comma form); none, or `all-linear`, is every linear layer (the heads are excluded)."""
    items = [target_modules] if isinstance(target_modules, str) else target_modules
    names = [t.strip() for item in items for t in item.split(",") if t.strip()]
    return "all-linear" if names in ([], ["all-linear"]) else names


def apply_lora(
    model: torch.nn.Module, *, r: int, alpha: float, dropout: float, target_modules: str | list[str]
) -> None:
    """Inject LoRA adapters in place and freeze everything else (a `score` head stays trainable)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'flywheel[lora]'") from None
    targets = lora_targets(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, exclude_modules=list(HEADS)
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise UserError(f"LoRA: {str(err).splitlines()[0]}") from None
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Module):
        head.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)",
        r,
        alpha,
        targets,
        trainable,
        total,
        100 * trainable / total,
    )


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """name -> peft LoRA layer, for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: torch.nn.Module) -> bool:
    try:
        return bool(lora_layers(model))
    except ImportError:
        return False


@contextmanager
def disable_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: every adapter off inside the block (the LoRA reference policy)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_adapter(model: torch.nn.Module, out_dir: Path, base_model: str) -> Path:
    """The adapter alone as a PEFT directory (adapter_config.json + adapter_model.safetensors), loadable with
    `PeftModel.from_pretrained(AutoModelFor...(base_model), out_dir)`; written atomically. A reward model's trained
    `score` head goes with it (PEFT's `modules_to_save`): load its base with `num_labels=1`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from flywheel.utils import atomic_dir

    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = base_model
    state = {
        f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
    }
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Module):  # a reward model: its head trained in full, so it travels with the adapter
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["score"]
        state.update(
            {f"base_model.model.score.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        )
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"))
    return out_dir


def merged_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (keyed as `model.state_dict()`, possibly gathered from FSDP shards) with every adapter merged into its
    base weight: the keys and tensors of the plain model, W + scaling * B @ A."""
    out = dict(state)
    for name, layer in lora_layers(model).items():
        base = f"{name}.base_layer"
        for adapter in layer.active_adapters:
            a = out.pop(f"{name}.lora_A.{adapter}.weight").float()  # (r, in)
            b = out.pop(f"{name}.lora_B.{adapter}.weight").float()  # (out, r)
            delta = (b @ a) * layer.scaling[adapter]  # (out, in)
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            w = out[f"{base}.weight"]
            out[f"{base}.weight"] = (w.float() + delta).to(w.dtype)
        for key in [k for k in out if k.startswith(f"{name}.lora_")]:  # adapters that are not active
            out.pop(key)
        for key in [k for k in out if k.startswith(f"{base}.")]:
            out[name + key[len(base) :]] = out.pop(key)
    return out
