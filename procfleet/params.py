"""Query parameters, one rule for both services: which are taken, and the list filters' grammar.

Pure functions over plain values (no web framework), so the exporter, the query service and
the command-line client check a filter the same way:

    >>> parse_list_filters(single_values({"sort": "cpu", "limit": "5"}, LIST_PARAMS))
    ListFilters(name=None, user=None, sort='cpu', limit=5)

The rule for every endpoint of both services: a parameter the endpoint does not document, or
one given more than once, is refused (a 400 naming it), never ignored. An ignored `?limt=5`
would answer a different question than the one asked, and a repeated `?sort=` would leave the
answer to whichever copy a framework keeps.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

SORT_KEYS = ("cpu", "mem", "rss", "start", "cpu_recent")
LIST_LIMIT_MAX = 100_000
FILTER_MAX_LENGTH = 256
# GET /process on the exporter and GET /node/{target}/process on the query service.
LIST_PARAMS = ("name", "user", "sort", "limit")
# GET /process/{pid} on the exporter and GET /node/{target}/process/{pid} on the query service.
LOOKUP_PARAMS = ("expand", "tree", "start_time")
# The groups `?expand=` takes (procfleet.process.EXPAND_GROUPS says what each adds); `all` asks
# for every one.
EXPAND_NAMES = ("basic", "fds", "io", "exe", "cgroup", "sockets", "children", "limits", "environ")
EXPAND_ALL = "all"
TREE_MAX = 3  # generations of descendants `?tree=` may ask for
_EXPAND_MAX_LENGTH = 256
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                      r"(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")
# Longer than this is not worth int(): Python refuses 4,300 digits and more with a ValueError.
_LIMIT_MAX_DIGITS = len(str(LIST_LIMIT_MAX))
_SHOWN = 32  # characters of a bad value or name quoted back in a message


class ParamError(ValueError):
    """A query parameter that is unknown, repeated or invalid; `parameter` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class ListFilters:
    """The filters of a process list: name (exact or glob), user, sort key, and limit."""

    name: str | None = None
    user: str | None = None
    sort: str | None = None
    limit: int | None = None

    def to_params(self) -> dict[str, str]:
        """The filters as query parameters, as the exporters take them (unset ones left out)."""
        pairs = (("name", self.name), ("user", self.user), ("sort", self.sort),
                 ("limit", None if self.limit is None else str(self.limit)))
        return {key: value for key, value in pairs if value is not None}


def single_values(params: Mapping[str, str | list[str]], allowed: Collection[str]
                  ) -> dict[str, str]:
    """`params` (as a framework parsed them: a list for a repeated name) with one value each.

    Raises ParamError for the first parameter not in `allowed` or given more than once.
    """
    values: dict[str, str] = {}
    for name, value in params.items():
        if name not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise ParamError(name, f"unknown parameter {name[:_SHOWN]!r} "
                                   f"(this endpoint takes: {known})")
        if not isinstance(value, str):
            raise ParamError(name, f"{name} is given more than once")
        values[name] = value
    return values


def check_text(name: str, value: str) -> str:
    """A name or user filter: 1 to FILTER_MAX_LENGTH characters."""
    if not value or len(value) > FILTER_MAX_LENGTH:
        raise ParamError(name, f"{name} must be 1 to {FILTER_MAX_LENGTH} characters")
    return value


def check_sort(value: str) -> str:
    """A sort key: one of SORT_KEYS."""
    if value not in SORT_KEYS:
        raise ParamError("sort", f"sort must be one of {', '.join(SORT_KEYS)}, "
                                 f"got {value[:_SHOWN]!r}")
    return value


def check_limit(value: str) -> int:
    """A limit: ASCII decimal digits for 1 to LIST_LIMIT_MAX (`٣` and `1e3` are refused)."""
    if (value.isascii() and value.isdigit() and len(value) <= _LIMIT_MAX_DIGITS
            and 1 <= int(value) <= LIST_LIMIT_MAX):
        return int(value)
    raise ParamError("limit", f"limit must be an integer from 1 to {LIST_LIMIT_MAX}, "
                              f"got {value[:_SHOWN]!r}")


def parse_list_filters(values: Mapping[str, str]) -> ListFilters:
    """ListFilters from single-valued parameters (see `single_values`); ParamError if bad."""
    name = values.get("name")
    user = values.get("user")
    sort = values.get("sort")
    limit = values.get("limit")
    return ListFilters(
        name=None if name is None else check_text("name", name),
        user=None if user is None else check_text("user", user),
        sort=None if sort is None else check_sort(sort),
        limit=None if limit is None else check_limit(limit),
    )


@dataclass(frozen=True)
class LookupOptions:
    """What a PID lookup asks beyond the process object: expanded groups, the children's
    depth, and the start time the process must have (its identity: pids are reused)."""

    expand: tuple[str, ...] = ()
    tree: int = 1
    start_time: float | None = None  # seconds since the epoch
    start_time_text: str | None = None  # as given, to pass on unchanged

    def to_params(self) -> dict[str, str]:
        """The options as query parameters, as the exporters take them (unset ones left out)."""
        params: dict[str, str] = {}
        if self.expand:
            params["expand"] = ",".join(self.expand)
        if self.tree != 1:
            params["tree"] = str(self.tree)
        if self.start_time_text is not None:
            params["start_time"] = self.start_time_text
        return params


def check_expand(value: str) -> tuple[str, ...]:
    """`a,b,...` of EXPAND_NAMES (or `all`): the groups in EXPAND_NAMES order, no repeats."""
    if not value or len(value) > _EXPAND_MAX_LENGTH:
        raise ParamError("expand", f"expand must be a comma-separated list of "
                                   f"{', '.join(EXPAND_NAMES)} or {EXPAND_ALL}")
    asked: set[str] = set()
    for name in value.split(","):
        if name == EXPAND_ALL:
            asked.update(EXPAND_NAMES)
        elif name in EXPAND_NAMES:
            asked.add(name)
        else:
            raise ParamError("expand", f"unknown expand group {name[:_SHOWN]!r} (groups: "
                                       f"{', '.join(EXPAND_NAMES)}, {EXPAND_ALL})")
    return tuple(n for n in EXPAND_NAMES if n in asked)


def check_tree(value: str) -> int:
    """Generations of descendants under `children`: 1 to TREE_MAX."""
    if value in {str(n) for n in range(1, TREE_MAX + 1)}:
        return int(value)
    raise ParamError("tree", f"tree must be an integer from 1 to {TREE_MAX}, "
                             f"got {value[:_SHOWN]!r}")


def check_start_time(value: str) -> float:
    """An RFC 3339 timestamp (`2026-01-15T10:30:00Z`) as seconds since the epoch."""
    if _RFC3339.fullmatch(value):
        try:
            # fromisoformat takes at most 6 fractional digits: the rest is below our precision.
            head, dot, rest = value.partition(".")
            if dot:
                digits = len(rest) - len(rest.lstrip("0123456789"))
                value = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
            return datetime.fromisoformat(value.replace("z", "Z")).timestamp()
        except ValueError:
            pass  # a 13th month or a 25th hour: refused below
    raise ParamError("start_time", "start_time must be an RFC 3339 timestamp such as "
                                   f"2026-01-15T10:30:00Z, got {value[:_SHOWN]!r}")


def parse_lookup_options(values: Mapping[str, str]) -> LookupOptions:
    """LookupOptions from single-valued parameters (see `single_values`); ParamError if bad."""
    expand = values.get("expand")
    tree = values.get("tree")
    start = values.get("start_time")
    return LookupOptions(
        expand=() if expand is None else check_expand(expand),
        tree=1 if tree is None else check_tree(tree),
        start_time=None if start is None else check_start_time(start),
        start_time_text=start,
    )
