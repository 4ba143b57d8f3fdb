"""The discovery sources: each turns one kind of configuration into `Exporter`s.

    static      `exporters:` of the YAML
    file_sd     Prometheus file_sd files (JSON or YAML, globs), re-read when they change
    prometheus  the active targets of one job of a Prometheus server (/api/v1/targets)

Each is a `query.fleet.Source`: `poll(force)` gives its exporters, None when unchanged, or
raises DiscoveryError naming the file or URL and every problem. `sources_for(config)` builds
the ones a configuration names (docs/api.md, "Discovery").
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import yaml

import procfleet
from procfleet import filetrust
from procfleet.configcheck import yaml_problem
from procfleet.hostnames import is_hostname
from query.config import Config, FileSDEntry, PrometheusSD
from query.fleet import DiscoveryError, Exporter, Source

log = logging.getLogger(__name__)

# (source, exporter URL, the token of the exporter or its source) -> the token to send it;
# `Config.exporter_token_for` applies exporter_token_scope.
TokenResolver = Callable[[str, str, str | None], str | None]


def own_token_only(source: str, url: str, own: str | None) -> str | None:
    """The resolver without a configuration: an exporter gets its source's token only."""
    return own


PROMETHEUS_MAX_BODY_BYTES = 64 * 1024 * 1024
FILE_SD_MAX_BYTES = 16 * 1024 * 1024
# Prometheus's own label-name rule; http_sd and file_sd reject anything else.
_PROM_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Discovered labels that are fields of the exporter rather than labels of it.
_OWN_FIELDS = ("hostname", "maintenance")


# -- static ---------------------------------------------------------------------------------

class StaticSource:
    """The `exporters:` list of the configuration; exporter_token fills gaps in its scope."""

    name = "static"
    interval: float | None = None  # polled only on a reload
    required = True

    def __init__(self, config: Config) -> None:
        self._exporters = tuple(
            Exporter(hostname=e.hostname, url=e.url, labels=e.labels, maintenance=e.maintenance,
                     token=config.exporter_token_for(self.name, e.url, e.token),
                     source=self.name, tls=e.tls,
                     origin=config.source)
            for e in config.exporters
        )

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        return self._exporters if force else None


class FixedSource:
    """A fixed list of exporters (for tests and tools)."""

    interval: float | None = None  # polled only on a reload
    required = True

    def __init__(self, exporters: Iterable[Exporter], name: str = "fixed") -> None:
        self.name = name
        self._exporters = tuple(exporters)

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        return self._exporters if force else None


# -- file_sd --------------------------------------------------------------------------------

class FileSDSource:
    """Prometheus file_sd files matching the `file_sd:` globs, parsed again when one changes.

    A change is any file appearing, vanishing, or changing mtime, size, inode, mode or owner
    (editors and `mv` replace files). One bad file fails the whole source, which keeps its
    last good set. A file other users could change (`procfleet.filetrust`, the file's own
    directory included even with the sticky bit) is a bad file, unless `allow_insecure`:
    then it is loaded with a warning each time it is read.

    Each exporter's token comes from `resolve` with the token of the first `file_sd` entry
    whose patterns match its file.
    """

    name = "file_sd"
    required = True

    def __init__(self, entries: Sequence[FileSDEntry | str], *, interval: float = 5.0,
                 resolve: TokenResolver = own_token_only, allow_insecure: bool = False
                 ) -> None:
        self.entries = tuple(e if isinstance(e, FileSDEntry) else FileSDEntry(files=(e,))
                             for e in entries)
        self.interval: float | None = interval
        self._resolve = resolve
        self._allow_insecure = allow_insecure
        self._signature: tuple[tuple[str, int, int, int, int, int, int], ...] | None = None

    def _files(self, *, warn: bool = False) -> dict[str, FileSDEntry]:
        """The files the patterns match; with `warn`, a pattern matching none is logged."""
        found: dict[str, FileSDEntry] = {}
        for entry in self.entries:
            for pattern in entry.files:
                matched = [path for path in glob.glob(pattern) if os.path.isfile(path)]
                for path in matched:
                    found.setdefault(path, entry)  # the first entry naming it wins
                if warn and not matched:
                    log.warning("file_sd pattern matches no file", extra={"fields": {
                        "pattern": pattern}})
        return dict(sorted(found.items()))

    def poll(self, force: bool) -> Sequence[Exporter] | None:
        # Forced at start and on a reload (SIGHUP): then, and not on every poll, a pattern
        # that matches nothing is worth a warning (a typo, or files not deployed yet).
        files = self._files(warn=force)
        signature = []
        for path in files:
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed between glob and stat
                continue
            signature.append((path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode,
                              st.st_uid, st.st_gid))
        unchanged = tuple(signature) == self._signature
        self._signature = tuple(signature)  # a broken state is reported once, not each poll
        if unchanged and not force:
            return None
        exporters: list[Exporter] = []
        seen: dict[str, str] = {}
        problems: list[str] = []
        for path, *_ in signature:
            insecure = filetrust.write_problems(path, own_dir_strict=True)
            if insecure and not self._allow_insecure:
                problems.append(f"{path}: refused, other users could change what it says "
                                f"(discovery.allow_insecure_files: true loads it anyway): "
                                + "; ".join(insecure))
                continue
            for problem in insecure:
                log.warning("INSECURE file_sd file loaded (discovery.allow_insecure_files)",
                            extra={"fields": {"file": path, "problem": problem}})
            try:
                found = read_file_sd(path)
            except DiscoveryError as exc:
                problems.append(str(exc))
                continue
            own, tls = files[path].token, files[path].tls
            for exporter in found:
                exporter = dataclasses.replace(
                    exporter, token=self._resolve(self.name, exporter.url, own), tls=tls)
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

    def __init__(self, settings: PrometheusSD, *, resolve: TokenResolver = own_token_only
                 ) -> None:
        self.settings = settings
        self.interval: float | None = settings.refresh_interval
        self._resolve = resolve
        self.token_key: tuple[object, ...] = ()  # what sources_for compares on a reload
        # No proxy from the environment, and no redirects: a redirect would send the request
        # (and whatever it carries) to a server nobody configured.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   _NoRedirects())

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
            raw_labels = target.get("labels")
            labels: Mapping[str, Any] = raw_labels if isinstance(raw_labels, Mapping) else {}
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
        exporter = exporter_from_target(address, text_labels, token=None,
                                        source=self.name, origin=self.settings.url,
                                        scheme=scheme, path=path)
        return dataclasses.replace(exporter, token=self._resolve(self.name, exporter.url,
                                                                 self.settings.token),
                                   tls=self.settings.tls)

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
            if 300 <= exc.code < 400 and exc.headers.get("Location"):
                location = exc.headers["Location"]
                raise DiscoveryError(f"{url}: HTTP {exc.code} redirect to {location[:200]!r} "
                                     "not followed; configure prometheus.url as the "
                                     "server's own address") from None
            raise DiscoveryError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                reason = f"timeout after {timeout} s"
            raise DiscoveryError(f"{url}: {reason}") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect, so a 3xx answer is an HTTPError like any other status."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


def sources_for(config: Config, previous: Sequence[Source] = ()) -> list[Source]:
    """The sources a configuration names; an unchanged Prometheus source is kept as it was.

    Exporters get tokens by `config.exporter_token_for`; a source whose exporters would get
    none while an exporter_token is set is logged, as a likely oversight.
    """
    resolve = config.exporter_token_for
    sources: list[Source] = [StaticSource(config)]
    if config.file_sd:
        sources.append(FileSDSource(config.file_sd, interval=config.discovery.refresh_interval,
                                    resolve=resolve,
                                    allow_insecure=config.discovery.allow_insecure_files))
    if config.prometheus is not None:
        for old in previous:
            if isinstance(old, PrometheusSource) and old.settings == config.prometheus \
                    and old.token_key == _token_key(config):
                sources.append(old)
                break
        else:
            source = PrometheusSource(config.prometheus, resolve=resolve)
            source.token_key = _token_key(config)
            sources.append(source)
    _note_tokenless_sources(config)
    return sources


def _token_key(config: Config) -> tuple[object, ...]:
    """What decides the tokens a source's exporters get, to tell whether it changed."""
    return (config.exporter_token, config.exporter_token_scope)


def _note_tokenless_sources(config: Config) -> None:
    if config.exporter_token is None or config.exporter_token_scope.urls:
        return
    scope = config.exporter_token_scope.sources
    tokenless = [f"file_sd[{i}]" for i, entry in enumerate(config.file_sd)
                 if entry.token is None and "file_sd" not in scope]
    if config.prometheus is not None and config.prometheus.token is None \
            and "prometheus" not in scope:
        tokenless.append("prometheus")
    if tokenless:
        log.warning("exporter_token is not sent to the exporters of these sources (they have "
                    "no token and exporter_token_scope.sources does not name them)",
                    extra={"fields": {"sources": ",".join(tokenless)}})
