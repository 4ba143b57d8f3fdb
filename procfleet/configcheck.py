"""Collect every configuration problem with its key path, then report them all at once.

A message names the file, the key path or the line and column, and the kind of problem, but
never quotes what the file holds where that may be someone's secret: `--config /etc/shadow`
must not print a password hash. So a YAML syntax error is described by its kind with any text
from the file cut out (`yaml_problem`), and an unknown key is named only when it looks like a
setting name (`lisen`), else by its position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# An unknown key shaped like this is a mistyped setting and is quoted back; anything else
# (`root:$6$...`, a token) is named by its line and column only.
_SETTING_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,23}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def is_sha256_hex(text: str) -> bool:
    """True for a SHA-256 hex digest: 64 hex digits, either case (compare it lowercased)."""
    return bool(_SHA256_HEX.fullmatch(text))


class LocatedMapping(dict[Any, Any]):
    """A YAML mapping as parsed by `read_yaml`: a dict that knows where each key stood."""

    positions: dict[Any, tuple[int, int]]

    def position(self, key: Any) -> tuple[int, int] | None:
        """(line, column) of `key` in the file, both from 1; None when not known."""
        return getattr(self, "positions", {}).get(key)


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

    def top_mapping(self, data: Any, source: str) -> Mapping[str, Any]:
        """A whole file's parsed YAML as a mapping (empty for an empty file); anything else
        ends the check at once with ConfigError, since no key of it can be checked."""
        if data is None:
            return {}
        if isinstance(data, Mapping):
            return data
        self.add("", f"the top level must be a mapping, got {type(data).__name__}")
        raise ConfigError(source, self.items)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        expected = f"expected one of: {', '.join(sorted(allowed))}"
        for key in data:
            if key in allowed:
                continue
            if isinstance(key, str) and _SETTING_NAME.fullmatch(key):
                self.add(f"{path}.{key}" if path else key, f"unknown key ({expected})")
                continue
            at = data.position(key) if isinstance(data, LocatedMapping) else None
            where = f" at line {at[0]}, column {at[1]}" if at else ""
            self.add(path, f"unknown key{where}, not shown as it is not a setting name "
                           f"({expected})")

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

    def one_of(self, data: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str,
               path: str) -> str:
        """data[key] when it is one of `choices`, else note it (listing them) and default."""
        value: str = self.typed(data, key, str, default, path)
        if value not in choices:
            self.add(f"{path}.{key}" if path else key,
                     f"must be one of {', '.join(choices)}, got {value!r}")
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
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        raise ConfigError(source, [yaml_problem(exc)]) from None


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, building LocatedMapping for every mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    data = LocatedMapping()
    yield data  # as SafeConstructor does, so recursive structures resolve
    data.update(loader.construct_mapping(node))
    positions = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            positions[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        except TypeError:  # an unhashable key: construct_mapping has refused it already
            continue
    data.positions = positions


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)

# PyYAML quotes what it found in its messages: an alias, a tag, a character. A token kind
# ('<block end>') or one character is kept; longer text from the file is cut out.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_TOKEN_KIND = re.compile(r"<[a-z ]+>")
_ONE_CHAR = re.compile(r"[^\\]|\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[tnr0\\'\"])")


def _without_file_text(problem: str) -> str:
    def keep(match: re.Match[str]) -> str:
        quoted = match.group()
        inner = quoted[1:-1]
        if _TOKEN_KIND.fullmatch(inner) or _ONE_CHAR.fullmatch(inner):
            return quoted
        return "(text from the file, not shown)"

    return _QUOTED.sub(keep, problem)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`YAML syntax error at line L, column C: what` for a YAML error, without the file's text.

    PyYAML's own str() quotes the offending lines; this names the position and the kind of
    error only (a quoted alias or tag is cut out, one character is kept).
    """
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, say; no line known
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        return (f"YAML syntax error at character {exc.position + 1}: unacceptable character "
                f"U+{code:04X}")
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None)
    what = _without_file_text(problem) if problem else type(exc).__name__
    context = getattr(exc, "context", None)  # "while scanning a quoted scalar", say
    if context:
        what += f" ({_without_file_text(context)})"
    return f"YAML syntax error{where}: {what}"
