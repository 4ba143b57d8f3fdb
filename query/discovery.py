"""Which exporters exist now: `Discovery` polls the sources, merges them, serves a `Fleet`.

A `Discovery` merges the exporters of its sources (`query.sources`: static, file_sd,
prometheus) into one immutable `Fleet` snapshot (`query.fleet`) that request threads read
without locks (docs/api.md#discovery).

A background thread (`start()`) polls the files' mtimes every `discovery.refresh_interval`
and Prometheus every `prometheus.refresh_interval`; `request_reload()` (SIGHUP) re-reads the
YAML and every source. A source that fails keeps its last good exporters; a merge that
fails (a hostname twice) keeps the last good fleet. Either is logged, naming the source and
the problem, and counted in `reload_stats()`. Requests never wait for a refresh: they read
whichever snapshot is current.

Each exporter's last-seen health lives in `health`, a `query.health.HealthStore` that the
fan-out writes and `GET /node` reads; exporters that leave the fleet are forgotten there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from procfleet.configcheck import ConfigError
from query.config import Config
from query.fleet import DiscoveryError, Exporter, Fleet, Source, SourceStats, merge
from query.health import HealthStore
from query.sources import FixedSource, sources_for

# Exporter and DiscoveryError are re-exported: callers that name an exporter or catch a
# discovery failure need not know which module defines them.
__all__ = ["Discovery", "DiscoveryError", "Exporter", "Fleet", "SourceStats"]

log = logging.getLogger(__name__)

_RESTART_KEYS = ("listen", "threads", "head_timeout", "log_level", "timeouts", "fanout", "auth")


class Discovery:
    """The current set of exporters, merged from sources, plus last-seen health per exporter.

    Built with `strict=True` (what `from_config` does), a required source that fails or a
    hostname defined twice among them raises DiscoveryError: a configuration error at start.
    """

    def __init__(self, sources: Sequence[Source], *, strict: bool = False,
                 config: Config | None = None) -> None:
        self._sources: tuple[Source, ...] = tuple(sources)
        self._config = config
        self._latest: dict[str, tuple[Exporter, ...]] = {}
        self._fleet = Fleet.of(())
        self.health: HealthStore = HealthStore()  # written by the fan-out, read by /node
        self._stats: dict[str, SourceStats] = {}
        self._lock = threading.Lock()  # stats
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._due: dict[str, float] = {}
        self._wake = threading.Event()
        self._reload_wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_config: Callable[[], Config] | None = None
        self._refresh(self._sources, force=True, strict=strict)

    @classmethod
    def from_config(cls, config: Config) -> Discovery:
        """The discovery a configuration names, read once (a warning if it finds nobody)."""
        discovery = cls(sources_for(config), strict=True, config=config)
        discovery._warn_if_empty("start")
        return discovery

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Discovery:
        """A Discovery over a fixed list of exporters (for tests and tools)."""
        return cls([FixedSource(exporters)])

    # -- what request threads read -------------------------------------------------------

    @property
    def fleet(self) -> Fleet:
        """The current snapshot; keep the reference for the length of one request."""
        return self._fleet

    def reload_stats(self) -> dict[str, SourceStats]:
        """Reloads per source (static, file_sd, prometheus, config) so far."""
        with self._lock:
            return dict(self._stats)

    # -- refreshing ----------------------------------------------------------------------

    def refresh(self, *, force: bool = True) -> bool:
        """Poll every source now (all of them re-read when `force`).

        True when every source was read and the merged set is served; False when a source
        failed (it keeps its last good exporters) or the merge did (the fleet stays).
        """
        applied, ok = self._refresh(self._sources, force=force)
        return applied and ok

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration file (when there is one) and every source.

        Only the discovery keys (exporters, file_sd, prometheus, discovery, exporter_token)
        take effect; other changed keys are logged as needing a restart. A configuration or
        a required source that fails, or a merge that fails, changes nothing.
        """
        if self._load_config is None:
            ok = self.refresh(force=True)
            self._warn_if_empty("reload")
            return ok
        try:
            config = self._load_config()
        except ConfigError as exc:
            log.error("configuration reload failed, keeping the last good exporters",
                      extra={"fields": {"source": "config", "file": exc.source,
                                        "reason": "; ".join(exc.problems)}})
            self._count("config", ok=False)
            return False
        applied, ok = self._refresh(sources_for(config, self._sources), force=True,
                                    replace=True)
        self._count("config", ok=applied)
        if not applied:
            return False
        self._warn_if_empty("reload")
        old, self._config = self._config, config
        if old is not None:
            stale = [k for k in _RESTART_KEYS if getattr(old, k) != getattr(config, k)]
            if stale:
                log.warning("configuration reloaded; these changed keys apply after a restart",
                            extra={"fields": {"keys": ",".join(stale)}})
        return ok

    def _refresh(self, sources: Sequence[Source], *, force: bool, strict: bool = False,
                 replace: bool = False, due: Iterable[str] | None = None
                 ) -> tuple[bool, bool]:
        """Poll `sources` (those named in `due`, or all), merge, swap in the result if valid.

        With `replace`, `sources` become this Discovery's sources if the merge succeeds.
        Returns (applied: the merged set is served, ok: no source failed).
        """
        wanted = None if due is None else set(due)
        with self._refresh_lock:
            latest: dict[str, tuple[Exporter, ...]] = {}
            for source in sources:  # what each source gave last; a new source has nothing yet
                if source in self._sources and source.name in self._latest:
                    latest[source.name] = self._latest[source.name]
            polled: list[str] = []
            failed: list[Source] = []
            for source in sources:
                if wanted is not None and source.name not in wanted:
                    continue
                try:
                    found = source.poll(force)
                except DiscoveryError as exc:
                    if strict and source.required:
                        raise
                    log.error("discovery source failed, keeping its last good exporters",
                              extra={"fields": {"source": source.name, "reason": exc}})
                    self._count(source.name, ok=False)
                    failed.append(source)
                    continue
                if found is not None:
                    latest[source.name] = tuple(found)
                    polled.append(source.name)
            if replace and any(s.required for s in failed):
                return False, False  # a reload meeting a broken file applies nothing
            if not polled and not replace:
                return True, not failed
            try:
                merged = merge(latest)
            except DiscoveryError as exc:
                if not strict:
                    log.error("discovery reload failed, keeping the last good exporters",
                              extra={"fields": {"sources": ",".join(polled), "reason": exc}})
                    for name in polled:
                        self._count(name, ok=False)
                    if not replace:
                        self._latest = latest  # a later change merges with this one
                    return False, False
                # At start: static and files must agree (else raise: a configuration error);
                # a source that may change later is left out until the conflict is gone.
                required = {s.name for s in sources if s.required}
                merged = merge({n: e for n, e in latest.items() if n in required})
                log.error("discovery source conflicts with the configuration, leaving it out",
                          extra={"fields": {"reason": exc}})
                for name in [n for n in polled if n not in required]:
                    self._count(name, ok=False)
                    polled.remove(name)
            self._latest = latest
            if replace:
                self._sources = tuple(sources)
                self._due.clear()
            previous, fleet = self._fleet, Fleet.of(merged)
            if fleet.exporters != previous.exporters:  # else keep the snapshot readers hold
                self._fleet = fleet
            for name in polled:
                self._count(name, ok=True)
            self.health.retain(self._fleet.by_hostname)  # forget exporters that are gone
            if previous.exporters != self._fleet.exporters:
                log.info("discovery: exporters changed", extra={"fields": {
                    "exporters": len(self._fleet.exporters),
                    "sources": ",".join(f"{n}={len(e)}" for n, e in latest.items())}})
            return True, not failed

    def _warn_if_empty(self, when: str) -> None:
        """An empty fleet answers every target with 404: say so where the operator looks."""
        if self._fleet.exporters:
            return
        log.warning("discovery knows no exporters: every target is 'target not found' until "
                    "a source gives one", extra={"fields": {
                        "when": when, "sources": ",".join(s.name for s in self._sources)}})

    def _count(self, source: str, *, ok: bool) -> None:
        with self._lock:
            stats = self._stats.get(source, SourceStats())
            if ok:
                stats = SourceStats(stats.successes + 1, stats.failures, time.time())
            else:
                stats = SourceStats(stats.successes, stats.failures + 1, stats.last_success)
            self._stats[source] = stats

    # -- the background thread -----------------------------------------------------------

    def start(self, load_config: Callable[[], Config] | None = None) -> None:
        """Poll the sources in a background thread; `load_config` re-reads the YAML on reload."""
        self._load_config = load_config
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
            self._thread.start()

    def request_reload(self) -> None:
        """Ask the background thread for a reload (safe in a signal handler: sets a flag)."""
        self._reload_wanted.set()
        self._wake.set()

    def close(self) -> None:
        """Stop the background thread; idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _next_wake(self, now: float) -> float:
        times = []
        for source in self._sources:
            if source.interval is not None:
                times.append(self._due.setdefault(source.name, now + source.interval))
        return min(times, default=now + 3600.0)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, self._next_wake(time.monotonic()) - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                if self._reload_wanted.is_set():
                    self._reload_wanted.clear()
                    log.info("reloading discovery")
                    self.reload()
                    continue
                now = time.monotonic()
                due = [s.name for s in self._sources
                       if s.interval is not None and self._due.get(s.name, now) <= now]
                for source in self._sources:
                    if source.name in due and source.interval is not None:
                        self._due[source.name] = now + source.interval
                if due:
                    self._refresh(self._sources, force=False, due=due)
            except Exception:  # never let the thread die: the last good set stays served
                log.exception("discovery refresh crashed, will retry")
                time.sleep(1.0)
