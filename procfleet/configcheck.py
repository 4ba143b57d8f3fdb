"""Collect every configuration problem with its key path, then report them all at once."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Configuration is invalid; `problems` lists `key.path: what is wrong` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class Problems:
    """An accumulator of configuration problems, each tied to a key path."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: str) -> None:
        if self.items:
            raise ConfigError(source, self.items)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.add(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def typed(self, data: Mapping[str, Any], key: str, kinds: type | tuple[type, ...],
              default: Any, path: str) -> Any:
        """data[key] when it is of `kinds` (bools are not numbers), else note it and default."""
        where = f"{path}.{key}" if path else key
        if key not in data or data[key] is None:
            return default
        value = data[key]
        kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds_t:
            self.add(where, f"must be {_kind_names(kinds_t)}, got a boolean")
            return default
        if not isinstance(value, kinds_t):
            self.add(where, f"must be {_kind_names(kinds_t)}, got {type(value).__name__}")
            return default
        return value

    def number(self, data: Mapping[str, Any], key: str, default: float, path: str,
               *, minimum: float = 0.0, exclusive: bool = True) -> float:
        value = self.typed(data, key, (int, float), default, path)
        where = f"{path}.{key}" if path else key
        if (value <= minimum) if exclusive else (value < minimum):
            self.add(where, f"must be {'>' if exclusive else '>='} {minimum}, got {value}")
            return default
        return float(value)


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely, turning I/O and syntax errors into a ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}YAML syntax error: {problem}"]) from None
