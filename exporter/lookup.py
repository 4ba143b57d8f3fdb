"""PID lookups and filtered listings, read fresh at request time. Knows nothing of HTTP."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence

from exporter.info import to_info
from exporter.masking import MaskCache
from exporter.procs import ProcessError, Reader, UserNames
from exporter.search import Search
from procfleet.params import ListFilters
from procfleet.process import ProcessInfo

# Each key is compared only with its own kind: numbers, or RFC 3339 text (which sorts by time).
SORT_ORDER: dict[str, Callable[[ProcessInfo], float | str]] = {
    "cpu": lambda p: p.cpu_percent or 0.0,
    "mem": lambda p: p.mem_percent or 0.0,
    "rss": lambda p: float(p.mem_rss or 0),
    # Newest first: "what just started?" is the question a top-N by start answers.
    "start": lambda p: p.start_time or "",
}


class ProcessLookup:
    """Reads one process, or all, into the API's process objects."""

    def __init__(self, reader: Reader, mask: Callable[[Sequence[str]], list[str]],
                 user_names: UserNames | None = None, *, prune_every: float = 5.0) -> None:
        self.reader = reader
        self.mask = mask
        # Masked command lines of live processes, bounded in bytes; see MaskCache.
        self.masks = MaskCache(mask)
        self.user_names = user_names or UserNames()
        self.prune_every = prune_every
        self._pruned = time.monotonic()

    def get(self, pid: int) -> ProcessInfo:
        """The process with this pid; ProcessGone when there is none, ProcessDenied."""
        sample = self.reader.lookup(pid)
        if time.monotonic() - self._pruned >= self.prune_every:
            # Lookups alone never see a process exit: listing /proc now and then does.
            self._pruned = time.monotonic()
            self.masks.prune(self.reader.pids())
        return to_info(sample, system=self.reader.system, user_name=self.user_names,
                       mask=self.masks.bind(sample.pid, sample.start_ticks))

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
            info = to_info(sample, system=self.reader.system, user_name=self.user_names,
                           mask=self.masks.bind(sample.pid, sample.start_ticks), now=now)
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
