"""PID lookups and filtered listings, read fresh at request time. Knows nothing of HTTP."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence

from exporter.details import DetailFiles, Details, read_details
from exporter.info import to_info
from exporter.masking import MaskCache
from exporter.procs import ProcessError, Reader, Sample, UserNames
from exporter.rates import RateSampler
from exporter.search import Search
from procfleet.params import ListFilters, LookupOptions
from procfleet.process import ProcessInfo
from procfleet.timefmt import rfc3339

# Each key is compared only with its own kind: numbers, or RFC 3339 text (which sorts by time).
SORT_ORDER: dict[str, Callable[[ProcessInfo], float | str]] = {
    "cpu": lambda p: p.cpu_percent or 0.0,
    "mem": lambda p: p.mem_percent or 0.0,
    "rss": lambda p: float(p.mem_rss or 0),
    # Newest first: "what just started?" is the question a top-N by start answers.
    "start": lambda p: p.start_time or "",
    # A real top: CPU over the last window. A process without rates (too young, unreadable)
    # sorts as idle rather than being guessed at.
    "cpu_recent": lambda p: p.cpu_percent_recent or 0.0,
}


class OtherProcess(Exception):
    """The pid belongs to a process started at another time than the one asked for."""

    def __init__(self, pid: int, started: str) -> None:
        super().__init__(f"pid {pid} now belongs to a process started at {started}")
        self.pid = pid
        self.started = started


class ProcessLookup:
    """Reads one process, or all, into the API's process objects."""

    def __init__(self, reader: Reader, mask: Callable[[Sequence[str]], list[str]],
                 user_names: UserNames | None = None, *, prune_every: float = 5.0,
                 sampler: RateSampler | None = None, environ_allowed: bool = False) -> None:
        self.reader = reader
        # Where `?expand=` groups are read: the kernel's /proc only (None: no groups).
        files = getattr(reader, "files", None)
        self.detail_files: DetailFiles | None = (
            files if files is not None and hasattr(files, "readlink") else None)
        self.environ_allowed = environ_allowed
        # None: no live rates (the fields are left out).
        self.sampler = sampler
        self.mask = mask
        # Masked command lines of live processes, bounded in bytes; see MaskCache.
        self.masks = MaskCache(mask)
        self.user_names = user_names or UserNames()
        self.prune_every = prune_every
        self._pruned = time.monotonic()

    def get(self, pid: int) -> ProcessInfo:
        """The process with this pid; ProcessGone when there is none, ProcessDenied."""
        return self.get_with(pid, LookupOptions())[0]

    def get_with(self, pid: int, options: LookupOptions) -> tuple[ProcessInfo, Details]:
        """The process with this pid and the `?expand=` groups asked for in `options`.

        OtherProcess when `options.start_time` names another process than the pid's.
        """
        info, sample = self._get(pid)
        # Whole seconds: the precision of `start_time` as the API shows it.
        if options.start_time is not None and int(options.start_time) != int(sample.create_time):
            raise OtherProcess(pid, rfc3339(sample.create_time))
        details: Details = {}
        if options.expand and self.detail_files is not None:
            details = read_details(
                self.detail_files, pid, options.expand, mask=self._mask_text,
                clock_ticks=self.reader.system.clock_ticks, generations=options.tree,
                environ_allowed=self.environ_allowed)
            # The groups were read after the process object: if the pid changed hands in
            # between, they describe another process and are left out.
            try:
                if self.reader.counters(pid).start_ticks != sample.start_ticks:
                    details = {}
            except ProcessError:
                details = {}
        return info, details

    def _mask_text(self, text: str) -> str:
        return self.mask([text])[0]

    def _get(self, pid: int) -> tuple[ProcessInfo, Sample]:
        sample = self.reader.lookup(pid)
        if time.monotonic() - self._pruned >= self.prune_every:
            # Lookups alone never see a process exit: listing /proc now and then does.
            self._pruned = time.monotonic()
            self.masks.prune(self.reader.pids())
        rates = (self.sampler.rates(pid, sample.start_ticks) if self.sampler is not None
                 else None)
        return to_info(sample, system=self.reader.system, user_name=self.user_names,
                       mask=self.masks.bind(sample.pid, sample.start_ticks),
                       rates=rates), sample

    def list(self, query: ListFilters) -> list[ProcessInfo]:
        now = time.time()
        glob = query.name is not None and any(c in query.name for c in "*?[")
        found: list[ProcessInfo] = []
        pids = list(self.reader.pids())
        # Issue 11's filters (cmdline, state, port, unit, ...): see exporter/search.py.
        search = Search.of(query, getattr(self.reader, "root", "/proc")) \
            if query.searching else None
        self.masks.prune(pids)
        self._pruned = time.monotonic()
        for pid in pids:
            try:
                sample = self.reader.sample(pid)
            except ProcessError:  # gone since listed, or not ours to read
                continue
            if search is not None and not search.keeps_sample(sample):
                continue
            rates = (self.sampler.rates(pid, sample.start_ticks) if self.sampler is not None
                     else None)
            info = to_info(sample, system=self.reader.system, user_name=self.user_names,
                           mask=self.masks.bind(sample.pid, sample.start_ticks), now=now,
                           rates=rates)
            if query.name is not None:
                name = info.name or ""
                if not (fnmatch.fnmatchcase(name, query.name) if glob else name == query.name):
                    continue
            if query.user is not None and info.user != query.user:
                continue
            if search is not None and not search.keeps_info(info):
                continue
            found.append(info)
        if query.sort is not None:
            found.sort(key=SORT_ORDER[query.sort], reverse=True)
        else:
            found.sort(key=lambda p: p.pid)
        return found[: query.limit] if query.limit is not None else found

