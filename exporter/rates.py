"""Live rates: CPU% and storage I/O per second over the last sampling window, in the background.

`cpu_percent` in the process object is the average over a process's whole life; a lookup
cannot wait a window to measure what the process does now. So a `RateSampler` thread reads
every live process's cumulative counters (CPU ticks from /proc/PID/stat, storage bytes from
/proc/PID/io: `Reader.counters`, nothing else) every `interval` seconds, and keeps, per
process, the last reading and the rates between it and the one before. A lookup then only
picks up the rates of its process:

    {"cpu_percent_recent": 49.8, "read_bytes_per_second": 0.0,
     "write_bytes_per_second": 1048576.0, "window_seconds": 5.0}

Entries are keyed by (pid, start ticks), so a reused pid never inherits another process's
rates, and a process seen in one reading only (younger than the window) has none. Only the
processes of the latest reading are kept, at most `max_processes` of them: memory is bounded
by the host's process count and by that cap.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

from exporter.procs import Counters, ProcessError, Reader

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0
INTERVAL_MIN = 1.0
INTERVAL_MAX = 300.0
DEFAULT_MAX_PROCESSES = 65_536
# Rates older than this many intervals are stale (the sampler fell behind or stopped): none
# rather than a number that no longer says "now".
_STALE_INTERVALS = 3.0


@dataclass(frozen=True, slots=True)
class Rates:
    """One process's rates over its last window. None: that counter was not readable."""

    cpu_percent: float
    read_bytes_per_second: float | None
    write_bytes_per_second: float | None
    window_seconds: float
    measured_at: float  # time.monotonic() of the window's end


@dataclass(slots=True)
class _Entry:
    at: float  # time.monotonic() of the reading
    counters: Counters
    rates: Rates | None


def _per_second(new: int | None, old: int | None, seconds: float) -> float | None:
    if new is None or old is None or new < old:  # counters reset: no honest number
        return None
    return round((new - old) / seconds, 1)


class RateSampler:
    """Keeps the recent rates of every live process, refreshed by a background thread.

    The thread starts with the first `rates()` call (an app that never answers a lookup costs
    nothing) and ends when the sampler is garbage collected or `stop()` is called.
    """

    def __init__(self, reader: Reader, *, interval: float = DEFAULT_INTERVAL,
                 max_processes: int = DEFAULT_MAX_PROCESSES, background: bool = True) -> None:
        self.reader = reader
        # False: only explicit sweep() calls read (tests that script time and processes).
        self.background = background
        self.interval = interval
        self.max_processes = max_processes
        self.skipped = 0  # processes left untracked by the last reading (the cap)
        self.sweeps = 0
        # Replaced whole by each reading, never mutated: readers need no lock.
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.Lock()  # one reading at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        """Start the background thread (once)."""
        with self._lock:
            if self._thread is not None:
                return
            # The thread holds the sampler weakly: dropping the app ends it.
            self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop),
                                            name="procfleet-rates", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sweep(self, now: float | None = None) -> None:
        """Read every live process's counters once and derive rates from the last reading."""
        with self._lock:
            self._sweep(time.monotonic() if now is None else now)

    def _sweep(self, now: float) -> None:
        old = self._entries
        new: dict[tuple[int, int], _Entry] = {}
        skipped = 0
        read = self.reader.counters
        for pid in self.reader.pids():
            if len(new) >= self.max_processes:
                skipped += 1
                continue
            try:
                counters = read(pid)
            except ProcessError:  # gone since listed, or not ours to read
                continue
            key = (pid, counters.start_ticks)
            before = old.get(key)
            rates = None
            if before is not None and now > before.at:
                seconds = now - before.at
                was = before.counters
                rates = Rates(
                    cpu_percent=round(100.0 * max(counters.cpu_seconds - was.cpu_seconds, 0.0)
                                      / seconds, 2),
                    read_bytes_per_second=_per_second(counters.read_bytes, was.read_bytes,
                                                      seconds),
                    write_bytes_per_second=_per_second(counters.write_bytes, was.write_bytes,
                                                       seconds),
                    window_seconds=round(seconds, 2),
                    measured_at=now)
            new[key] = _Entry(now, counters, rates)
        self._entries = new
        self.skipped = skipped
        self.sweeps += 1
        if skipped:
            log.warning("rate sampler: %d processes over the limit of %d were not sampled",
                        skipped, self.max_processes)

    def rates(self, pid: int, start_ticks: int, now: float | None = None) -> Rates | None:
        """The rates of process (pid, start ticks), or None when there are none to tell."""
        if self._thread is None and self.background:
            self.start()
        entry = self._entries.get((pid, start_ticks))
        if entry is None or entry.rates is None:
            return None
        now = time.monotonic() if now is None else now
        if now - entry.rates.measured_at > _STALE_INTERVALS * max(self.interval,
                                                                 entry.rates.window_seconds):
            return None
        return entry.rates


def _run(ref: weakref.ReferenceType[RateSampler], stop: threading.Event) -> None:
    interval = 0.0
    while not stop.wait(interval):
        sampler = ref()
        if sampler is None:
            return
        started = time.monotonic()
        try:
            sampler.sweep(started)
        except Exception:  # a surprise must not end live rates for the exporter's lifetime
            log.exception("rate sampler: reading failed")
        # Next reading one interval after this one started: the window stays `interval`.
        interval = max(sampler.interval - (time.monotonic() - started), 0.05)
        del sampler
