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
    # Live rates over the exporter's sampling window (issue 10); absent until a process has
    # lived through one window, and where its counters cannot be read.
    "cpu_percent_recent": (int, float), "read_bytes_per_second": (int, float),
    "write_bytes_per_second": (int, float), "window_seconds": (int, float),
}

# The seed's nine fields: their meanings never change (clients of the seed's schema rely on them).
SEED_FIELDS = ("pid", "name", "user", "state", "cpu_percent", "mem_percent", "mem_rss",
               "command", "start_time")
RATE_FIELDS = ("cpu_percent_recent", "read_bytes_per_second", "write_bytes_per_second",
               "window_seconds")

# `?expand=` on a PID lookup: each group's name and the fields it adds to the process object
# (docs/api.md, "Expanded groups"). The query service passes exactly these fields through.
EXPAND_GROUPS: Mapping[str, tuple[str, ...]] = {
    "basic": ("ppid", "num_threads", "nice", "vms", "swap", "cpu_user_seconds",
              "cpu_system_seconds", "uids", "gids"),
    "fds": ("num_fds", "fd_soft_limit", "fd_ratio"),
    "io": ("read_bytes", "write_bytes"),
    "exe": ("exe", "exe_deleted", "cwd"),
    "cgroup": ("cgroup", "systemd_unit", "container_id", "pod_uid"),
    "sockets": ("listening", "connections"),
    "children": ("children", "children_truncated"),
    "limits": ("limits",),
    "environ": ("environ",),
}
# JSON types of the expanded fields, as the query service checks them.
DETAIL_FIELDS: Mapping[str, tuple[type, ...]] = {
    "ppid": (int,), "num_threads": (int,), "nice": (int,), "vms": (int,), "swap": (int,),
    "cpu_user_seconds": (int, float), "cpu_system_seconds": (int, float),
    "uids": (dict,), "gids": (dict,),
    "num_fds": (int,), "fd_soft_limit": (int,), "fd_ratio": (int, float),
    "read_bytes": (int,), "write_bytes": (int,),
    "exe": (str,), "exe_deleted": (bool,), "cwd": (str,),
    "cgroup": (str,), "systemd_unit": (str,), "container_id": (str,), "pod_uid": (str,),
    "listening": (list,), "connections": (dict,),
    "children": (list,), "children_truncated": (bool,),
    "limits": (dict,), "environ": (dict,),
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
    cpu_percent_recent: float | None = None
    read_bytes_per_second: float | None = None
    write_bytes_per_second: float | None = None
    window_seconds: float | None = None

    def to_json(self) -> dict[str, object]:
        # Hand-rolled: dataclasses.asdict deep-copies and costs a fifth of a lookup.
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}

