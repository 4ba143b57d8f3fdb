"""The query service's own metrics, on a private registry, served at `GET /metrics`.

    procfleet_query_build_info{version="0.1.0"} 1.0
    procfleet_query_exporters 3.0
    procfleet_query_request_duration_seconds_bucket{code="200",le="0.05",route="/node/{hostname}/process/{pid}"} 12.0
    procfleet_query_exporter_failures_total{exporter="web-02",kind="timeout"} 4.0
    procfleet_query_discovery_reloads_total{result="failure",source="file_sd"} 1.0
    procfleet_query_discovery_last_reload_success_timestamp_seconds{source="file_sd"} 1.76e+09
"""  # noqa: E501

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import procfleet
from query.fanout import Result
from query.fleet import SourceStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Label children kept at hand, so a request does not pay labels() (a lock, a tuple, a dict
# look-up, a str of the code) per series it touches. Routes x codes are a few dozen; exporter
# x kind is as large as the fleet, and past the bound children are looked up as before.
MAX_CACHED_CHILDREN = 4096


class Metrics:
    """Request latency by route and code, exporter failures by kind, on its own registry."""

    def __init__(self, exporter_count: Callable[[], int] = lambda: 0,
                 reload_stats: Callable[[], Mapping[str, SourceStats]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if reload_stats is not None:
            self.registry.register(DiscoveryCollector(reload_stats))
        info = Gauge("procfleet_query_build_info", "Version of the query service, always 1.",
                     ["version"], registry=self.registry)
        info.labels(procfleet.__version__).set(1)
        exporters = Gauge("procfleet_query_exporters", "Exporters known to discovery now.",
                          registry=self.registry)
        exporters.set_function(lambda: float(exporter_count()))
        self.request_duration = Histogram(
            "procfleet_query_request_duration_seconds",
            "Time to answer an HTTP request, by route template and status code.",
            ["route", "code"], buckets=_BUCKETS, registry=self.registry)
        self.exporter_failures = prometheus_client.Counter(
            "procfleet_query_exporter_failures_total",
            "Exporter calls that gave no valid answer, by exporter and kind "
            "(timeout, unreachable, bad_status, bad_body, rejected: not asked because "
            "its circuit was open or too many requests already waited on it).",
            ["exporter", "kind"], registry=self.registry)
        self._durations: dict[tuple[str, int], Any] = {}
        self._failures: dict[tuple[str, str], Any] = {}

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        child = self._durations.get((route, code))
        if child is None:
            child = self.request_duration.labels(route, str(code))
            if len(self._durations) < MAX_CACHED_CHILDREN:
                self._durations[(route, code)] = child
        child.observe(seconds)

    def exporter_results(self, results: Sequence[Result]) -> None:
        if len(results) == 1:  # a unicast: no need to group
            result = results[0]
            if result.failure:
                self._failure(result.hostname, result.kind).inc()
            return
        failures = Counter((r.hostname, r.kind) for r in results if r.failure)
        for (exporter, kind), n in failures.items():
            self._failure(exporter, kind).inc(n)

    def _failure(self, exporter: str, kind: str) -> Any:
        child = self._failures.get((exporter, kind))
        if child is None:
            child = self.exporter_failures.labels(exporter, kind)
            if len(self._failures) < MAX_CACHED_CHILDREN:
                self._failures[(exporter, kind)] = child
        return child

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class DiscoveryCollector:
    """Discovery reloads per source (static, file_sd, prometheus, config), read at scrape."""

    def __init__(self, reload_stats: Callable[[], Mapping[str, SourceStats]]) -> None:
        self.reload_stats = reload_stats

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are built fresh on each collect()

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "procfleet_query_discovery_reloads",
            "Discovery reloads by source and result (success, failure); a failure keeps the "
            "last good exporters.", labels=["source", "result"])
        last = GaugeMetricFamily(
            "procfleet_query_discovery_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload of each discovery source.",
            labels=["source"])
        for source, stats in sorted(self.reload_stats().items()):
            reloads.add_metric([source, "success"], stats.successes)
            reloads.add_metric([source, "failure"], stats.failures)
            if stats.last_success is not None:
                last.add_metric([source], stats.last_success)
        yield reloads
        yield last
