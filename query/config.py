"""The query service's configuration: `load(path) -> Config`, every problem named by key path.

    listen: 127.0.0.1:8080
    threads: 16
    log_level: info
    timeouts: {exporter: 2.0, request: 5.0}        # seconds
    fanout: {max_in_flight: 256, max_body_bytes: 1048576, max_list_body_bytes: 16777216,
             max_list_processes: 100000,            # per exporter's list answer
             max_waiting_per_exporter: 4,           # default: a quarter of `threads`
             circuit_cooldown: 5.0}                 # seconds an exporter's circuit stays open
    exporter_token: "<token>"                       # default bearer token for the exporters
    auth:
      enabled: true
      api_keys:
        - {name: grafana, sha256: "<hex>", permissions: [process:read]}
    exporters:                                      # static discovery
      - {hostname: web-01, url: "http://10.0.0.1:9256", labels: {group: web.prod},
         maintenance: false, token: "<token>"}
    file_sd: ["/etc/prometheus/targets/*.yml"]      # Prometheus file_sd files (globs)
    prometheus: {url: "http://127.0.0.1:9090", job: procfleet,
                 refresh_interval: 30, timeout: 5}   # a Prometheus job's active targets
    discovery: {refresh_interval: 5}                # seconds between file_sd checks

A relative `file_sd` pattern is relative to the configuration file's directory, as in
Prometheus.

With no file, `default_config()` is a single-machine setup: the local exporter known as this
host's name, authentication off (the command line then refuses non-loopback addresses).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from procfleet.configcheck import ConfigError, Problems, read_yaml
from procfleet.serve import ListenError, parse_listen
from query.targets import is_hostname, is_label_key, is_label_value

PERMISSIONS = ("process:read", "node:read")
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_EXPORTER_URL = "http://127.0.0.1:9256"
LOG_LEVELS = ("debug", "info", "warning", "error")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
FILE_SD_SUFFIXES = (".json", ".yml", ".yaml")

__all__ = ["ConfigError", "Config", "load", "default_config"]


@dataclass(frozen=True)
class Timeouts:
    """Per-exporter timeout and whole-request deadline, in seconds."""

    exporter: float = 2.0
    request: float = 5.0


@dataclass(frozen=True)
class FanoutLimits:
    """How much the fan-out may hold at once and read from one exporter."""

    max_in_flight: int = 256
    max_body_bytes: int = 1024 * 1024
    max_list_body_bytes: int = 16 * 1024 * 1024
    # Decoding, not reading, is what a list answer costs in memory: bound it in processes.
    max_list_processes: int = 100_000
    # Requests (each holding one of `threads`) that may wait on one exporter at a time.
    max_waiting_per_exporter: int = 4
    circuit_cooldown: float = 5.0


@dataclass(frozen=True)
class ApiKey:
    """One API key as configured: only its SHA-256 hash is known."""

    name: str
    sha256: str = field(repr=False)
    permissions: frozenset[str]


@dataclass(frozen=True)
class Auth:
    """Whether API keys are required, and which ones exist."""

    enabled: bool = True
    api_keys: tuple[ApiKey, ...] = ()


@dataclass(frozen=True)
class ExporterEntry:
    """One `exporters:` entry of static discovery."""

    hostname: str
    url: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    maintenance: bool = False
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PrometheusSD:
    """`prometheus:`: discover the active targets of one scrape job of a Prometheus server."""

    url: str
    job: str
    refresh_interval: float = 30.0  # seconds between two reads of /api/v1/targets
    timeout: float = 5.0  # seconds, for the whole HTTP call


@dataclass(frozen=True)
class DiscoverySettings:
    """`discovery:`: how often file_sd files are checked for changes (their mtimes)."""

    refresh_interval: float = 5.0


@dataclass(frozen=True)
class Config:
    """Everything the query service is configured with."""

    listen: str = DEFAULT_LISTEN
    threads: int = 16
    log_level: str = "info"
    timeouts: Timeouts = Timeouts()
    fanout: FanoutLimits = FanoutLimits()
    exporter_token: str | None = field(default=None, repr=False)
    auth: Auth = Auth()
    exporters: tuple[ExporterEntry, ...] = ()
    file_sd: tuple[str, ...] = ()
    prometheus: PrometheusSD | None = None
    discovery: DiscoverySettings = DiscoverySettings()
    source: str = "built-in defaults"


def default_config() -> Config:
    """The built-in single-machine setup: the local exporter, as this host, auth off."""
    name = socket.gethostname()  # as the exporter reports itself by default
    if not is_hostname(name):
        name = "localhost"
    return Config(
        auth=Auth(enabled=False),
        exporters=(ExporterEntry(hostname=name, url=DEFAULT_EXPORTER_URL),),
    )


def load(path: str | Path) -> Config:
    """Read and validate a YAML file, raising ConfigError listing every problem."""
    return parse(read_yaml(path), source=str(path), base_dir=Path(path).parent)


_TOP_KEYS = {"listen", "threads", "log_level", "timeouts", "fanout", "exporter_token", "auth",
             "exporters", "file_sd", "prometheus", "discovery"}


def parse(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Build a Config from parsed YAML, raising ConfigError listing every problem.

    Relative `file_sd` patterns are taken relative to `base_dir` when it is given.
    """
    problems = Problems()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.add("", f"the top level must be a mapping, got {type(data).__name__}")
        problems.raise_if_any(source)
    problems.unknown_keys(data, _TOP_KEYS, "")

    listen = problems.typed(data, "listen", str, DEFAULT_LISTEN, "")
    try:
        parse_listen(listen)
    except ListenError as exc:
        problems.add("listen", str(exc))
    threads = problems.typed(data, "threads", int, 16, "")
    if not 1 <= threads <= 1024:
        problems.add("threads", f"must be 1 to 1024, got {threads}")
    log_level = problems.typed(data, "log_level", str, "info", "")
    if log_level not in LOG_LEVELS:
        problems.add("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    exporter_token = _token(problems, data, "exporter_token", "")

    config = Config(
        listen=listen,
        threads=threads,
        log_level=log_level,
        timeouts=_timeouts(problems, data.get("timeouts")),
        fanout=_fanout(problems, data.get("fanout"), threads),
        exporter_token=exporter_token,
        auth=_auth(problems, data.get("auth")),
        exporters=_exporters(problems, data.get("exporters")),
        file_sd=_file_sd(problems, data.get("file_sd"), base_dir),
        prometheus=_prometheus(problems, data.get("prometheus")),
        discovery=_discovery(problems, data.get("discovery")),
        source=source,
    )
    problems.raise_if_any(source)
    return config


def _timeouts(problems: Problems, raw: Any) -> Timeouts:
    data = problems.mapping(raw, "timeouts")
    problems.unknown_keys(data, {"exporter", "request"}, "timeouts")
    exporter = problems.number(data, "exporter", 2.0, "timeouts")
    request = problems.number(data, "request", 5.0, "timeouts")
    if exporter > request:
        problems.add("timeouts.exporter",
                     f"must not exceed timeouts.request ({exporter} > {request})")
    return Timeouts(exporter=exporter, request=request)


def _fanout(problems: Problems, raw: Any, threads: int = 16) -> FanoutLimits:
    data = problems.mapping(raw, "fanout")
    # One exporter may hold at most a quarter of the threads, so a hung one leaves the rest.
    defaults = FanoutLimits(max_waiting_per_exporter=max(1, threads // 4))
    problems.unknown_keys(data, {"max_in_flight", "max_body_bytes", "max_list_body_bytes",
                                 "max_list_processes", "max_waiting_per_exporter",
                                 "circuit_cooldown"}, "fanout")
    values: dict[str, Any] = {}
    for key, minimum in (("max_in_flight", 1), ("max_body_bytes", 1024),
                         ("max_list_body_bytes", 1024), ("max_list_processes", 1),
                         ("max_waiting_per_exporter", 1)):
        default = getattr(defaults, key)
        value = problems.typed(data, key, int, default, "fanout")
        if value < minimum:
            problems.add(f"fanout.{key}", f"must be at least {minimum}, got {value}")
            value = default
        values[key] = value
    cooldown = problems.number(data, "circuit_cooldown", defaults.circuit_cooldown, "fanout")
    if cooldown > 3600:
        problems.add("fanout.circuit_cooldown", f"must be at most 3600, got {cooldown}")
        cooldown = defaults.circuit_cooldown
    return FanoutLimits(**values, circuit_cooldown=cooldown)


def _auth(problems: Problems, raw: Any) -> Auth:
    data = problems.mapping(raw, "auth")
    problems.unknown_keys(data, {"enabled", "api_keys"}, "auth")
    enabled = problems.typed(data, "enabled", bool, True, "auth")
    raw_keys = problems.typed(data, "api_keys", list, [], "auth")
    keys: list[ApiKey] = []
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, item in enumerate(raw_keys):
        path = f"auth.api_keys[{i}]"
        if not isinstance(item, Mapping):
            problems.add(path, f"must be a mapping, got {type(item).__name__}")
            continue
        problems.unknown_keys(item, {"name", "sha256", "permissions"}, path)
        name = problems.typed(item, "name", str, "", path)
        if not name:
            problems.add(f"{path}.name", "is required")
        elif name in names:
            problems.add(f"{path}.name", f"duplicate of auth.api_keys[{names[name]}].name")
        else:
            names[name] = i
        digest = problems.typed(item, "sha256", str, "", path).lower()
        if not digest:
            problems.add(f"{path}.sha256", "is required (make one with `procfleet-query keygen`)")
        elif not _SHA256_RE.fullmatch(digest):
            problems.add(f"{path}.sha256", "must be 64 hexadecimal digits")
        elif digest in hashes:
            problems.add(f"{path}.sha256", f"same key as auth.api_keys[{hashes[digest]}]")
        else:
            hashes[digest] = i
        permissions = _permissions(problems, item, path)
        keys.append(ApiKey(name=name, sha256=digest, permissions=permissions))
    if enabled and not raw_keys and (raw is None or isinstance(raw, Mapping)):
        problems.add("auth.api_keys", "must list at least one key when auth.enabled is true "
                     "(make one with `procfleet-query keygen`)")
    return Auth(enabled=enabled, api_keys=tuple(keys))


def _permissions(problems: Problems, item: Mapping[str, Any], path: str) -> frozenset[str]:
    raw = problems.typed(item, "permissions", list, None, path)
    if raw is None:
        if "permissions" not in item or item["permissions"] is None:
            problems.add(f"{path}.permissions", f"is required (any of: {', '.join(PERMISSIONS)})")
        return frozenset()
    if not raw:
        problems.add(f"{path}.permissions", "must not be empty")
    for j, permission in enumerate(raw):
        if permission not in PERMISSIONS:
            problems.add(f"{path}.permissions[{j}]",
                         f"unknown permission {permission!r} (expected one of: "
                         f"{', '.join(PERMISSIONS)})")
    return frozenset(p for p in raw if p in PERMISSIONS)


def _exporters(problems: Problems, raw: Any) -> tuple[ExporterEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add("exporters", f"must be a list, got {type(raw).__name__}")
        return ()
    entries: list[ExporterEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"exporters[{i}]"
        if not isinstance(item, Mapping):
            problems.add(path, f"must be a mapping, got {type(item).__name__}")
            continue
        problems.unknown_keys(item, {"hostname", "url", "labels", "maintenance", "token"}, path)
        hostname = problems.typed(item, "hostname", str, "", path)
        if not hostname:
            problems.add(f"{path}.hostname", "is required")
        elif not is_hostname(hostname):
            problems.add(f"{path}.hostname", f"{hostname!r} is not a hostname: letters, digits, "
                         "'-', '_' and '.', not beginning with '_'")
        elif hostname in seen:
            problems.add(f"{path}.hostname", f"{hostname!r} is already exporters[{seen[hostname]}]")
        else:
            seen[hostname] = i
        url = _url(problems, item, path)
        labels = _labels(problems, item.get("labels"), f"{path}.labels")
        maintenance = problems.typed(item, "maintenance", bool, False, path)
        token = _token(problems, item, "token", path)
        entries.append(ExporterEntry(hostname=hostname, url=url, labels=labels,
                                     maintenance=maintenance, token=token))
    return tuple(entries)


def _file_sd(problems: Problems, raw: Any, base_dir: Path | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        problems.add("file_sd", f"must be a list of file patterns, got {type(raw).__name__}")
        return ()
    patterns: list[str] = []
    for i, pattern in enumerate(raw):
        where = f"file_sd[{i}]"
        if not isinstance(pattern, str) or not pattern.strip():
            problems.add(where, "must be a non-empty file pattern such as "
                         "/etc/prometheus/targets/*.yml")
            continue
        if not pattern.endswith(FILE_SD_SUFFIXES):
            problems.add(where, f"{pattern!r} must end in .json, .yml or .yaml (the format)")
            continue
        if base_dir is not None and not Path(pattern).is_absolute():
            pattern = str(base_dir / pattern)
        patterns.append(pattern)
    return tuple(dict.fromkeys(patterns))


def _prometheus(problems: Problems, raw: Any) -> PrometheusSD | None:
    if raw is None:
        return None
    data = problems.mapping(raw, "prometheus")
    if not isinstance(raw, Mapping):
        return None
    problems.unknown_keys(data, {"url", "job", "refresh_interval", "timeout"}, "prometheus")
    url = _url(problems, data, "prometheus")
    job = problems.typed(data, "job", str, "", "prometheus")
    if not job:
        problems.add("prometheus.job", "is required: the job_name whose targets to use")
    refresh = problems.number(data, "refresh_interval", 30.0, "prometheus")
    timeout = problems.number(data, "timeout", 5.0, "prometheus")
    return PrometheusSD(url=url, job=job, refresh_interval=refresh, timeout=timeout)


def _discovery(problems: Problems, raw: Any) -> DiscoverySettings:
    data = problems.mapping(raw, "discovery")
    problems.unknown_keys(data, {"refresh_interval"}, "discovery")
    return DiscoverySettings(
        refresh_interval=problems.number(data, "refresh_interval", 5.0, "discovery"))


def _url(problems: Problems, item: Mapping[str, Any], path: str) -> str:
    url = problems.typed(item, "url", str, "", path)
    where = f"{path}.url"
    if not url:
        problems.add(where, "is required")
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        problems.add(where, f"{url!r} is not a URL: {exc}")
        return url
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.add(where, f"must be an http:// or https:// URL with a host, got {url!r}")
    elif parts.username is not None or parts.password is not None:
        problems.add(where, "must not hold credentials; use token: instead")
    elif parts.query or parts.fragment:
        problems.add(where, "must not have a query string or fragment")
    return url.rstrip("/")


def _labels(problems: Problems, raw: Any, path: str) -> Mapping[str, str]:
    data = problems.mapping(raw, path)
    labels: dict[str, str] = {}
    for key, value in data.items():
        where = f"{path}.{key}"
        if not isinstance(key, str) or not is_label_key(key):
            problems.add(where, "invalid label key: use letters, digits, '-' and '_'")
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            problems.add(where, f"must be a string, got {type(value).__name__}")
            continue
        text = str(value)
        if not is_label_value(text):
            problems.add(where, f"invalid label value {text!r}: dot-separated segments of "
                         "letters, digits, '-' and '_'")
            continue
        labels[key] = text
    return MappingProxyType(labels)


def _token(problems: Problems, data: Mapping[str, Any], key: str, path: str) -> str | None:
    token = problems.typed(data, key, str, None, path)
    if token is not None and (not token or any(c.isspace() for c in token)):
        problems.add(f"{path}.{key}" if path else key, "must be a non-empty string without spaces")
        return None
    return token
