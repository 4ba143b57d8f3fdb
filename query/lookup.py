"""The query use cases, without HTTP: resolve a target, fan out, decide the answer.

`Lookup.process(target, pid)` and `Lookup.processes(target, filters)` return an `Answer`:
the status code docs/api.md#status-codes prescribes and the per-exporter results (or the error
and details).

    unicast (hostname, _any)       ok -> 200; skipped -> 200 (the result says why);
                                   not found -> 404 "process not found";
                                   timeout/unreachable/bad answer -> 500 naming the exporter
    broadcast (_all, selectors)    any valid answer, found or not -> 200; every exporter
                                   skipped (maintenance) -> 200; otherwise 500 naming them
    any target matching nothing    404 "target not found"
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from procfleet.process import NOT_FOUND_ERROR
from query.config import FanoutLimits
from query.discovery import Discovery, Exporter
from query.fanout import Call, Fanout, Result, ResultStream, list_call, process_call
from query.targets import Target, resolve

# How many failing exporters a 500's details name before summarising the rest by reason.
DETAILS_LIMIT = 20


@dataclass(frozen=True)
class Answer:
    """A decided answer: 200 with results, or an error code with error and details (and the
    results it was decided from, which the body does not show but the log counts)."""

    code: int
    results: tuple[Result, ...] = ()
    error: str | None = None
    details: str | None = None


@dataclass(frozen=True)
class Streamed:
    """A broadcast whose results stream in: how many exporters it targets, and the results
    as they arrive (one per targeted exporter)."""

    targeted: int
    results: Iterator[Result]


class ResultObserver(Protocol):
    """Told about every exporter result (metrics count failures by kind)."""

    def exporter_results(self, results: Sequence[Result]) -> None: ...


class Lookup:
    """Answers process lookups and lists for a target across the fleet."""

    def __init__(self, discovery: Discovery, fanout: Fanout, *,
                 limits: FanoutLimits | None = None,
                 observer: ResultObserver | None = None) -> None:
        self.discovery = discovery
        self.health = discovery.health
        self.fanout = fanout
        self.limits = limits or FanoutLimits()
        self.observer = observer
        self._fleet: object = None

    def process(self, target: Target, pid: int,
                params: Mapping[str, str] | None = None) -> Answer:
        """`GET /node/{target}/process/{pid}`; `params` (expand, tree, start_time) passed on."""
        call = process_call(pid, self.limits.max_body_bytes, params)
        return self._run(target, call, f"pid {pid}")

    def processes(self, target: Target, filters: Mapping[str, str]) -> Answer:
        """`GET /node/{target}/process?…`: each exporter's filtered list."""
        call = list_call(filters, self.limits.max_list_body_bytes,
                         self.limits.max_list_processes)
        return self._run(target, call, "the process list")

    def stream_process(self, target: Target, pid: int,
                       params: Mapping[str, str] | None = None) -> Answer | Streamed:
        """`process`, for a broadcast target, as results that stream in (see `_stream`)."""
        return self._stream(target, process_call(pid, self.limits.max_body_bytes, params),
                            f"pid {pid}")

    def stream_processes(self, target: Target, filters: Mapping[str, str]
                         ) -> Answer | Streamed:
        """`processes`, for a broadcast target, as results that stream in."""
        call = list_call(filters, self.limits.max_list_body_bytes,
                         self.limits.max_list_processes)
        return self._stream(target, call, "the process list")

    def _stream(self, target: Target, call: Call, what: str) -> Answer | Streamed:
        """An Answer when the status is not a streamed 200 (no exporter matches: 404; a
        unicast target: its ordinary answer), else each exporter's result as it comes."""
        exporters = self._targeted(target)
        if not exporters:
            return self._no_target(target)
        if target.unicast:
            return self._run(target, call, what)
        return Streamed(len(exporters), self._observed(self.fanout.stream(exporters, call)))

    def _observed(self, stream: ResultStream) -> Iterator[Result]:
        try:
            for result in stream:
                if stream.streamed:  # not the ones made up for a deadline or a slow reader
                    self._observe((result,))
                yield result
        finally:
            stream.close()

    def _targeted(self, target: Target) -> list[Exporter]:
        fleet = self.discovery.fleet
        if fleet is not self._fleet:  # exporters left: their breaker state goes with them
            self._fleet = fleet
            self.fanout.retain(fleet.by_hostname)
        if target.kind == "hostname" and target.hostname is not None:  # a dict look-up
            named = fleet.by_hostname.get(target.hostname)
            return [named] if named is not None else []
        return resolve(target, fleet.exporters)

    @staticmethod
    def _no_target(target: Target) -> Answer:
        return Answer(404, error="target not found",
                      details=f"no exporter matches target {str(target)!r}")

    def _run(self, target: Target, call: Call, what: str) -> Answer:
        exporters = self._targeted(target)
        if not exporters:
            return self._no_target(target)
        if target.kind == "any":
            candidates = [e for e in exporters if not e.maintenance]
            if candidates:
                results = self.fanout.first(self._any_order(candidates), call)
            else:  # nobody to ask: report them all as skipped
                results = self.fanout.all(exporters, call)
        else:
            results = self.fanout.all(exporters, call)
        self._observe(results)
        return decide(target, results, what)

    def _any_order(self, candidates: list[Exporter]) -> list[Exporter]:
        """Last seen up first, then never asked, then down; random within each group."""
        rank = {"up": 0, "unknown": 1, "down": 2}
        random.shuffle(candidates)
        return sorted(candidates, key=lambda e: rank[self.health.get(e.hostname).status])

    def _observe(self, results: Sequence[Result]) -> None:
        self.health.record_many((r.hostname, r.valid, r.error) for r in results if r.observed)
        if self.observer is not None:
            self.observer.exporter_results(results)


def decide(target: Target, results: Sequence[Result], what: str = "the lookup") -> Answer:
    """The status code and body for a target's results (the table in the module docstring)."""
    if target.unicast:
        answer = results[-1] if results and not results[-1].failure else None
        if answer is None:
            return Answer(500, tuple(results), error="exporter failed",
                          details=_failures(results))
        if answer.kind == "replaced":  # start_time named another process: say which
            return Answer(404, tuple(results), error=NOT_FOUND_ERROR, details=answer.error)
        if answer.kind == "not_found":  # the results stay for the log's exporter counts
            return Answer(404, tuple(results), error=NOT_FOUND_ERROR,
                          details=f"exporter {answer.hostname} has no process with {what}")
        if target.kind == "any" and answer.kind == "maintenance":
            return Answer(200, tuple(sorted(results, key=_by_hostname)))
        return Answer(200, (answer,))
    ordered = tuple(sorted(results, key=_by_hostname))
    if any(r.valid for r in ordered) or all(r.kind == "maintenance" for r in ordered):
        return Answer(200, ordered)
    failed = [r for r in ordered if r.failure]
    return Answer(500, ordered, error="no exporter answered",
                  details=f"none of the {len(ordered)} targeted exporters gave a valid answer: "
                  + _failures(failed))


def _by_hostname(result: Result) -> str:
    return result.hostname


def _failures(results: Sequence[Result]) -> str:
    """`web-01: timeout after 2.0 s; web-02: connection refused; and 3 more (…)`."""
    failed = [r for r in results if r.failure]
    named = "; ".join(f"{r.hostname}: {r.error}" for r in failed[:DETAILS_LIMIT])
    rest = failed[DETAILS_LIMIT:]
    if rest:
        reasons = Counter(r.error for r in rest)
        summary = ", ".join(f"{n} {error}" for error, n in reasons.most_common(5))
        named += f"; and {len(rest)} more ({summary})"
    return named
