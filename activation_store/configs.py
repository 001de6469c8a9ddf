"""Configs written once: a dataclass is the single source of a job's settings.

A job's settings are a `@dataclass` deriving from `Config`, with a docstring per field (a string
literal right after the field, as in PEP 257's attribute docstrings). From that one declaration come:

- the command line: `add_config_arguments(parser, Cls)` adds one flag per field (`--batch-size` for
  `batch_size`, or `setting(flag=...)`), its help text (the field's docstring and its default), its type,
  choices and range; `config_from_args(Cls, args)` builds the config back;
- the JSON round trip: `to_dict()` / `Cls.from_dict(d)`; an unknown key is a `ConfigError` naming the
  key and the closest valid one (the one `from_dict` behaviour of the project);
- validation: `validate()` checks every field's declared range and choices and names the flag that
  sets it; subclasses add their cross-field checks after `super().validate()`;
- resume checks: `config_diff(old, new, flags)` lists every differing field with the flag that sets it.

    @dataclass
    class FitConfig(Config):
        k: int = setting(100, gt=0)
        '''Number of features.'''
        method: str = setting("snmf", choices=("snmf", "pca"))
        '''Which factorization to fit.'''
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any, Mapping, Sequence

from featureatlas.activation_store.errors import ConfigError

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, flag: str | None = None, choices: Sequence | None = None,
            gt: float | None = None, ge: float | None = None, le: float | None = None, lt: float | None = None,
            cli: bool = True, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with its command-line flag, choices and allowed range declared once."""
    meta = {"flag": flag, "choices": tuple(choices) if choices is not None else None, "gt": gt, "ge": ge, "le": le,
            "lt": lt, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal that follows each field in the class body (MRO merged)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


_hints = lru_cache(maxsize=None)(typing.get_type_hints)  # {field: type} of a config class


def flag_of(cls: type, name: str) -> str:
    """The command-line flag that sets field `name` of `cls`."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def flags_of(*classes: type) -> dict[str, str]:
    """{field name: flag} over several config classes (for `config_diff`)."""
    return {f.name: flag_of(c, f.name) for c in classes for f in dataclasses.fields(c)
            if f.metadata.get("cli") is not False}


def _plain(value):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Config:
    """Base of every dataclass config: JSON round trip, one `from_dict`, declared-range validation."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping, *, where: str | None = None, ignore: Sequence[str] = ()):
        """Build from a dict; an unknown key is a ConfigError naming it and the closest valid key.

        `ignore`: keys that may be present and are skipped (e.g. records written beside the settings).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in fields and k not in ignore]
        if unknown:
            key = unknown[0]
            by_flag = {flag_of(cls, n).lstrip("-").replace("-", "_"): n for n in fields}
            close = ([by_flag[key]] if key in by_flag else
                     difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                     or [n for n in fields if n.startswith(key) or key.startswith(n)][:1]
                     or difflib.get_close_matches(key, fields, n=1, cutoff=0.4))
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown setting {key!r} in {where or cls.__name__}{hint}")
        hints = _hints(cls)
        kwargs = {}
        for name, value in d.items():
            if name not in fields:
                continue
            tp = hints.get(name)
            if isinstance(tp, type) and issubclass(tp, Config) and isinstance(value, Mapping):
                value = tp.from_dict(value, where=f"{where or cls.__name__}.{name}")
            elif isinstance(value, list) and typing.get_origin(tp) is tuple:
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Check every field's declared choices and range; raise ConfigError naming the flag and the fix."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            flag = flag_of(type(self), f.name)
            if choices and value not in choices:
                raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")
            for key, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                                  ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
                bound = f.metadata.get(key)
                if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
                    raise ConfigError(f"{flag} must be {word} {bound:g} (got {value!r})")
            if isinstance(value, Config):
                value.validate()
        return self


@dataclasses.dataclass(kw_only=True)
class RunOptions(Config):
    """How a job treats its run directory (--out); the run layer (activation_store/runs.py) acts on them."""

    resume: bool = setting(False)
    """Continue the run already in --out (its settings must match; only what is missing is done)."""
    overwrite: bool = setting(False)
    """Replace a run already in --out."""
    progress: bool = setting(True)
    """Show progress bars."""


def _parse_scalar(tp, flag: str):
    def parse(text: str):
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {tp.__name__}, got {text!r}") from None
    parse.__name__ = tp.__name__
    return parse


def add_config_arguments(parser, cls: type, *, skip: Sequence[str] = (), defaults: Mapping | None = None,
                         title: str | None = None, prefix: str = "") -> None:
    """Add one flag per field of `cls` (help from its docstring, with the default), onto `parser`.

    `skip`: fields the command sets itself; `defaults`: command-specific defaults overriding the class's;
    `prefix`: flags `--<prefix>-<field>` (for several configs with the same field names in one command;
    read them back with the same prefix in `config_from_args`).
    """
    target = parser.add_argument_group(title) if title else parser
    docs, hints, defaults = field_docs(cls), _hints(cls), defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = hints.get(f.name, str)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))  # `int | None`: an optional int
        flag = f"--{prefix}-{f.name.replace('_', '-')}" if prefix else flag_of(cls, f.name)
        required = f.name not in defaults and f.default is _MISSING and f.default_factory is _MISSING
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = None if required else f.default
        shown = "required" if required else f"default: {default!r}" if isinstance(default, str) else \
            f"default: {list(default) if isinstance(default, tuple) else default}"
        help_text = f"{docs.get(f.name, '')} ({shown})".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f"{prefix}_{f.name}" if prefix else f.name, "default": default,
                                  "help": help_text, "required": required}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata.get("choices"))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):  # tuple[X, ...] / list[X]: one or more X
            item = next((a for a in typing.get_args(tp) if a is not Ellipsis), str)
            kwargs.update(nargs="+", type=_parse_scalar(item, flag))
        elif tp in (int, float, str):
            kwargs["type"] = _parse_scalar(tp, flag) if tp is not str else str
        target.add_argument(flag, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides):
    """The config whose fields come from parsed `args` (fields absent from args keep their defaults)."""
    dest = (lambda name: f"{prefix}_{name}") if prefix else (lambda name: name)  # noqa: E731
    values = {f.name: getattr(args, dest(f.name)) for f in dataclasses.fields(cls) if hasattr(args, dest(f.name))}
    return cls.from_dict({**values, **overrides})  # from_dict turns the lists argparse gives into tuples


def leaves(value, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf} of nested mappings; a list of mappings is indexed like a mapping (`saes.0.k`)."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        value = dict(enumerate(value))
    if isinstance(value, Mapping):
        return {key: leaf for k, v in value.items() for key, leaf in leaves(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: value}


def config_diff(old: Mapping, new: Mapping, flags: Mapping[str, str] | None = None) -> list[str]:
    """Lines `key: old -> new (flag)` for every differing leaf of two nested settings records.

    A key is a dotted path (`saes.0.k`); its flag is looked up by the last path component in `flags`.
    """
    a, b = leaves(dict(old)), leaves(dict(new))
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            flag = (flags or {}).get(key.rsplit(".", 1)[-1])
            lines.append(f"{key}: {va!r} -> {vb!r}" + (f" (set by {flag})" if flag else ""))
    return lines


__all__ = ["Config", "RunOptions", "add_config_arguments", "config_diff", "config_from_args", "field_docs", "flag_of", "flags_of",
           "setting"]
