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

from collections.abc import Collection, Mapping
from dataclasses import dataclass

SORT_KEYS = ("cpu", "mem", "rss", "start")
LIST_LIMIT_MAX = 100_000
FILTER_MAX_LENGTH = 256
# GET /process on the exporter and GET /node/{target}/process on the query service.
LIST_PARAMS = ("name", "user", "sort", "limit")
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
