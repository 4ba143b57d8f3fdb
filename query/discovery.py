"""Which exporters exist (discovery) and how each last answered (health).

A `Discovery` merges the exporters of its sources into one immutable `Fleet` snapshot that
request threads read without locks. The sources (SPEC.md, "Discovery"):

    static      `exporters:` of the YAML
    file_sd     Prometheus file_sd files (JSON or YAML, globs), re-read when they change
    prometheus  the active targets of one job of a Prometheus server (/api/v1/targets)

A background thread (`start()`) polls the files' mtimes every `discovery.refresh_interval`
and Prometheus every `prometheus.refresh_interval`; `request_reload()` (SIGHUP) re-reads the
YAML and every source. A source that fails keeps its last good exporters; a merge that
fails (a hostname twice) keeps the last good fleet. Either is logged, naming the source and
the problem, and counted in `reload_stats()`. Requests never wait for a refresh: they read
whichever snapshot is current.

Health is passive: every fan-out result is recorded (`record`), so `GET /node` can say when
each exporter last gave a valid answer and what its last failure was.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

import yaml

import procfleet
from procfleet.configcheck import ConfigError, yaml_problem
from procfleet.hostnames import is_hostname
from query.config import Config, PrometheusSD

log = logging.getLogger("query.discovery")

HealthStatus = Literal["unknown", "up", "down"]

PROMETHEUS_MAX_BODY_BYTES = 64 * 1024 * 1024
FILE_SD_MAX_BYTES = 16 * 1024 * 1024
# Prometheus's own label-name rule; http_sd and file_sd reject anything else.
_PROM_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Discovered labels that are fields of the exporter rather than labels of it.
_OWN_FIELDS = ("hostname", "maintenance")


@dataclass(frozen=True)
class Exporter:
    """One exporter the query service may call: its name, base URL and labels.

    `source` is static, file_sd or prometheus; `origin` says where exactly (a file, a URL).
    """

    hostname: str
    url: str
    labels: Mapping[str, str] = field(default_factory=dict)
    maintenance: bool = False
    token: str | None = field(default=None, repr=False)
    source: str = "static"
    origin: str = ""


@dataclass(frozen=True)
class Health:
    """What the last call to an exporter showed. Times are Unix seconds."""

    status: HealthStatus = "unknown"
    last_checked: float | None = None
    last_seen: float | None = None  # last valid answer
    last_error: str | None = None


@dataclass(frozen=True)
class SourceStats:
    """Reloads of one source so far, and when the last one succeeded (Unix seconds)."""

    successes: int = 0
    failures: int = 0
    last_success: float | None = None


class DiscoveryError(Exception):
    """A source could not produce its exporters, or the merged set is invalid."""


class Source(Protocol):
    """A discovery source.

    `poll(force)` returns the source's exporters when they may have changed since the last
    poll (always when `force`), None when they have not, or raises DiscoveryError.
    `interval` is the seconds between polls, None for "only on a reload".
    `required` sources must load at start; others may be unavailable then.
    """

    name: str
    interval: float | None
    required: bool

    def poll(self, force: bool) -> Sequence[Exporter] | None: ...


# -- static ---------------------------------------------------------------------------------

class StaticSource:
    """The `exporters:` list of the configuration; the global exporter_token fills gaps."""

    name = "static"
    interval = None
    required = True

    def __init__(self, config: Config) -> None:
        self._exporters = tuple(
            Exporter(hostname=e.hostname, url=e.url, labels=e.labels, maintenance=e.maintenance,
                     token=e.token or config.exporter_token, source=self.name,
                     origin=config.source)
            for e in config.exporters
        )

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        return self._exporters if force else None


class FixedSource:
    """A fixed list of exporters (for tests and tools)."""

    interval = None
    required = True

    def __init__(self, exporters: Iterable[Exporter], name: str = "fixed") -> None:
        self.name = name
        self._exporters = tuple(exporters)

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        return self._exporters if force else None


# -- file_sd --------------------------------------------------------------------------------

class FileSDSource:
    """Prometheus file_sd files matching the `file_sd:` globs, parsed again when one changes.

    A change is any file appearing, vanishing, or changing mtime, size or inode (editors and
    `mv` replace files). One bad file fails the whole source, which keeps its last good set.
    """

    name = "file_sd"
    required = True

    def __init__(self, patterns: Sequence[str], *, interval: float = 5.0,
                 token: str | None = None) -> None:
        self.patterns = tuple(patterns)
        self.interval: float | None = interval
        self._token = token
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None

    def _files(self) -> list[str]:
        found: set[str] = set()
        for pattern in self.patterns:
            found.update(p for p in glob.glob(pattern) if os.path.isfile(p))
        return sorted(found)

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        signature = []
        for path in self._files():
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed between glob and stat
                continue
            signature.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        unchanged = tuple(signature) == self._signature
        self._signature = tuple(signature)  # a broken state is reported once, not each poll
        if unchanged and not force:
            return None
        exporters: list[Exporter] = []
        seen: dict[str, str] = {}
        problems: list[str] = []
        for path, *_ in signature:
            try:
                found = read_file_sd(path, token=self._token)
            except DiscoveryError as exc:
                problems.append(str(exc))
                continue
            for exporter in found:
                if exporter.hostname in seen:
                    problems.append(f"{path}: hostname {exporter.hostname!r} is already "
                                    f"defined in {seen[exporter.hostname]}")
                    continue
                seen[exporter.hostname] = path
                exporters.append(exporter)
        if problems:
            raise DiscoveryError("; ".join(problems))
        return exporters


def read_file_sd(path: str, *, token: str | None = None) -> list[Exporter]:
    """The exporters of one file_sd file, or DiscoveryError naming the file and every problem.

        - targets: ["web-01.example.net:9256", "10.0.3.17:9256"]
          labels: {group: web.prod, hostname: db-01, maintenance: "true", __scheme__: https}
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_SD_MAX_BYTES + 1)
    except OSError as exc:
        raise DiscoveryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > FILE_SD_MAX_BYTES:
        raise DiscoveryError(f"{path}: larger than {FILE_SD_MAX_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise DiscoveryError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DiscoveryError(f"{path}: JSON syntax error at line {exc.lineno}, column "
                             f"{exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise DiscoveryError(f"{path}: {yaml_problem(exc)}") from None
    if data is None:  # an empty file: no targets, as in Prometheus
        return []
    problems: list[str] = []
    exporters: list[Exporter] = []
    if not isinstance(data, list):
        raise DiscoveryError(f"{path}: must be a list of target groups, got "
                             f"{type(data).__name__}")
    for i, group in enumerate(data):
        where = f"[{i}]"
        if not isinstance(group, Mapping):
            problems.append(f"{where}: must be a mapping with targets and labels")
            continue
        for key in group:
            if key not in ("targets", "labels"):
                problems.append(f"{where}.{key}: unknown key (expected targets, labels)")
        labels = _file_sd_labels(group.get("labels"), f"{where}.labels", problems)
        targets = group.get("targets")
        if not isinstance(targets, list):
            problems.append(f"{where}.targets: must be a list of host:port")
            continue
        for j, target in enumerate(targets):
            try:
                exporters.append(exporter_from_target(target, labels, token=token,
                                                      source="file_sd", origin=path))
            except ValueError as exc:
                problems.append(f"{where}.targets[{j}]: {exc}")
    if problems:
        raise DiscoveryError(f"{path}: " + "; ".join(problems))
    return exporters


def _file_sd_labels(raw: Any, where: str, problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping of label names to strings")
        return {}
    labels: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _PROM_LABEL_RE.fullmatch(key):
            problems.append(f"{where}.{key}: invalid label name")
            continue
        if isinstance(value, bool):  # YAML's unquoted true: Prometheus reads the text
            value = "true" if value else "false"
        if not isinstance(value, str | int | float):
            problems.append(f"{where}.{key}: must be a string, got {type(value).__name__}")
            continue
        labels[key] = str(value)
    return labels


def exporter_from_target(target: Any, labels: Mapping[str, str], *, token: str | None,
                         source: str, origin: str, scheme: str | None = None,
                         path: str = "") -> Exporter:
    """An exporter for a Prometheus target `host:port` and its labels; ValueError says why not.

    The hostname is the label `hostname`, else the host part; `maintenance="true"` marks it in
    maintenance; `__scheme__` picks https; other `__` labels are dropped.
    """
    if not isinstance(target, str) or not target or any(c in target for c in "/?#@ \t"):
        raise ValueError(f"target {str(target)[:100]!r} must be host:port")
    try:
        parts = urllib.parse.urlsplit(f"//{target}")
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"target {target[:100]!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"target {target[:100]!r} has no host")
    scheme = scheme or labels.get("__scheme__", "http")
    if scheme not in ("http", "https"):
        raise ValueError(f"__scheme__ must be http or https, got {scheme[:20]!r}")
    hostname = labels.get("hostname") or parts.hostname
    if not is_hostname(hostname):
        raise ValueError(f"hostname {hostname[:100]!r} is not a hostname (letters, digits, "
                         "'-', '_' and '.', not beginning with '_'); give the target a "
                         "hostname label")
    maintenance = labels.get("maintenance", "false").lower()
    if maintenance not in ("true", "false"):
        raise ValueError(f"label maintenance must be true or false, got {maintenance[:20]!r}")
    kept = {k: v for k, v in labels.items() if not k.startswith("__") and k not in _OWN_FIELDS}
    return Exporter(hostname=hostname, url=f"{scheme}://{target}{path}",
                    labels=MappingProxyType(kept), maintenance=maintenance == "true",
                    token=token, source=source, origin=origin)


# -- prometheus -----------------------------------------------------------------------------

class PrometheusSource:
    """The active targets of one scrape job, from `GET {url}/api/v1/targets?state=active`.

    A target belongs to the job when its `job` label or its scrape pool is the job's name.
    The exporter URL is the scrape URL without its `/metrics` path, so Prometheus's
    relabelling of address and scheme carries over; labels are the target's, without the
    `__` ones.
    """

    name = "prometheus"
    required = False  # Prometheus may be down when the query service starts

    def __init__(self, settings: PrometheusSD, *, token: str | None = None) -> None:
        self.settings = settings
        self.interval: float | None = settings.refresh_interval
        self._token = token
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        url = f"{self.settings.url}/api/v1/targets?state=active"
        body = self._fetch(url)
        try:
            data = json.loads(body)
            targets = data["data"]["activeTargets"]
            if not isinstance(targets, list):
                raise TypeError("activeTargets is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise DiscoveryError(f"{url}: not a Prometheus targets answer ({exc})") from None
        exporters: list[Exporter] = []
        seen: dict[str, str] = {}
        problems: list[str] = []
        for target in targets:
            if not isinstance(target, Mapping):
                continue
            labels = target.get("labels") if isinstance(target.get("labels"), Mapping) else {}
            if self.settings.job not in (labels.get("job"), target.get("scrapePool")):
                continue
            try:
                exporter = self._exporter(target, labels)
            except ValueError as exc:
                problems.append(f"target {labels.get('instance', '?')!s:.100}: {exc}")
                continue
            if exporter.hostname in seen:
                problems.append(f"hostname {exporter.hostname!r} is both "
                                f"{seen[exporter.hostname]} and {exporter.url}")
                continue
            seen[exporter.hostname] = exporter.url
            exporters.append(exporter)
        if problems:
            raise DiscoveryError(f"{url} job {self.settings.job!r}: " + "; ".join(problems))
        return exporters

    def _exporter(self, target: Mapping[str, Any], labels: Mapping[str, Any]) -> Exporter:
        discovered = target.get("discoveredLabels")
        discovered = discovered if isinstance(discovered, Mapping) else {}
        text_labels = {k: v for k, v in labels.items()
                       if isinstance(k, str) and isinstance(v, str)}
        scrape_url = target.get("scrapeUrl")
        if isinstance(scrape_url, str) and scrape_url:
            parts = urllib.parse.urlsplit(scrape_url)
            address, scheme, path = parts.netloc, parts.scheme, parts.path
        else:
            address = str(discovered.get("__address__") or labels.get("instance") or "")
            scheme, path = str(discovered.get("__scheme__") or "http"), ""
        path = path.removesuffix("/metrics").rstrip("/")
        return exporter_from_target(address, text_labels, token=self._token,
                                    source=self.name, origin=self.settings.url,
                                    scheme=scheme, path=path)

    def _fetch(self, url: str) -> bytes:
        """The body of a GET, within `timeout` seconds overall and the size cap."""
        timeout = self.settings.timeout
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(url, headers={
            "Accept": "application/json",
            "User-Agent": f"procfleet-query/{procfleet.__version__}"})
        try:
            with self._opener.open(request, timeout=timeout) as response:
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read(65536):
                    size += len(chunk)
                    if size > PROMETHEUS_MAX_BODY_BYTES:
                        raise DiscoveryError(f"{url}: answer larger than "
                                             f"{PROMETHEUS_MAX_BODY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise DiscoveryError(f"{url}: timeout after {timeout} s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise DiscoveryError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                reason = f"timeout after {timeout} s"
            raise DiscoveryError(f"{url}: {reason}") from None


# -- the merged fleet ------------------------------------------------------------------------

@dataclass(frozen=True)
class Fleet:
    """An immutable snapshot of the known exporters, sorted by hostname."""

    exporters: tuple[Exporter, ...]
    by_hostname: Mapping[str, Exporter]

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Fleet:
        ordered = tuple(sorted(exporters, key=lambda e: e.hostname))
        return cls(ordered, {e.hostname: e for e in ordered})


def sources_for(config: Config, previous: Sequence[Source] = ()) -> list[Source]:
    """The sources a configuration names; an unchanged Prometheus source is kept as it was."""
    sources: list[Source] = [StaticSource(config)]
    if config.file_sd:
        sources.append(FileSDSource(config.file_sd, interval=config.discovery.refresh_interval,
                                    token=config.exporter_token))
    if config.prometheus is not None:
        for old in previous:
            if isinstance(old, PrometheusSource) and old.settings == config.prometheus \
                    and old._token == config.exporter_token:
                sources.append(old)
                break
        else:
            sources.append(PrometheusSource(config.prometheus, token=config.exporter_token))
    return sources


def merge(latest: Mapping[str, Sequence[Exporter]]) -> list[Exporter]:
    """Every source's exporters as one list; DiscoveryError when a hostname comes twice."""
    merged: dict[str, Exporter] = {}
    for exporters in latest.values():
        for exporter in exporters:
            other = merged.get(exporter.hostname)
            if other is not None:
                raise DiscoveryError(
                    f"hostname {exporter.hostname!r} is defined by both {_where(other)} "
                    f"and {_where(exporter)}")
            merged[exporter.hostname] = exporter
    return list(merged.values())


def _where(exporter: Exporter) -> str:
    return f"{exporter.source} ({exporter.origin})" if exporter.origin else exporter.source


_RESTART_KEYS = ("listen", "threads", "log_level", "timeouts", "fanout", "auth")


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
        self._health: dict[str, Health] = {}
        self._stats: dict[str, SourceStats] = {}
        self._lock = threading.Lock()  # health and stats
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
        return cls(sources_for(config), strict=True, config=config)

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Discovery:
        """A Discovery over a fixed list of exporters (for tests and tools)."""
        return cls([FixedSource(exporters)])

    # -- what request threads read -------------------------------------------------------

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
            return self.refresh(force=True)
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
            with self._lock:  # forget the health of exporters that are gone
                for hostname in set(self._health) - set(self._fleet.by_hostname):
                    del self._health[hostname]
            if previous.exporters != self._fleet.exporters:
                log.info("discovery: exporters changed", extra={"fields": {
                    "exporters": len(self._fleet.exporters),
                    "sources": ",".join(f"{n}={len(e)}" for n, e in latest.items())}})
            return True, not failed

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


def http_sd(exporters: Iterable[Exporter]) -> list[dict[str, Any]]:
    """The exporters as Prometheus `http_sd` target groups, one per exporter.

        [{"targets": ["10.0.0.1:9256"], "labels": {"hostname": "web-01", "group": "web.prod"}}]

    Label names Prometheus would refuse get `_` for each bad character; `job` and `instance`
    are left to the scraping Prometheus; https and a path prefix become `__scheme__` and
    `__metrics_path__`; an exporter in maintenance carries `maintenance="true"`.
    """
    groups = []
    for exporter in exporters:
        parts = urllib.parse.urlsplit(exporter.url)
        labels: dict[str, str] = {}
        for key, value in exporter.labels.items():
            name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
            if name[:1].isdigit():
                name = "_" + name
            if name.startswith("__") or name in ("job", "instance", "hostname"):
                continue
            labels.setdefault(name, value)
        labels["hostname"] = exporter.hostname
        if exporter.maintenance:
            labels["maintenance"] = "true"
        if parts.scheme == "https":
            labels["__scheme__"] = "https"
        if parts.path.strip("/"):
            labels["__metrics_path__"] = parts.path.rstrip("/") + "/metrics"
        groups.append({"targets": [parts.netloc], "labels": labels})
    return groups
