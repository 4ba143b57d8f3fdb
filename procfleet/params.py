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

import datetime as dt
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

SORT_KEYS = ("cpu", "mem", "rss", "start", "cpu_recent")
# The process field each sort key orders by, largest first (for scope=fleet ranking).
SORT_FIELDS = {"cpu": "cpu_percent", "mem": "mem_percent", "rss": "mem_rss",
               "start": "start_time", "cpu_recent": "cpu_percent_recent"}
LIST_LIMIT_MAX = 100_000
FILTER_MAX_LENGTH = 256
# GET /process on the exporter and GET /node/{target}/process on the query service.
LIST_PARAMS = ("name", "user", "sort", "limit", "cmdline", "cmdline_re", "state", "port", "unit",
               "container", "ppid", "min_rss", "started_before", "started_after",
               "min_cpu_recent")
# The query service's list takes one more: how far `sort` and `limit` reach (docs/api.md).
QUERY_LIST_PARAMS = (*LIST_PARAMS, "scope")
SCOPES = ("host", "fleet")
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
    """The filters of a process list (all given ones must hold), its sort key and limit.

    `name` is exact or a glob; `cmdline` a substring and `cmdline_re` an RE2 pattern of the
    command line as shown (masked); `state` one or more state words; `port` a TCP port the
    process listens on; `unit` a systemd unit; `container` a container id prefix;
    `started_before`/`started_after` RFC 3339 text (kept as given, so `to_params` gives back
    what was asked); `min_rss` bytes; `min_cpu_recent` a CPU% over the exporter's last window
    (`cpu_percent_recent`: a process without one, too young or unreadable, does not match).
    """

    name: str | None = None
    user: str | None = None
    sort: str | None = None
    limit: int | None = None
    cmdline: str | None = None
    cmdline_re: str | None = None
    state: tuple[str, ...] | None = None
    port: int | None = None
    unit: str | None = None
    container: str | None = None
    ppid: int | None = None
    min_rss: int | None = None
    started_before: str | None = None
    started_after: str | None = None
    min_cpu_recent: float | None = None

    def to_params(self) -> dict[str, str]:
        """The filters as query parameters, as the exporters take them (unset ones left out)."""
        params: dict[str, str] = {}
        for item in fields(self):
            value: Any = getattr(self, item.name)
            if value is None:
                continue
            params[item.name] = ",".join(value) if isinstance(value, tuple) else str(value)
        return params

    @property
    def searching(self) -> bool:
        """True when a filter beyond name and user is set (exporter.search applies those)."""
        return any(getattr(self, name) is not None for name in SEARCH_FIELDS)


# The filters beyond name and user (and sort and limit), in LIST_PARAMS order.
SEARCH_FIELDS = LIST_PARAMS[4:]


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
    searched = {key: _SEARCH_CHECKS[key](key, values[key]) for key in SEARCH_FIELDS
                if values.get(key) is not None}
    return ListFilters(
        name=None if name is None else check_text("name", name),
        user=None if user is None else check_text("user", user),
        sort=None if sort is None else check_sort(sort),
        limit=None if limit is None else check_limit(limit),
        **searched,
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


# -- the search filters (issue 11) ------------------------------------------------------------

# The state words the exporters show (exporter.procs.STATE_WORDS' values; a test keeps them
# equal). A process list filtered by state takes one or more, comma-separated.
STATE_NAMES = ("running", "sleep", "blocked", "stop", "idle", "zombie", "dead", "wait", "lock")
CMDLINE_RE_MAX_LENGTH = 256
# RE2's compiled-program memory for one pattern: its DFA falls back to slower (still linear)
# matching past this, instead of growing.
CMDLINE_RE_MAX_MEM = 1 << 20
PORT_MAX = 65535
# 100 per core, like top; far above any machine, so a typo is caught rather than matching nothing.
CPU_PERCENT_MAX = 100_000
_DECIMAL_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,3})?")
PPID_MAX = 2147483647
RSS_MAX = 1 << 62
# A systemd unit name (systemd.unit(5): letters, digits, ":-_.\\" and "@" for templates).
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.@\\-]{1,256}")
# A container id prefix: lower-case hex, as docker, containerd and podman write ids.
_CONTAINER_RE = re.compile(r"[0-9a-f]{1,64}")
_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})")


def check_number(name: str, value: str, low: int, high: int) -> int:
    """An integer parameter: ASCII decimal digits for `low` to `high`."""
    if (value.isascii() and value.isdigit() and len(value) <= len(str(high))
            and low <= int(value) <= high):
        return int(value)
    raise ParamError(name, f"{name} must be an integer from {low} to {high}, "
                           f"got {value[:_SHOWN]!r}")


def check_states(name: str, value: str) -> tuple[str, ...]:
    """One or more state words, comma-separated (`running,blocked`), each known."""
    words = tuple(value.split(","))
    for word in words:
        if word not in STATE_NAMES:
            raise ParamError(name, f"{name} must be one or more of {', '.join(STATE_NAMES)} "
                                   f"(comma-separated), got {word[:_SHOWN]!r}")
    return tuple(dict.fromkeys(words))


def check_percent(name: str, value: str) -> float:
    """A CPU percentage: a plain decimal number (`50`, `12.5`) from 0 to CPU_PERCENT_MAX."""
    if _DECIMAL_RE.fullmatch(value) and float(value) <= CPU_PERCENT_MAX:
        return float(value)
    raise ParamError(name, f"{name} must be a decimal number from 0 to {CPU_PERCENT_MAX}, "
                           f"got {value[:_SHOWN]!r}")


def check_unit(name: str, value: str) -> str:
    """A systemd unit name such as `nginx.service` (a name without a suffix means .service)."""
    if not _UNIT_RE.fullmatch(value):
        raise ParamError(name, f"{name} must be a systemd unit name such as nginx.service, "
                               f"got {value[:_SHOWN]!r}")
    return value


def check_container(name: str, value: str) -> str:
    """A container id prefix: 1 to 64 lower-case hex digits."""
    if not _CONTAINER_RE.fullmatch(value):
        raise ParamError(name, f"{name} must be 1 to 64 lower-case hex digits (a container "
                               f"id or its prefix), got {value[:_SHOWN]!r}")
    return value


def parse_time(value: str) -> float:
    """RFC 3339 text (`2026-01-15T10:30:00Z`, an offset, fractions) as seconds since the epoch.

    ValueError when it is not RFC 3339 (a date alone, no offset, or no such day).
    """
    if not _RFC3339_RE.fullmatch(value):
        raise ValueError(value)
    return dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()


def check_time(name: str, value: str) -> str:
    """An RFC 3339 timestamp with its offset (`2026-01-15T10:30:00Z`)."""
    try:
        parse_time(value)
    except ValueError:
        raise ParamError(name, f"{name} must be an RFC 3339 time such as "
                               f"2026-01-15T10:30:00Z, got {value[:_SHOWN]!r}") from None
    return value


def compile_cmdline_re(value: str) -> Any:
    """The RE2 program of a `cmdline_re` pattern; ParamError when RE2 refuses it.

    RE2 matches in time linear in the text whatever the pattern (no backtracking, so no
    backreferences or lookarounds: RE2 refuses them), which is why a search pattern from any
    caller may run on an exporter. Imported here, not at the top: the command-line client
    checks the other filters without loading RE2.
    """
    if not value or len(value) > CMDLINE_RE_MAX_LENGTH:
        raise ParamError("cmdline_re", f"cmdline_re must be 1 to {CMDLINE_RE_MAX_LENGTH} "
                                       "characters")
    import re2

    options = re2.Options()
    options.log_errors = False
    options.max_mem = CMDLINE_RE_MAX_MEM
    try:
        return re2.compile(value, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise ParamError("cmdline_re", f"cmdline_re is not a pattern RE2 takes: "
                                       f"{reason[:120]}") from None


def check_cmdline_re(name: str, value: str) -> str:
    compile_cmdline_re(value)
    return value


_SEARCH_CHECKS: dict[str, Any] = {
    "cmdline": check_text,
    "cmdline_re": check_cmdline_re,
    "state": check_states,
    "port": lambda name, value: check_number(name, value, 1, PORT_MAX),
    "unit": check_unit,
    "container": check_container,
    "ppid": lambda name, value: check_number(name, value, 0, PPID_MAX),
    "min_rss": lambda name, value: check_number(name, value, 0, RSS_MAX),
    "started_before": check_time,
    "started_after": check_time,
    "min_cpu_recent": check_percent,
}


def check_scope(values: Mapping[str, str], filters: ListFilters) -> str:
    """The query service's `scope`: host (each host's own top-N) or fleet (one ranking).

    `scope=fleet` ranks across the fleet, so it needs `sort` and `limit`.
    """
    scope = values.get("scope", "host")
    if scope not in SCOPES:
        raise ParamError("scope", f"scope must be one of {', '.join(SCOPES)}, "
                                  f"got {scope[:_SHOWN]!r}")
    if scope == "fleet" and (filters.sort is None or filters.limit is None):
        raise ParamError("scope", "scope=fleet ranks across hosts: give sort and limit too")
    return scope
