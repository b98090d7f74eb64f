"""Typed configs: dataclass fields are the YAML keys and the CLI flags.

`aft infer --config x.yaml --n 4` reads x.yaml, then lets each flag given on
the command line override it (the `trl sft --config` convention). Unknown keys
and bad values are AftErrors that name the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

import yaml

from .errors import AftError


def opt(default, help: str, flags: tuple[str, ...] = (), choices=None, cli: bool = True):
    """A config field with its help text, extra CLI flags (e.g. "-k") and allowed values."""
    meta = {"help": help, "flags": flags, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """(python type, optional?) of a field annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    return (origin or tp), False


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field: --field_name and --field-name (plus any short flags). Defaults are not
    set here, so that only the flags a user typed override the config file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        tp, _ = _base_type(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        names += list(f.metadata.get("flags", ()))
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f))
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif tp is list:
            parser.add_argument(*names, nargs="*", **kw)
        else:
            parser.add_argument(*names, type=tp if tp in (int, float) else str,
                                choices=f.metadata.get("choices"), **kw)


def _help(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} (default: {default!r})"


def load_yaml(path: str | Path) -> dict:
    from .io import read_text

    path = Path(path)
    text = read_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise AftError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AftError(f"{path}: a config file must be a mapping of keys to values")
    return data


def build(cls, values: dict, source: str = "config"):
    """Make a `cls` from a flat dict, checking every key and coercing every value."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = [n for n in names if n.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise AftError(f"{source}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], names[key], source)
    return cls(**kwargs)


def _coerce(value, annotation, f, source):
    tp, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise AftError(f"{source}: key {f.name!r} may not be empty")
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = tp(value)
    except (TypeError, ValueError):
        raise AftError(f"{source}: key {f.name!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise AftError(f"{source}: key {f.name!r} must be one of {', '.join(map(str, choices))}, got {out!r}")
    return out


def from_sources(cls, config_file: str | None, flags: dict, normalize=None):
    """File values, then flags on top. `normalize` maps a raw YAML dict to flat field names."""
    values = {}
    if config_file:
        raw = load_yaml(config_file)
        values.update(normalize(raw, str(config_file)) if normalize else raw)
    cfg = build(cls, values, source=str(config_file) if config_file else "config")
    return dataclasses.replace(cfg, **{k: _coerce(v, typing.get_type_hints(cls)[k], _field(cls, k), "command line")
                                       for k, v in flags.items()})


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint(d: dict) -> str:
    """A short stable hash of a config dict (used to name and check resumable outputs)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
