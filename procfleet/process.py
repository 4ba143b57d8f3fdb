"""The process object of the API, defined once for the exporter, the query service and the CLI.

No dependencies beyond the standard library: the exporter builds `ProcessInfo`s, the query
service checks exporters' answers against `PROCESS_FIELDS`, and a test keeps both OpenAPI
documents and the CLI's columns in step with them (tests/procfleet/test_rules.py).

    {"pid": 1234, "name": "nginx", "user": "www-data", "state": "sleep", "cpu_percent": 0.4,
     "mem_percent": 1.2, "mem_rss": 10485760, "command": "nginx: worker process",
     "start_time": "2026-01-15T10:30:00Z"}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The fields in the order the API shows them, with their JSON types (a bool is not a number
# here, though Python says it is an int). `pid` is always present; the rest may be left out.
PROCESS_FIELDS: Mapping[str, tuple[type, ...]] = {
    "pid": (int,), "name": (str,), "user": (str,), "state": (str,),
    "cpu_percent": (int, float), "mem_percent": (int, float), "mem_rss": (int,),
    "command": (str,), "start_time": (str,),
}

# The `error` of the exporter's 404 for a pid it has no process for. The query service tells
# this answer ("no such process": a valid answer) from any other 404 (a misconfigured URL) by
# this text, so both sides must use this one constant.
NOT_FOUND_ERROR = "process not found"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as the API shows it (docs/api.md, "Process fields"). None fields are omitted."""

    pid: int
    name: str | None = None
    user: str | None = None
    state: str | None = None
    cpu_percent: float | None = None
    mem_percent: float | None = None
    mem_rss: int | None = None
    command: str | None = None
    start_time: str | None = None

    def to_json(self) -> dict[str, object]:
        # Hand-rolled: dataclasses.asdict deep-copies and costs a fifth of a lookup.
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}

