"""Parse the `{hostname}` path segment into a target and resolve it against the exporters.

Pure functions over plain values, no I/O:

    >>> parse_target("group:web,dc:us-east")
    Target(kind='selectors', hostname=None, selectors=(Selector(key='group', value='web'), ...))
    >>> [e.hostname for e in resolve(parse_target("group:web"), exporters)]
    ['web-01', 'web-02']

The forms (docs/api.md#targets): a literal hostname (unicast), `_any` (unicast, any one
healthy exporter), `_all` (broadcast), `key:value` and comma-joined selectors (broadcast, all
must match; a value matches a label equal to it or beginning with it plus a dot).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from procfleet.hostnames import RESERVED_PREFIX, hostname_problem

ANY = "_any"
ALL = "_all"

# A key is one segment; a value is one or more segments joined by dots.
SEGMENT = r"[A-Za-z0-9_-]+"
_KEY_RE = re.compile(SEGMENT)
_VALUE_RE = re.compile(rf"{SEGMENT}(?:\.{SEGMENT})*")

TargetKind = Literal["hostname", "any", "all", "selectors"]


class TargetError(ValueError):
    """A `{hostname}` segment that is not valid target syntax; the message says why."""


@dataclass(frozen=True)
class Selector:
    """`key:value` — matches a label `key` equal to `value` or starting with `value.`."""

    key: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        label = labels.get(self.key)
        if label is None:
            return False
        return label == self.value or label.startswith(self.value + ".")

    def __str__(self) -> str:
        return f"{self.key}:{self.value}"


@dataclass(frozen=True)
class Target:
    """A parsed target: what the client asked for, before looking at any exporter."""

    kind: TargetKind
    hostname: str | None = None
    selectors: tuple[Selector, ...] = ()

    @property
    def unicast(self) -> bool:
        """True when the answer is about one exporter (a hostname or `_any`)."""
        return self.kind in ("hostname", "any")

    def __str__(self) -> str:
        if self.kind == "hostname":
            return self.hostname or ""
        if self.kind == "any":
            return ANY
        if self.kind == "all":
            return ALL
        return ",".join(str(s) for s in self.selectors)


class Labelled(Protocol):
    """Anything with a hostname and labels (an exporter, as discovery knows it)."""

    @property
    def hostname(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


E = TypeVar("E", bound=Labelled)


def is_label_key(text: str) -> bool:
    """True when `text` is a valid label key (one segment)."""
    return bool(_KEY_RE.fullmatch(text))


def is_label_value(text: str) -> bool:
    """True when `text` is a valid label value (dot-separated segments)."""
    return bool(_VALUE_RE.fullmatch(text))


def parse_target(text: str) -> Target:
    """Parse a `{hostname}` path segment, raising TargetError naming what is wrong."""
    shown = repr(text[:64])
    if not text:
        raise TargetError("target must not be empty")
    if text == ANY:
        return Target("any")
    if text == ALL:
        return Target("all")
    if ":" in text or "," in text:
        return Target("selectors", selectors=_parse_selectors(text))
    if text.startswith(RESERVED_PREFIX):
        raise TargetError(
            f"target {shown} is reserved: names beginning with '_' are only {ANY} and {ALL}"
        )
    why = hostname_problem(text)
    if why is not None:
        raise TargetError(f"target {shown} is not a hostname: {why}")
    return Target("hostname", hostname=text)


def _parse_selectors(text: str) -> tuple[Selector, ...]:
    selectors = []
    for position, part in enumerate(text.split(","), start=1):
        where = f"selector {position} ({part[:64]!r})"
        if not part:
            raise TargetError(
                f"selector {position} is empty: selectors are joined by single commas")
        key, sep, value = part.partition(":")
        if not sep:
            raise TargetError(f"{where} must be key:value")
        if not _KEY_RE.fullmatch(key):
            raise TargetError(f"{where} has an invalid key: use letters, digits, '-' and '_'")
        if not _VALUE_RE.fullmatch(value):
            raise TargetError(
                f"{where} has an invalid value: dot-separated segments of letters, digits, "
                "'-' and '_'"
            )
        selectors.append(Selector(key, value))
    return tuple(selectors)


def resolve(target: Target, exporters: Iterable[E]) -> list[E]:
    """The exporters a target names, in the order given (callers pass them by hostname).

    `_any` resolves to every candidate; the fan-out picks which one it actually asks.
    """
    if target.kind in ("all", "any"):
        return list(exporters)
    if target.kind == "hostname":
        return [e for e in exporters if e.hostname == target.hostname]
    return [e for e in exporters if all(s.matches(e.labels) for s in target.selectors)]
