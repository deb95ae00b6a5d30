"""Typed configs <-> CLI flags and YAML.

Each stage has one dataclass; a field is documented once in `metadata={"help": ...}`. The field name is the YAML key
and, in kebab case, the CLI flag (`max_steps` <-> `--max-steps`). Precedence: defaults < `--config FILE.yaml` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flywheel.errors import UserError

T = TypeVar("T")


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
        if scalar is float and isinstance(value, int | float | str):
            return float(value)
        if scalar is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if scalar is int and isinstance(value, str):
            return int(value)
        if scalar is str:
            return str(value)
        if scalar is list or typing.get_origin(scalar) is list:
            if not isinstance(value, list):
                raise TypeError
            return list(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        pass
    if isinstance(value, scalar):
        return value
    raise UserError(f"config field '{name}' must be {scalar.__name__}, got {value!r}")


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with config fields (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or "stage" in f.metadata:  # a mapping of another config's fields: the caller adds its flags
            continue
        flag = "--" + f.name.replace("_", "-")
        scalar, _ = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        if scalar is bool:
            parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", help=help_text, dest=f.name)
        elif scalar is list or typing.get_origin(scalar) is list:
            parser.add_argument(flag, nargs="*", help=help_text, dest=f.name)
        else:
            parser.add_argument(flag, metavar=scalar.__name__.upper(), help=help_text, dest=f.name)
    return parser


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}")
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
    if config_file is not None:
        values.update(load_yaml(config_file))
    values.update(args)
    return config_from_dict(cls, values, source=config_file or "flags")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError("config file does not exist", path=str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(
            f"bad YAML: {getattr(err, 'problem', err)}", path=str(p), line=mark.line + 1 if mark else None
        ) from None
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of field: value", path=str(p))
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    from flywheel.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
