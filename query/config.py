"""The query service's configuration: `load(path) -> Config`, every problem named by key path.

    listen: 127.0.0.1:8080
    threads: 16
    head_timeout: 10                                # seconds to deliver a complete request
    log_level: info
    timeouts: {exporter: 2.0, request: 5.0}        # seconds
    fanout: {max_in_flight: 1024, max_body_bytes: 1048576, max_list_body_bytes: 16777216,
             max_list_processes: 100000,            # per exporter's list answer
             max_buffered_bytes: 268435456,         # answers being read at once, in all
             max_waiting_per_exporter: 4,           # default: a quarter of `threads`
             circuit_cooldown: 5.0}                 # seconds an exporter's circuit stays open
    exporter_token: "<token>"                       # the fleet-wide exporter bearer token
    exporter_token_scope: {sources: [static],       # who gets it: these sources' exporters,
                           urls: ["https://*.prod.example.net:9256"]}   # only these origins
    auth:
      enabled: true
      protect_metrics: true                         # /metrics needs node:read (else open)
      api_keys:
        - {name: grafana, sha256: "<hex>", permissions: [process:read]}
    exporters:                                      # static discovery
      - {hostname: web-01, url: "https://10.0.0.1:9256", labels: {group: web.prod},
         maintenance: false, token: "<token>",
         tls: {ca_file: ca.crt, server_name: web-01.example.net,   # how to check https
               cert_file: client.crt, key_file: client.key}}       # exporters (see below)
    file_sd: ["/etc/prometheus/targets/*.yml",      # Prometheus file_sd files (globs)
              {files: ["/etc/procfleet/sd/*.yml"], token: "<token>",   # with their token
               tls: {ca_file: ca.crt}}]                                # and TLS settings
    prometheus: {url: "http://127.0.0.1:9090", job: procfleet, token: "<token>",
                 tls: {ca_file: ca.crt},            # for the exporters it names, as token
                 refresh_interval: 30, timeout: 5}   # a Prometheus job's active targets
    discovery: {refresh_interval: 5,                # seconds between file_sd checks
                allow_insecure_files: false}        # load files others may write (warns)

A relative `file_sd` pattern or `tls` file is relative to the configuration file's directory,
as in Prometheus. `tls` applies to the https exporters of its entry or source: their
certificate is verified against `ca_file` (else the system's CAs) for the name
`server_name` (else the URL's host); `cert_file`/`key_file` are a client certificate for
exporters that ask for one (`client_auth_type` in their --web.config.file).

With no file, `default_config()` is a single-machine setup: the local exporter known as this
host's name, authentication off (the command line then refuses non-loopback addresses).
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from procfleet import filetrust
from procfleet.configcheck import ConfigError, Problems, is_sha256_hex, read_yaml
from procfleet.hostnames import hostname_problem, is_hostname
from procfleet.logs import LOG_LEVELS
from procfleet.netaddr import ListenError, parse_listen
from query.httpclient import ClientTLS
from query.targets import is_label_key, is_label_value

# process:read-environ: `?expand=environ` (or all) shows processes' environment variables;
# process:execute: the signal action.
PERMISSIONS = ("process:read", "node:read", "process:read-environ", "process:execute")
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_EXPORTER_URL = "http://127.0.0.1:9256"
FILE_SD_SUFFIXES = (".json", ".yml", ".yaml")
_DEFAULT_PORTS = {"http": 80, "https": 443}

__all__ = ["ConfigError", "Config", "load", "default_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Per-exporter timeout and whole-request deadline, in seconds."""

    exporter: float = 2.0
    request: float = 5.0


@dataclass(frozen=True)
class FanoutLimits:
    """How much the fan-out may hold at once and read from one exporter."""

    # 1,000 exporters answering in 20-200 ms need every call in flight at once to stream
    # the last line within 50 ms of the slowest (issue 11; 256 made it +357 ms).
    max_in_flight: int = 1024
    max_body_bytes: int = 1024 * 1024
    max_list_body_bytes: int = 16 * 1024 * 1024
    # Decoding, not reading, is what a list answer costs in memory: bound it in processes.
    max_list_processes: int = 100_000
    # Answer bytes the broadcast calls in flight may hold at once while reading them.
    max_buffered_bytes: int = 256 * 1024 * 1024
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
    """Whether API keys are required, and which ones exist.

    `protect_metrics` (as the exporter's key of that name): with auth enabled, `/metrics`
    needs a key with `node:read`, because its series name every exporter as `/node` does.
    """

    enabled: bool = True
    api_keys: tuple[ApiKey, ...] = ()
    protect_metrics: bool = True


@dataclass(frozen=True)
class ExporterEntry:
    """One `exporters:` entry of static discovery."""

    hostname: str
    url: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    maintenance: bool = False
    token: str | None = field(default=None, repr=False)
    tls: ClientTLS | None = None


@dataclass(frozen=True)
class FileSDEntry:
    """One `file_sd:` entry: its glob patterns, and the token and TLS settings its exporters
    get (if any)."""

    files: tuple[str, ...]
    token: str | None = field(default=None, repr=False)
    tls: ClientTLS | None = None


@dataclass(frozen=True)
class OriginPattern:
    """An `exporter_token_scope.urls` pattern: `scheme://host[:port]`, `*` in the host.

    `*` stands for any run of letters, digits, `-`, `_` and `.`, so it never reaches past
    the host into a port, a path or credentials; the port defaults to the scheme's.
    """

    text: str
    scheme: str
    host: re.Pattern[str] = field(compare=False)
    port: int

    def matches(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        return (parts.scheme == self.scheme and port == self.port
                and self.host.fullmatch(parts.hostname or "") is not None)


@dataclass(frozen=True)
class TokenScope:
    """`exporter_token_scope:`: which exporters the fleet-wide `exporter_token` is sent to.

    Those of the listed sources, and, when `urls` are given, only those whose URL's origin
    matches one. A token of the exporter's own or of its source's beats it.
    """

    sources: frozenset[str] = frozenset({"static"})
    urls: tuple[OriginPattern, ...] = ()

    def covers(self, source: str, url: str) -> bool:
        return source in self.sources and (
            not self.urls or any(pattern.matches(url) for pattern in self.urls))


@dataclass(frozen=True)
class PrometheusSD:
    """`prometheus:`: discover the active targets of one scrape job of a Prometheus server."""

    url: str
    job: str
    refresh_interval: float = 30.0  # seconds between two reads of /api/v1/targets
    timeout: float = 5.0  # seconds, for the whole HTTP call
    token: str | None = field(default=None, repr=False)  # for the exporters it names
    tls: ClientTLS | None = None  # for the exporters it names too


@dataclass(frozen=True)
class DiscoverySettings:
    """`discovery:`: how often file_sd files are checked for changes (their mtimes), and
    whether files other users could change are loaded anyway (with a warning each time)."""

    refresh_interval: float = 5.0
    allow_insecure_files: bool = False


@dataclass(frozen=True)
class Config:
    """Everything the query service is configured with."""

    listen: str = DEFAULT_LISTEN
    threads: int = 16
    head_timeout: float = 10.0
    log_level: str = "info"
    timeouts: Timeouts = Timeouts()
    fanout: FanoutLimits = FanoutLimits()
    exporter_token: str | None = field(default=None, repr=False)
    exporter_token_scope: TokenScope = TokenScope()
    auth: Auth = Auth()
    exporters: tuple[ExporterEntry, ...] = ()
    file_sd: tuple[FileSDEntry, ...] = ()
    prometheus: PrometheusSD | None = None
    discovery: DiscoverySettings = DiscoverySettings()
    source: str = "built-in defaults"

    @property
    def holds_secrets(self) -> bool:
        """Whether the configuration names an exporter token (API keys are only hashes)."""
        return (self.exporter_token is not None or any(e.token for e in self.exporters)
                or any(e.token for e in self.file_sd)
                or (self.prometheus is not None and self.prometheus.token is not None))

    def exporter_token_for(self, source: str, url: str, own: str | None = None
                           ) -> str | None:
        """The token sent to an exporter of `source` at `url`: its own (`own`: of the
        exporter or of its source), else the fleet-wide one if `exporter_token_scope`
        covers it, else none."""
        if own is not None:
            return own
        if self.exporter_token is not None and self.exporter_token_scope.covers(source, url):
            return self.exporter_token
        return None


def default_config() -> Config:
    """The built-in single-machine setup: the local exporter, as this host, auth off."""
    name = socket.gethostname()  # as the exporter reports itself by default
    if not is_hostname(name):
        name = "localhost"
    return Config(
        auth=Auth(enabled=False),
        exporters=(ExporterEntry(hostname=name, url=DEFAULT_EXPORTER_URL),),
    )


def load(path: str | Path, *, allow_insecure: bool = False) -> Config:
    """Read and validate a YAML file, raising ConfigError listing every problem.

    The file decides where the exporter token goes, so it is refused when users other than
    root and this service's user could change it, and, when it holds a token, when every
    user could read it (`procfleet.filetrust`). `allow_insecure` (the command line's
    --allow-insecure-config: the file cannot vouch for itself) loads it with a warning.
    """
    source = str(path)
    data = read_yaml(path)
    problems = filetrust.write_problems(source)
    config = parse(data, source=source, base_dir=Path(path).parent)
    if config.holds_secrets:
        problems += filetrust.read_problems(source)
    if problems and not allow_insecure:
        raise ConfigError(source, [*problems, "refused: other users could change or read "
                                   "this file (--allow-insecure-config loads it anyway)"])
    for problem in problems:
        # The message carries the problem too: at start this comes before logging is set up.
        log.warning("INSECURE configuration file loaded (--allow-insecure-config): %s",
                    problem, extra={"fields": {"file": source}})
    return config


_TOP_KEYS = {"listen", "threads", "head_timeout", "log_level", "timeouts", "fanout",
             "exporter_token", "exporter_token_scope", "auth", "exporters", "file_sd",
             "prometheus", "discovery"}
SOURCES = ("static", "file_sd", "prometheus")


def parse(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Build a Config from parsed YAML, raising ConfigError listing every problem.

    Relative `file_sd` patterns are taken relative to `base_dir` when it is given.
    """
    problems = Problems()
    data = problems.top_mapping(data, source)
    problems.unknown_keys(data, _TOP_KEYS, "")

    listen = problems.typed(data, "listen", str, DEFAULT_LISTEN, "")
    try:
        parse_listen(listen)
    except ListenError as exc:
        problems.add("listen", str(exc))
    threads = problems.typed(data, "threads", int, 16, "")
    if not 1 <= threads <= 1024:
        problems.add("threads", f"must be 1 to 1024, got {threads}")
    head_timeout = problems.number(data, "head_timeout", 10.0, "")
    if not 1 <= head_timeout <= 300:
        problems.add("head_timeout", f"must be 1 to 300 seconds, got {head_timeout}")
    log_level = problems.one_of(data, "log_level", LOG_LEVELS, "info", "")
    exporter_token = _token(problems, data, "exporter_token", "")

    config = Config(
        listen=listen,
        threads=threads,
        head_timeout=head_timeout,
        log_level=log_level,
        timeouts=_timeouts(problems, data.get("timeouts")),
        fanout=_fanout(problems, data.get("fanout"), threads),
        exporter_token=exporter_token,
        exporter_token_scope=_token_scope(problems, data.get("exporter_token_scope")),
        auth=_auth(problems, data.get("auth")),
        exporters=_exporters(problems, data.get("exporters"), base_dir),
        file_sd=_file_sd(problems, data.get("file_sd"), base_dir),
        prometheus=_prometheus(problems, data.get("prometheus"), base_dir),
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
                                 "max_buffered_bytes", "circuit_cooldown"}, "fanout")
    values: dict[str, Any] = {}
    for key, minimum in (("max_in_flight", 1), ("max_body_bytes", 1024),
                         ("max_list_body_bytes", 1024), ("max_list_processes", 1),
                         ("max_waiting_per_exporter", 1), ("max_buffered_bytes", 1024)):
        default = getattr(defaults, key)
        value = problems.typed(data, key, int, default, "fanout")
        if value < minimum:
            problems.add(f"fanout.{key}", f"must be at least {minimum}, got {value}")
            value = default
        values[key] = value
    largest = max(values["max_body_bytes"], values["max_list_body_bytes"])
    if values["max_buffered_bytes"] < largest:
        problems.add("fanout.max_buffered_bytes",
                     f"must be at least the largest answer allowed (max_body_bytes, "
                     f"max_list_body_bytes: {largest}), got {values['max_buffered_bytes']}")
        values["max_buffered_bytes"] = max(defaults.max_buffered_bytes, largest)
    cooldown = problems.number(data, "circuit_cooldown", defaults.circuit_cooldown, "fanout")
    if cooldown > 3600:
        problems.add("fanout.circuit_cooldown", f"must be at most 3600, got {cooldown}")
        cooldown = defaults.circuit_cooldown
    return FanoutLimits(**values, circuit_cooldown=cooldown)


def _auth(problems: Problems, raw: Any) -> Auth:
    data = problems.mapping(raw, "auth")
    problems.unknown_keys(data, {"enabled", "api_keys", "protect_metrics"}, "auth")
    enabled = problems.typed(data, "enabled", bool, True, "auth")
    protect_metrics = problems.typed(data, "protect_metrics", bool, True, "auth")
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
        elif not is_sha256_hex(digest):
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
    return Auth(enabled=enabled, api_keys=tuple(keys), protect_metrics=protect_metrics)


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


def _exporters(problems: Problems, raw: Any, base_dir: Path | None = None
               ) -> tuple[ExporterEntry, ...]:
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
        problems.unknown_keys(item, {"hostname", "url", "labels", "maintenance", "token", "tls"},
                              path)
        hostname = problems.typed(item, "hostname", str, "", path)
        if not hostname:
            problems.add(f"{path}.hostname", "is required")
        elif (why := hostname_problem(hostname)) is not None:
            problems.add(f"{path}.hostname", why)
        elif hostname in seen:
            problems.add(f"{path}.hostname", f"{hostname!r} is already exporters[{seen[hostname]}]")
        else:
            seen[hostname] = i
        url = _url(problems, item, path)
        labels = _labels(problems, item.get("labels"), f"{path}.labels")
        maintenance = problems.typed(item, "maintenance", bool, False, path)
        token = _token(problems, item, "token", path)
        tls = _client_tls(problems, item, path, base_dir)
        if tls is not None and url and not url.startswith("https://"):
            problems.add(f"{path}.tls", "is for https:// exporters; the url is not one")
        entries.append(ExporterEntry(hostname=hostname, url=url, labels=labels,
                                     maintenance=maintenance, token=token, tls=tls))
    return tuple(entries)


def _file_sd(problems: Problems, raw: Any, base_dir: Path | None) -> tuple[FileSDEntry, ...]:
    """`file_sd:` entries: a pattern, or `{files: pattern or [patterns], token: ...}`."""
    if raw is None:
        return ()
    if isinstance(raw, str | Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        problems.add("file_sd", f"must be a list of file patterns, got {type(raw).__name__}")
        return ()
    entries: list[FileSDEntry] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(raw):
        where = f"file_sd[{i}]"
        token = None
        tls = None
        if isinstance(item, Mapping):
            problems.unknown_keys(item, {"files", "token", "tls"}, where)
            token = _token(problems, item, "token", where)
            tls = _client_tls(problems, item, where, base_dir)
            files = item.get("files")
            if isinstance(files, str):
                files = [files]
            if not isinstance(files, list) or not files:
                problems.add(f"{where}.files", "is required: a file pattern or a list of them")
                continue
            named = [(f"{where}.files[{j}]", pattern) for j, pattern in enumerate(files)]
        else:
            named = [(where, item)]
        patterns: list[str] = []
        for at, pattern in named:
            if not isinstance(pattern, str) or not pattern.strip():
                problems.add(at, "must be a non-empty file pattern such as "
                             "/etc/prometheus/targets/*.yml")
                continue
            if not pattern.endswith(FILE_SD_SUFFIXES):
                problems.add(at, f"{pattern!r} must end in .json, .yml or .yaml (the format)")
                continue
            if base_dir is not None and not Path(pattern).is_absolute():
                pattern = str(base_dir / pattern)
            if pattern in seen:  # one file, one token: a pattern may not be in two entries
                if seen[pattern] != at:
                    problems.add(at, f"{pattern!r} is already {seen[pattern]}")
                continue
            seen[pattern] = at
            patterns.append(pattern)
        if patterns:
            entries.append(FileSDEntry(files=tuple(patterns), token=token, tls=tls))
    return tuple(entries)


def _token_scope(problems: Problems, raw: Any) -> TokenScope:
    path = "exporter_token_scope"
    data = problems.mapping(raw, path)
    problems.unknown_keys(data, {"sources", "urls"}, path)
    sources = problems.typed(data, "sources", list, ["static"], path)
    for j, source in enumerate(sources):
        if source not in SOURCES:
            problems.add(f"{path}.sources[{j}]", f"unknown source {source!r} (expected one "
                         f"of: {', '.join(SOURCES)})")
    patterns: list[OriginPattern] = []
    for j, text in enumerate(problems.typed(data, "urls", list, [], path)):
        pattern = _origin_pattern(text)
        if isinstance(pattern, str):
            problems.add(f"{path}.urls[{j}]", pattern)
        else:
            patterns.append(pattern)
    return TokenScope(sources=frozenset(s for s in sources if s in SOURCES),
                      urls=tuple(patterns))


_HOST_GLOB_RE = re.compile(r"[A-Za-z0-9*._-]+")


def _origin_pattern(text: Any) -> OriginPattern | str:
    """The pattern, or what is wrong with it."""
    usage = "must be scheme://host[:port] with '*' in the host, e.g. https://*.example.net:9256"
    if not isinstance(text, str):
        return f"{usage}, got {type(text).__name__}"
    scheme, sep, rest = text.partition("://")
    host, _, port_text = rest.partition(":")
    if not sep or scheme not in _DEFAULT_PORTS or not _HOST_GLOB_RE.fullmatch(host):
        return f"{usage}, got {text[:100]!r}"
    if port_text and not (port_text.isascii() and port_text.isdigit()
                          and 0 < int(port_text) < 65536):
        return f"port must be 1 to 65535, got {port_text[:20]!r}"
    regex = r"[A-Za-z0-9._-]*".join(re.escape(part) for part in host.split("*"))
    return OriginPattern(text=text, scheme=scheme, host=re.compile(regex, re.IGNORECASE),
                         port=int(port_text) if port_text else _DEFAULT_PORTS[scheme])


def _prometheus(problems: Problems, raw: Any, base_dir: Path | None = None
                ) -> PrometheusSD | None:
    if raw is None:
        return None
    data = problems.mapping(raw, "prometheus")
    if not isinstance(raw, Mapping):
        return None
    problems.unknown_keys(data, {"url", "job", "refresh_interval", "timeout", "token", "tls"},
                          "prometheus")
    url = _url(problems, data, "prometheus")
    job = problems.typed(data, "job", str, "", "prometheus")
    if not job:
        problems.add("prometheus.job", "is required: the job_name whose targets to use")
    refresh = problems.number(data, "refresh_interval", 30.0, "prometheus")
    timeout = problems.number(data, "timeout", 5.0, "prometheus")
    token = _token(problems, data, "token", "prometheus")
    return PrometheusSD(url=url, job=job, refresh_interval=refresh, timeout=timeout,
                        token=token, tls=_client_tls(problems, data, "prometheus", base_dir))


_TLS_KEYS = {"ca_file", "server_name", "cert_file", "key_file"}


def _client_tls(problems: Problems, item: Mapping[str, Any], path: str,
                base_dir: Path | None) -> ClientTLS | None:
    """`tls:` of an exporter entry or source, its files checked by loading them."""
    if item.get("tls") is None:
        return None
    where = f"{path}.tls"
    data = problems.mapping(item["tls"], where)
    problems.unknown_keys(data, _TLS_KEYS, where)
    files: dict[str, str | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = problems.typed(data, key, str, None, where)
        if value is not None and base_dir is not None and not Path(value).is_absolute():
            value = str(base_dir / value)
        if value is not None and not Path(value).is_file():
            problems.add(f"{where}.{key}", f"no such file: {value}")
            value = None
        files[key] = value
    if ("cert_file" in data) != ("key_file" in data):
        problems.add(where, "cert_file and key_file go together (a client certificate)")
    server_name = problems.typed(data, "server_name", str, None, where)
    if server_name is not None and not is_hostname(server_name):
        problems.add(f"{where}.server_name", "must be a host name")
        server_name = None
    tls = ClientTLS(ca_file=files["ca_file"], server_name=server_name,
                    cert_file=files["cert_file"], key_file=files["key_file"])
    try:
        tls.context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        problems.add(where, f"cannot use its CA or client certificate: {reason}")
    return tls


def _discovery(problems: Problems, raw: Any) -> DiscoverySettings:
    data = problems.mapping(raw, "discovery")
    problems.unknown_keys(data, {"refresh_interval", "allow_insecure_files"}, "discovery")
    return DiscoverySettings(
        refresh_interval=problems.number(data, "refresh_interval", 5.0, "discovery"),
        allow_insecure_files=problems.typed(data, "allow_insecure_files", bool, False,
                                            "discovery"))


def _url(problems: Problems, item: Mapping[str, Any], path: str) -> str:
    url: str = problems.typed(item, "url", str, "", path)
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
