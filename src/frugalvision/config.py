"""Dataclass configs from YAML files plus ``key=value`` overrides, with type checking.

Every command and method of the package is configured by a dataclass. :func:`build_config` fills one
from (in increasing priority) its defaults, a YAML file and command-line overrides such as
``optim.lr=0.01``, checking each key and coercing each value to the declared type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

__all__ = ["build_config", "check_number", "config_to_dict", "load_yaml", "parse_overrides"]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with a clear error for a missing or malformed file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"; _ = p.write_text("epochs: 3")
        >>> load_yaml(p)
        {'epochs': 3}
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


class _Override(str):
    """A command-line value: the raw text (used for string fields) plus its YAML reading (used otherwise)."""

    parsed: Any

    def __new__(cls, raw: str, parsed: Any) -> _Override:
        obj = super().__new__(cls, raw)
        obj.parsed = parsed
        return obj


def _plain(v: Any) -> Any:
    return v.parsed if isinstance(v, _Override) else v


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into a nested dict; values are read as YAML scalars.

    String-typed config fields receive the text exactly as typed (``name=007`` stays ``"007"``).

    Example:
        >>> {k: _plain(v) for k, v in parse_overrides(["epochs=3", "lr=1e-3", "name=vit"]).items()}
        {'epochs': 3, 'lr': 0.001, 'name': 'vit'}
    """
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 1e-3 as a string; accept the usual float spellings.
        if isinstance(value, str) and any(c in value for c in ".eE") and not value.isalpha():
            with contextlib.suppress(ValueError):
                value = float(value)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _Override(raw.strip(), value)
    return out


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = get_origin(tp)
    if isinstance(value, _Override):
        text_field = tp in (str, Path) or (origin is Literal and all(isinstance(c, str) for c in get_args(tp)))
        if text_field:
            value = str(value)
        elif origin not in (Union, types.UnionType):
            value = value.parsed
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if _plain(value) is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, Sequence):
            value = [value]
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "on", "1", "false", "no", "off", "0"}:
            return value.lower() in {"true", "yes", "on", "1"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, Mapping | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}; valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    # nested dataclass fields given partially: fill from defaults
    for name, f in fields.items():
        tp = hints[name]
        if name in kwargs and dataclasses.is_dataclass(tp) and isinstance(values.get(name), Mapping):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            merged = _deep_merge(config_to_dict(default), values[name])
            kwargs[name] = _build(tp, merged, prefix=f"{prefix}{name}.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc


def build_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> T:
    """Build a dataclass config from defaults, an optional YAML file and ``key=value`` overrides.

    Args:
        cls: The dataclass type to build.
        config_file: Optional YAML file with a mapping of (possibly nested) keys.
        overrides: ``["key=value", "nested.key=value"]`` strings or an already-parsed mapping.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On unknown keys, values of the wrong type or a malformed file.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class C:
        ...     epochs: int = 1
        ...     lr: float = 0.1
        >>> build_config(C, overrides=["epochs=5"])
        C(epochs=5, lr=0.1)
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values = load_yaml(config_file)
    parsed = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    values = _deep_merge(values, parsed)
    return _build(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turn a (nested) dataclass config into plain YAML-serialisable Python values.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class C:
        ...     path: Path = Path("runs")
        >>> config_to_dict(C())
        {'path': 'runs'}
    """

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``value`` is a finite number within the bounds.

    Args:
        key: The configuration key, for the message.
        value: The value to check (NaN and infinities are always refused).
        low: Smallest allowed value (excluded with ``low_open``).
        high: Largest allowed value (excluded with ``high_open``).
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        hint: Appended to the message (e.g. what to do instead).

    Example:
        >>> check_number("lr", 0.1, 0, 10, low_open=True)
        >>> check_number("lr", float("nan"), 0, 10, low_open=True)
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: lr must be > 0 and <= 10, got nan
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    conds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    conds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
    raise ConfigError(f"{key} must be {' and '.join(conds) or 'a finite number'}, got {value!r}{hint}")
