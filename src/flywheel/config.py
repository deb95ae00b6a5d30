"""Typed configs <-> CLI flags and YAML.

Each stage has one dataclass; a field is documented once in `metadata={"help": ...}`. The field name is the YAML key
and, in kebab case, the CLI flag (`max_steps` <-> `--max-steps`). Precedence: defaults < `--config FILE.yaml` < flags.

Coming from TRL: every flag is also accepted in snake case (`--max_steps`), and TRL's names for the same settings
(`TRL_ALIASES`: `--learning_rate` for `--lr`, ...) work as flags and as YAML keys wherever the config has the field
they stand for. They are not listed in `--help`; docs/trl.md has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from flywheel.errors import UserError
from flywheel.utils import read_text

T = TypeVar("T")

# TRL / transformers.TrainingArguments name -> flywheel field (the same setting under another name).
TRL_ALIASES: dict[str, str] = {
    "model_name_or_path": "model",
    "sft_model_path": "model",
    "reward_model_path": "reward_model",
    "dataset_name": "data",
    "output_dir": "out",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "adam_epsilon": "adam_eps",
    "max_seq_length": "max_length",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "num_ppo_epochs": "ppo_epochs",
    "response_length": "max_new_tokens",
    "chat_template_path": "chat_template",
    "torch_dtype": "dtype",
    "model_revision": "revision",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_dataset_split",
    "loss_type": "loss",  # dpo: sigmoid, ipo (TRL's GRPO loss_type is an aggregation: rl has no `loss`)
}


def flag_aliases(name: str, fields: set[str]) -> list[str]:
    """The hidden spellings of the flag of field `name`: snake case, and the TRL names of the same setting (unless
    one is itself a field of the config)."""
    out = ["--" + name] if "_" in name else []
    return out + ["--" + a for a, target in TRL_ALIASES.items() if target == name and a not in fields]


def _field_type(tp: Any) -> tuple[type, bool]:
    """Return (scalar type, optional) for `int`, `int | None`, `Optional[int]`, ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {tp}")
        return _field_type(args[0])[0], True
    if origin is typing.Literal:
        return str, False
    return tp, False


def is_list_field(tp: Any) -> bool:
    """Whether a config field of type `tp` holds a list (`list`, `list[str]`, `list[float] | None`): its flag takes
    several values."""
    scalar, _ = _field_type(tp)
    return scalar is list or typing.get_origin(scalar) is list


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def coerce_value(name: str, value: Any, tp: Any) -> Any:
    """`value` (from YAML or a flag) as a config field of type `tp`; a UserError naming the field if it is not one."""
    scalar, optional = _field_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config field '{name}' may not be null")
    try:
        if scalar is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if scalar is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):  # NaN passes every `>= 0` check and poisons a run quietly
                raise UserError(f"config field '{name}' must be a finite number, got {value!r}")
            return number
        if scalar is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if scalar is int and isinstance(value, str):
            return int(value)
        if scalar is str and not isinstance(value, list | dict):  # a YAML list is no name, not even as its repr
            return str(value)
        if is_list_field(scalar):
            (item_type,) = typing.get_args(scalar) or (None,)  # list[float] from a flag: its items are text
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if isinstance(value, str) or (number and item_type in (int, float)):
                value = [value]  # YAML `report_to: wandb`, `reward_weights: 2`: a one-item list
            if not isinstance(value, list):
                raise TypeError
            if item_type is None:
                return list(value)
            return [coerce_value(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        pass
    plain = isinstance(scalar, type) and not is_list_field(scalar)  # list[str] is no type isinstance can check
    if plain and isinstance(value, scalar) and not (isinstance(value, bool) and scalar is not bool):
        return value  # (a YAML true is no batch size, though bool is an int to Python)
    raise UserError(f"config field '{name}' must be {getattr(scalar, '__name__', scalar)}, got {value!r}")


class FlagParser(argparse.ArgumentParser):
    """argparse for the trainers' flags: a mistake is a one-line error (a UserError, exit code 2) that names the flag
    and the closest real one, not the whole usage; and no abbreviations (`--data` must not silently mean `--dataset-
    config`, or become ambiguous when a flag is added)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        wrong = [w for w in message.split(": ", 1)[-1].split() if w.startswith("--")]
        close = self.closest(wrong[0].split("=")[0]) if wrong else None
        hint = f"did you mean {close}? " if close else ""
        raise UserError(f"{message} ({hint}`{self.prog} --help` lists the flags)")

    def closest(self, flag: str) -> str | None:
        """The flag `flag` most likely meant: the one it abbreviates (`--temp`: `--temperature`), else the closest
        spelling among every name (TRL's too: `--learnin-rate` is `--learning_rate`); a snake-case spelling is given
        by its documented kebab-case one (`--fewshot`: `--few-shot`, not `--few_shot`)."""
        import difflib

        def kebab(option: str) -> str:
            return "--" + option[2:].replace("_", "-")

        dest = {o: a.dest for a in self._actions for o in a.option_strings if o.startswith("--")}
        named = {o: kebab(o) if dest.get(kebab(o)) == d else o for o, d in dest.items()}
        starts = {named[o] for o in named if o.startswith(flag)}
        if len(starts) == 1:
            return starts.pop()
        close = difflib.get_close_matches(flag, list(named), n=1, cutoff=0.75)
        return named[close[0]] if close else None


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = FlagParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        epilog="Flags are also accepted in snake case and under their TRL names (--learning_rate, --output_dir, ...: "
        "docs/trl.md).",
    )
    parser.add_argument("--config", help="YAML file with config fields (flags override it)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for f in dataclasses.fields(cls):
        if not f.init or "stage" in f.metadata:  # a mapping of another config's fields: the caller adds its flags
            continue
        flag = "--" + f.name.replace("_", "-")
        hidden = flag_aliases(f.name, names)
        scalar, _ = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if "(default:" not in help_text:  # a help text may say its default in words ("the preset's")
            help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        if scalar is bool:
            kind: dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif is_list_field(scalar):
            kind = {"nargs": "*", "action": "extend"}  # `--reward-fn a --reward-fn b` is both, not the last
        else:
            kind = {"metavar": scalar.__name__.upper()}
        parser.add_argument(flag, help=help_text, dest=f.name, **kind)
        if hidden:
            parser.add_argument(*hidden, help=argparse.SUPPRESS, dest=f.name, **kind)
    return parser


def resolve_aliases(values: dict[str, Any], names: set[str], source: str) -> dict[str, Any]:
    """`values` with TRL names (`learning_rate`) renamed to the fields they stand for (`lr`)."""
    out = dict(values)
    for alias, target in TRL_ALIASES.items():
        if alias in out and alias not in names and target in names:
            if target in out:
                raise UserError(f"{source}: both '{target}' and its TRL name '{alias}' are given")
            out[target] = out.pop(alias)
    return out


def closest_fields(unknown: list[str], names: set[str]) -> str:
    """The hint after unknown keys that are near misses of a field (or of its TRL name): ` (max_step: did you mean
    max_steps?)`, else nothing."""
    import difflib

    known = sorted(names | {alias for alias, target in TRL_ALIASES.items() if target in names})
    hints = [f"{u}: did you mean {m[0]}?" for u in unknown if (m := difflib.get_close_matches(str(u), known, n=1))]
    return f" ({'; '.join(hints)})" if hints else ""


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = resolve_aliases(values, names, source)
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}{closest_fields(unknown, names)}")
    kwargs = {k: coerce_value(k, v, hints[k]) for k, v in values.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise UserError(f"{source}: {err}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` and flags. Raises UserError on a bad value."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:  # TRL names in the file first, so that a flag overrides the key under either name
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        values.update(resolve_aliases(load_yaml(config_file), names, config_file))
        hints = typing.get_type_hints(cls)
        for key, value in values.items():  # a bad value in the file is the file's error, named as such
            if key in hints and key not in args:
                try:
                    coerce_value(key, value, hints[key])
                except UserError as err:
                    raise UserError(err.message, path=config_file) from None
    values.update(args)
    return config_from_dict(cls, values, source=config_file or "flags")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError("a directory, not a config file", path=str(p))
    if not p.is_file():
        raise UserError("config file does not exist", path=str(p))
    try:
        data = yaml.safe_load(read_text(p)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(
            f"bad YAML: {getattr(err, 'problem', err)}", path=str(p), line=mark.line + 1 if mark else None
        ) from None
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of field: value", path=str(p))
    keys = [k for k in data if not isinstance(k, str)]
    if keys:
        raise UserError(f"a config file's fields are names, not {keys[0]!r}", path=str(p))
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    from flywheel.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
