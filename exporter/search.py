"""The search filters of `GET /process` (issue 11): which processes a list keeps.

`Search.of(filters)` is built once per request from `procfleet.params.ListFilters`; the
lookup asks it twice per process: `keeps_sample` on what procs.py read (pid, parent, state,
RSS, start, and the extra /proc files a port, unit or container filter needs, read only for
processes that passed the cheaper tests), then `keeps_info` on the process object as shown,
whose `command` is the MASKED command line: a search matches what the caller is shown, so a
masked secret cannot be found (or guessed a character at a time) by searching for it.

The extra readers here (`listening_inodes`, `socket_inodes`, `cgroup_paths`, `unit_of`,
`container_of`) read /proc directly; the live-rates work (issue 10) reads some of the same
files, and the two should share one reader in exporter/procs.py once both are merged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exporter.procs import STATE_WORDS, Sample
from procfleet.params import ListFilters, compile_cmdline_re, parse_time
from procfleet.process import ProcessInfo

# How much of a shown command line `cmdline_re` reads: RE2 is linear in the text, and this
# bounds the text (the kernel allows argv of megabytes).
CMDLINE_MATCH_MAX = 64 * 1024
# Socket inodes read from one /proc/net file at most: a host with more listening sockets
# than this is not one a port search is meant for.
MAX_LISTENING = 65_536
# The descriptors of one process looked at for a port search, at most.
MAX_FDS_SCANNED = 65_536
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".timer", ".path",
                  ".target", ".device", ".automount")
# A container id in a cgroup path component: docker-<id>.scope, cri-containerd-<id>.scope,
# crio-<id>.scope, libpod-<id>.scope, or the id alone (/docker/<id>, /kubepods/.../<id>).
_CONTAINER_ID = re.compile(r"(?:[a-z-]+-)?([0-9a-f]{32,64})(?:\.scope)?")


def listening_inodes(port: int, proc_root: str = "/proc") -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on `port`, in this network
    namespace (the exporter's: processes in other namespaces are not seen listening)."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_root}/net/{name}", "rb") as table:
                next(table, None)  # the header
                for count, line in enumerate(table):
                    if count >= MAX_LISTENING:
                        break
                    fields = line.split()
                    if len(fields) < 10 or fields[3].decode() != _LISTEN:
                        continue
                    local = fields[1].decode()
                    if int(local.rpartition(":")[2], 16) == port:
                        inodes.add(int(fields[9]))
        except (FileNotFoundError, PermissionError):
            continue  # no IPv6, or a /proc that hides it: nothing listens there for us
    return inodes


def socket_inodes(pid: int, proc_root: str = "/proc") -> set[int]:
    """The socket inodes process `pid` holds open (empty when its fds may not be read)."""
    found: set[int] = set()
    try:
        names = os.listdir(f"{proc_root}/{pid}/fd")
    except OSError:  # gone, or another user's: not shown to match
        return found
    for name in names[:MAX_FDS_SCANNED]:
        try:
            link = os.readlink(f"{proc_root}/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


def cgroup_paths(pid: int, proc_root: str = "/proc") -> list[str]:
    """The cgroup paths of `pid` (v2's one, or every v1 hierarchy's), from /proc/PID/cgroup."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", "rb") as file:
            text = file.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return []
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def unit_of(paths: Iterable[str]) -> str | None:
    """The systemd unit a process runs in: the innermost unit (not slice) of its cgroup path.

    `0::/system.slice/nginx.service` is nginx.service; a user's
    `/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service` is foo.service.
    The name=systemd hierarchy (v1) or the unified one (v2) is preferred when present.
    """
    for path in sorted(paths, key=lambda p: "slice" not in p):
        for part in reversed(path.split("/")):
            if part.endswith(_UNIT_SUFFIXES):
                return part
    return None


def container_of(paths: Iterable[str]) -> str | None:
    """The container id in a process's cgroup paths (docker, containerd, cri-o, podman)."""
    for path in paths:
        for part in reversed(path.split("/")):
            match = _CONTAINER_ID.fullmatch(part)
            if match:
                return match.group(1)
    return None


@dataclass(frozen=True)
class Search:
    """The filters of one list request, ready to test processes against."""

    filters: ListFilters
    states: frozenset[str] | None = None
    started_before: float | None = None
    started_after: float | None = None
    pattern: Any = None  # the RE2 program of cmdline_re
    listening: frozenset[int] | None = None  # socket inodes listening on `port`
    unit: str | None = None
    proc_root: str = "/proc"

    @classmethod
    def of(cls, filters: ListFilters, proc_root: str = "/proc") -> Search:
        unit = filters.unit
        if unit is not None and not unit.endswith(_UNIT_SUFFIXES):
            unit += ".service"  # as systemctl reads a bare name
        return cls(
            filters,
            states=None if filters.state is None else frozenset(filters.state),
            started_before=None if filters.started_before is None
            else parse_time(filters.started_before),
            started_after=None if filters.started_after is None
            else parse_time(filters.started_after),
            pattern=None if filters.cmdline_re is None
            else compile_cmdline_re(filters.cmdline_re),
            listening=None if filters.port is None
            else frozenset(listening_inodes(filters.port, proc_root)),
            unit=unit, proc_root=proc_root)

    def keeps_sample(self, sample: Sample) -> bool:
        """The tests on what was read, cheapest first; /proc files only for survivors."""
        f = self.filters
        if f.ppid is not None and sample.ppid != f.ppid:
            return False
        if self.states is not None and STATE_WORDS.get(sample.state, sample.state) \
                not in self.states:
            return False
        if f.min_rss is not None and (sample.rss or 0) < f.min_rss:
            return False
        if self.started_before is not None and not sample.create_time < self.started_before:
            return False
        if self.started_after is not None and not sample.create_time > self.started_after:
            return False
        if self.listening is not None and not (
                self.listening and self.listening & socket_inodes(sample.pid, self.proc_root)):
            return False
        if self.unit is not None or f.container is not None:
            paths = cgroup_paths(sample.pid, self.proc_root)
            if self.unit is not None and unit_of(paths) != self.unit:
                return False
            if f.container is not None:
                container = container_of(paths)
                if container is None or not container.startswith(f.container):
                    return False
        return True

    def keeps_info(self, info: ProcessInfo) -> bool:
        """The tests on the process object: its recent CPU, and the command line as shown
        (masked)."""
        f = self.filters
        if f.min_cpu_recent is not None and (info.cpu_percent_recent is None
                                             or info.cpu_percent_recent < f.min_cpu_recent):
            return False  # no rate yet is not a busy process: never invent a number
        if f.cmdline is None and self.pattern is None:
            return True
        shown = info.command or ""
        if f.cmdline is not None and f.cmdline not in shown:
            return False
        return self.pattern is None or self.pattern.search(shown[:CMDLINE_MATCH_MAX]) is not None
