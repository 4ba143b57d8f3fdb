"""Failed exporters in the log: each one named with its reason, at most a line per interval.

The metric `procfleet_query_exporter_failures_total{exporter,kind}` counts every failure, but
says neither why nor when an operator tailing the log should look. So each exporter that
fails gets a warning line naming it, the kind and the reason:

    level=warning logger=query.failurelog msg="exporter failed" exporter=web-02 kind=timeout
        reason="timeout after 2.0 s" suppressed=113

A fleet asked thousands of times a second would write thousands of such lines for one dead
exporter, so per exporter at most one line is written per `interval`; the failures in
between are counted and the next line says how many (`suppressed`). At most `max_exporters`
exporters are remembered: when more fail within one interval, the others' failures are
counted, unnamed, and reported as `others_suppressed` on the next line written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from query.fanout import Result
from query.lookup import ResultObserver

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 60.0
MAX_EXPORTERS = 1024
MAX_REASON_CHARS = 300


@dataclass(slots=True)
class _Quiet:
    until: float  # no line for this exporter before then
    suppressed: int = 0  # failures not logged since its last line


class ExporterFailureLog:
    """A `ResultObserver` that logs failed exporters at warning level, rate-limited."""

    def __init__(self, *, interval: float = INTERVAL_SECONDS,
                 max_exporters: int = MAX_EXPORTERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_exporters = max_exporters
        self._clock = clock
        self._lock = threading.Lock()
        # Oldest line first, so the exporters whose interval is over are at the front.
        self._quiet: OrderedDict[str, _Quiet] = OrderedDict()
        self._others = 0  # failures of exporters that found the table full

    def exporter_results(self, results: Sequence[Result]) -> None:
        for result in results:
            if result.failure:
                self._failed(result)

    def _failed(self, result: Result) -> None:
        now = self._clock()
        with self._lock:
            entry = self._quiet.get(result.hostname)
            if entry is not None and now < entry.until:
                entry.suppressed += 1
                return
            if entry is None:
                self._make_room(now)
                if len(self._quiet) >= self.max_exporters:
                    self._others += 1
                    return
                entry = self._quiet[result.hostname] = _Quiet(now)
            self._quiet.move_to_end(result.hostname)
            suppressed, entry.suppressed, entry.until = entry.suppressed, 0, now + self.interval
            others, self._others = self._others, 0
        fields: dict[str, object] = {"exporter": result.hostname, "kind": result.kind,
                                     "reason": (result.error or result.kind)[:MAX_REASON_CHARS]}
        if suppressed:
            fields["suppressed"] = suppressed
        if others:
            fields["others_suppressed"] = others
        log.warning("exporter failed", extra={"fields": fields})

    def _make_room(self, now: float) -> None:
        """Forget exporters whose interval is over, oldest first, while the table is full."""
        quiet = self._quiet
        while len(quiet) >= self.max_exporters:
            name, entry = next(iter(quiet.items()))
            if entry.until > now:
                return
            del quiet[name]
            self._others += entry.suppressed  # still reported, though no longer by name


class ResultObservers:
    """Several `ResultObserver`s as one (the metrics and the failure log)."""

    def __init__(self, *observers: ResultObserver) -> None:
        self.observers = observers

    def exporter_results(self, results: Sequence[Result]) -> None:
        for observer in self.observers:
            observer.exporter_results(results)
