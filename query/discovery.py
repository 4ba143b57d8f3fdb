"""Which exporters exist (discovery) and how each last answered (health).

A `Discovery` merges the exporters of its sources into one immutable `Fleet` snapshot that
request threads read without locks; `refresh()` swaps in a new snapshot, or keeps the last
good one when a source fails or the merge is invalid. Only the static source (`exporters:` in
the YAML) exists today; file_sd and Prometheus sources plug in as more `Source`s.

Health is passive: every fan-out result is recorded (`record`), so `GET /node` can say when
each exporter last gave a valid answer and what its last failure was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from query.config import Config

log = logging.getLogger("query.discovery")

HealthStatus = Literal["unknown", "up", "down"]


@dataclass(frozen=True)
class Exporter:
    """One exporter the query service may call: its name, base URL and labels."""

    hostname: str
    url: str
    labels: Mapping[str, str] = field(default_factory=dict)
    maintenance: bool = False
    token: str | None = field(default=None, repr=False)
    source: str = "static"


@dataclass(frozen=True)
class Health:
    """What the last call to an exporter showed. Times are Unix seconds."""

    status: HealthStatus = "unknown"
    last_checked: float | None = None
    last_seen: float | None = None  # last valid answer
    last_error: str | None = None


class DiscoveryError(Exception):
    """A source could not produce its exporters, or the merged set is invalid."""


class Source(Protocol):
    """A discovery source: `exporters()` returns its current set or raises DiscoveryError."""

    name: str

    def exporters(self) -> Sequence[Exporter]: ...


class StaticSource:
    """The `exporters:` list of the configuration; the global exporter_token fills gaps."""

    name = "static"

    def __init__(self, config: Config) -> None:
        self._exporters = tuple(
            Exporter(hostname=e.hostname, url=e.url, labels=e.labels, maintenance=e.maintenance,
                     token=e.token or config.exporter_token, source=self.name)
            for e in config.exporters
        )

    def exporters(self) -> Sequence[Exporter]:
        return self._exporters


@dataclass(frozen=True)
class Fleet:
    """An immutable snapshot of the known exporters, sorted by hostname."""

    exporters: tuple[Exporter, ...]
    by_hostname: Mapping[str, Exporter]

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Fleet:
        ordered = tuple(sorted(exporters, key=lambda e: e.hostname))
        return cls(ordered, {e.hostname: e for e in ordered})


class Discovery:
    """The current set of exporters, merged from sources, plus last-seen health per exporter."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self._sources = tuple(sources)
        self._fleet = Fleet.of(())
        self._health: dict[str, Health] = {}
        self._lock = threading.Lock()
        self.refresh()

    @classmethod
    def from_config(cls, config: Config) -> Discovery:
        return cls([StaticSource(config)])

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Discovery:
        """A Discovery over a fixed list of exporters (for tests and tools)."""
        fixed = tuple(exporters)

        class Fixed:
            name = "fixed"

            def exporters(self) -> Sequence[Exporter]:
                return fixed

        return cls([Fixed()])

    def refresh(self) -> bool:
        """Re-read every source; swap in the merged set, or keep the last good one and log why."""
        try:
            merged = self._merge()
        except DiscoveryError as exc:
            log.error("discovery refresh failed, keeping the last good exporters",
                      extra={"fields": {"reason": str(exc)}})
            return False
        self._fleet = Fleet.of(merged)
        return True

    def _merge(self) -> list[Exporter]:
        merged: dict[str, Exporter] = {}
        for source in self._sources:
            for exporter in source.exporters():
                other = merged.get(exporter.hostname)
                if other is not None:
                    raise DiscoveryError(f"hostname {exporter.hostname!r} is defined by both "
                                         f"{other.source} and {exporter.source}")
                merged[exporter.hostname] = exporter
        return list(merged.values())

    @property
    def fleet(self) -> Fleet:
        """The current snapshot; keep the reference for the length of one request."""
        return self._fleet

    def health(self, hostname: str) -> Health:
        return self._health.get(hostname, Health())

    def record(self, hostname: str, valid: bool, error: str | None, when: float | None = None
               ) -> None:
        """Note the outcome of one call to an exporter (valid answer or the failure)."""
        now = time.time() if when is None else when
        with self._lock:
            previous = self._health.get(hostname, Health())
            if valid:
                self._health[hostname] = Health("up", now, now, None)
            else:
                self._health[hostname] = Health("down", now, previous.last_seen, error)
