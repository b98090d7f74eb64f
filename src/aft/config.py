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


def opt(default, help: str, flags: tuple[str, ...] = (), choices=None, cli: bool = True, *, ge=None, gt=None,
        le=None, lt=None, run: bool = False, secret: bool = False, group: str | None = None):
    """A config field: its help text, extra CLI flags (e.g. "-k"), allowed values and bounds (ge >=, gt >,
    le <=, lt <), checked by `build` with errors that name the file and the key. `run=True`: the setting
    changes how a run goes (batch size, device, ...), not what it writes, so a resumed run may differ in it
    (see manifest.py). `secret=True`: never written to disk (API keys). `group`: the --help section."""
    meta = {"help": help, "flags": flags, "choices": choices, "cli": cli, "bounds": (ge, gt, le, lt),
            "run": run or secret, "secret": secret, "group": group}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def alias(cls, name: str, *flags: str, default=dataclasses.MISSING):
    """Field `name` of config `cls` again, with more flags (and another default): e.g. the judge's
    engine options take --judge_model as well as --model."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**f.metadata, "flags": tuple(f.metadata.get("flags", ())) + flags}
    return dataclasses.field(default=f.default if default is dataclasses.MISSING else default, metadata=meta)


def _base_type(tp):
    """(python type, optional?) of a field annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    return (origin or tp), False


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field: --field_name and --field-name (plus any short flags). Defaults are not
    set here, so that only the flags a user typed override the config file. Fields a config takes
    from a shared type (engine options, sampling settings) are grouped under that type's title."""
    hints = typing.get_type_hints(cls)
    groups: dict = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        title = f.metadata.get("group")
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title] if title else parser
        tp, _ = _base_type(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        names += list(f.metadata.get("flags", ()))
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f))
        if tp is bool:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif tp in (list, tuple):
            target.add_argument(*names, nargs="*", **kw)
        else:
            target.add_argument(*names, type=tp if tp in (int, float) else str,
                                choices=f.metadata.get("choices"), **kw)


def _help(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")


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
    """Make a `cls` from a flat dict, checking every key and coercing and checking every value."""
    return _build(cls, {k: (v, source) for k, v in values.items()})


def _build(cls, values: dict):
    """`values`: key -> (value, where it came from: a config file or "command line"). A config class may
    define `expand_values(values)` (fill keys from a preset, see sampling.py) and `check()` (how keys go
    together); bounds and choices are the fields' own (opt)."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    expand = getattr(cls, "expand_values", None)
    if expand:
        values = expand(values)
    kwargs = {}
    for key, (value, source) in values.items():
        if key not in names:
            close = [n for n in names if n.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise AftError(f"{source}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], names[key], source)
    cfg = cls(**kwargs)
    check = getattr(cfg, "check", None)
    if check:
        check()
    return cfg


def _name(f, source: str) -> str:
    return f"--{f.name}" if source == "command line" else f"{source}: key {f.name!r}"


def _coerce(value, annotation, f, source):
    tp, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise AftError(f"{_name(f, source)} may not be empty")
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp in (list, tuple):
            return tp(value) if isinstance(value, (list, tuple)) else tp([value])
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError  # YAML `n: true` is not the number 1
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp in (int, float, str) and isinstance(value, (list, dict)):
            raise ValueError
        out = tp(value)
    except (TypeError, ValueError):
        raise AftError(f"{_name(f, source)} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise AftError(f"{_name(f, source)} must be one of {', '.join(map(str, choices))}, got {out!r}")
    ge, gt, le, lt = f.metadata.get("bounds", (None,) * 4)
    for bound, ok, word in ((ge, lambda b: out >= b, ">="), (gt, lambda b: out > b, ">"),
                            (le, lambda b: out <= b, "<="), (lt, lambda b: out < b, "<")):
        if bound is not None and not ok(bound):
            raise AftError(f"{_name(f, source)} must be {_bounds_text(ge, gt, le, lt)}, got {out!r}")
    return out


def _bounds_text(ge, gt, le, lt) -> str:
    low = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else ""
    high = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else ""
    if low and high:
        return f"in {'[' if ge is not None else '('}{ge if ge is not None else gt}, " \
               f"{le if le is not None else lt}{']' if le is not None else ')'}"
    return low or high


def from_sources(cls, config_file: str | None, flags: dict, normalize=None):
    """File values, then flags on top, checked as one config (errors name the file or the flag).
    `normalize` maps a raw YAML dict to flat field names."""
    values = {}
    if config_file:
        raw = load_yaml(config_file)
        src = str(config_file)
        values.update({k: (v, src) for k, v in (normalize(raw, src) if normalize else raw).items()})
    values.update({k: (v, "command line") for k, v in flags.items()})
    return _build(cls, values)


def to_dict(cfg) -> dict:
    """Every setting but the secret ones (what a run records beside its output)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get("secret")}


def output_settings(cfg) -> dict:
    """The settings that change what a run writes (every field not declared `run=True`)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get("run")}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def fingerprint(d: dict) -> str:
    """A short stable hash of a config dict (used to name and check resumable outputs)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
