"""Exporter configuration: `load(path) -> Config`, every problem named by key path at once."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exporter.actions import SignalPolicy, parse_actions
from exporter.groups import GROUP_NAME_MAX, GroupMatcher, expected_names, parse_groups
from exporter.masking import Masker, backtracking_risk, check_pattern
from exporter.rates import DEFAULT_INTERVAL, DEFAULT_MAX_PROCESSES, INTERVAL_MAX, INTERVAL_MIN
from procfleet.configcheck import ConfigError, Problems, is_sha256_hex, read_yaml
from procfleet.hostnames import hostname_problem
from procfleet.logs import LOG_LEVELS
from procfleet.netaddr import ListenError, parse_listen

DEFAULT_LISTEN = "127.0.0.1:9256"

MAX_TOP_N = 1000
_PER_PROCESS_BY = ("cpu", "memory")
_METRICS_KEYS = {"drop_empty_groups", "per_process_top_n", "per_process_by",
                 "per_process_groups", "smaps", "children", "threads_wchan"}
# Groups exported before any of their processes runs: each is a few series for good.
MAX_EXPECTED_GROUPS = 1000


@dataclass(frozen=True)
class MetricsOptions:
    """What /metrics exposes beyond the group metrics (the `metrics:` config section).

    `per_process_top_n` and `per_process_groups` add series with a `pid` label: one per
    process, so keep them small; they churn as processes come and go.
    """

    drop_empty_groups: bool = False  # process-exporter's -remove-empty-groups
    per_process_top_n: int = 0  # 0 = off
    per_process_by: str = "cpu"  # "cpu" (used since the last scrape) or "memory" (resident)
    per_process_groups: tuple[str, ...] = ()  # every process of these groups
    smaps: bool = False  # proportional memory from smaps_rollup: costly, off by default
    children: bool = True  # process-exporter's -children: unmatched children join the parent
    # namedprocess_namegroup_threads_wchan: one read of /proc/PID/task/TID/wchan per thread
    threads_wchan: bool = False
    # Exported from the first scrape with num_procs 0 (`expected: true` and `expected_groups:`,
    # set by `from_mapping`, not a key of `metrics:`); never dropped when empty.
    expected_groups: tuple[str, ...] = ()


def parse_metrics_options(raw: Any, problems: Problems, path: str = "metrics") -> MetricsOptions:
    """Validate the `metrics:` mapping; unknown keys and wrong types are problems by key path."""
    data = problems.mapping(raw, path)
    problems.unknown_keys(data, _METRICS_KEYS, path)
    defaults = MetricsOptions()
    top_n = problems.typed(data, "per_process_top_n", int, defaults.per_process_top_n, path)
    if not 0 <= top_n <= MAX_TOP_N:
        problems.add(f"{path}.per_process_top_n", f"must be between 0 and {MAX_TOP_N}, "
                     f"got {top_n} (each process is its own series)")
        top_n = 0
    by = problems.typed(data, "per_process_by", str, defaults.per_process_by, path)
    if by not in _PER_PROCESS_BY:
        problems.add(f"{path}.per_process_by",
                     f"must be one of {', '.join(_PER_PROCESS_BY)}, got {by!r}")
        by = defaults.per_process_by
    names = problems.typed(data, "per_process_groups", list, [], path)
    groups = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name:
            groups.append(name)
        else:
            problems.add(f"{path}.per_process_groups[{i}]",
                         f"must be a group name, got {name!r}")
    return MetricsOptions(
        drop_empty_groups=problems.typed(data, "drop_empty_groups", bool, False, path),
        per_process_top_n=top_n,
        per_process_by=by,
        per_process_groups=tuple(groups),
        smaps=problems.typed(data, "smaps", bool, False, path),
        children=problems.typed(data, "children", bool, True, path),
        threads_wchan=problems.typed(data, "threads_wchan", bool, False, path),
    )


@dataclass(frozen=True)
class RatesOptions:
    """The live-rate sampler (the `rates:` config section): its window and its bound."""

    interval_seconds: float = DEFAULT_INTERVAL
    max_processes: int = DEFAULT_MAX_PROCESSES


def interval_problem(value: object) -> str | None:
    """Why `value` is not a sampling interval, or None: the config key's and the flag's rule."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            INTERVAL_MIN <= value <= INTERVAL_MAX):
        return (f"must be a number of seconds from {INTERVAL_MIN:g} to {INTERVAL_MAX:g}, "
                f"got {value!r}")
    return None


def _rates(data: Any, problems: Problems) -> RatesOptions:
    problems.unknown_keys(data, {"interval_seconds", "max_processes"}, "rates")
    interval = data.get("interval_seconds", DEFAULT_INTERVAL)
    why = interval_problem(interval)
    if why:
        problems.add("rates.interval_seconds", why)
        interval = DEFAULT_INTERVAL
    cap = problems.typed(data, "max_processes", int, DEFAULT_MAX_PROCESSES, "rates")
    if not 1 <= cap <= 4_194_304:  # the kernel's largest pid_max
        problems.add("rates.max_processes", f"must be from 1 to 4194304, got {cap}")
        cap = DEFAULT_MAX_PROCESSES
    return RatesOptions(interval_seconds=float(interval), max_processes=cap)


@dataclass(frozen=True)
class ExpandOptions:
    """`?expand=` groups that need the operator's consent (the `expand:` config section)."""

    environ: bool = False  # environment variables hold secrets more often than argv does


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token protection. Only the token's SHA-256 is kept."""

    token_sha256: str | None = None
    protect_metrics: bool = True

    @property
    def enabled(self) -> bool:
        return self.token_sha256 is not None


@dataclass(frozen=True)
class Config:
    """Everything the exporter needs to start; built-in defaults work on one machine."""

    listen: tuple[str, int] = ("127.0.0.1", 9256)
    hostname: str = field(default_factory=socket.gethostname)
    reader: str = "auto"
    log_level: str = "info"
    auth: AuthConfig = AuthConfig()
    masker: Masker = field(default_factory=Masker.build)
    groups: tuple[GroupMatcher, ...] = field(default_factory=lambda: parse_groups(None, Problems()))
    metrics: MetricsOptions = MetricsOptions()
    signal: SignalPolicy = SignalPolicy()  # `actions.signal`: off unless enabled
    rates: RatesOptions = RatesOptions()
    expand: ExpandOptions = ExpandOptions()
    source: str = "built-in defaults"

    def with_overrides(self, *, listen: tuple[str, int] | None = None,
                       hostname: str | None = None,
                       metrics: dict[str, Any] | None = None,
                       rate_interval: float | None = None) -> Config:
        """Command-line flags beat the file; `metrics` replaces MetricsOptions fields."""
        changes: dict[str, Any] = {}
        if rate_interval is not None:
            changes["rates"] = replace(self.rates, interval_seconds=rate_interval)
        if listen is not None:
            changes["listen"] = listen
        if hostname is not None:
            changes["hostname"] = hostname
        if metrics:
            changes["metrics"] = replace(self.metrics, **metrics)
        return replace(self, **changes)


def valid_hostname(name: str) -> bool:
    """Host names as the query service's targets accept them (procfleet.hostnames)."""
    return hostname_problem(name) is None


_TOP_KEYS = {"listen", "hostname", "reader", "log_level", "auth", "masking", "groups", "metrics",
             "actions", "rates", "expand", "process_names", "expected_groups"}


def load(path: str | Path) -> Config:
    """Read and validate the YAML at `path`; raise ConfigError listing every problem."""
    raw = read_yaml(path)
    return from_mapping(raw, source=str(path))


def from_mapping(raw: Any, *, source: str = "<config>") -> Config:
    """Validate an already parsed YAML document (see `load`)."""
    problems = Problems()
    data = problems.mapping(raw, "")
    problems.unknown_keys(data, _TOP_KEYS, "")

    listen = ("127.0.0.1", 9256)
    listen_text = problems.typed(data, "listen", str, DEFAULT_LISTEN, "")
    try:
        listen = parse_listen(listen_text)
    except ListenError as exc:
        problems.add("listen", str(exc))

    hostname = problems.typed(data, "hostname", str, None, "") or socket.gethostname()
    why = hostname_problem(hostname)
    if why is not None:
        problems.add("hostname", why)

    reader = problems.one_of(data, "reader", ("auto", "procfs", "psutil"), "auto", "")
    log_level = problems.one_of(data, "log_level", LOG_LEVELS, "info", "")

    auth = _auth(problems.mapping(data.get("auth"), "auth"), problems)
    masker = _masking(problems.mapping(data.get("masking"), "masking"), problems)
    # A process-exporter config file (top-level `process_names:`) works unchanged: its
    # list is our `groups:`.
    if "process_names" in data and "groups" in data:
        problems.add("process_names", "give either `groups:` or process-exporter's "
                     "`process_names:`, not both")
    key = "process_names" if "process_names" in data else "groups"
    groups = parse_groups(data.get(key), problems, key)
    metrics = parse_metrics_options(data.get("metrics"), problems, "metrics")
    expected = _expected_groups(data.get("expected_groups"), problems)
    metrics = replace(metrics, expected_groups=tuple(
        dict.fromkeys([*expected_names(groups), *expected])))
    if len(metrics.expected_groups) > MAX_EXPECTED_GROUPS:
        problems.add("expected_groups", f"at most {MAX_EXPECTED_GROUPS} expected groups, got "
                     f"{len(metrics.expected_groups)}")
    rates = _rates(problems.mapping(data.get("rates"), "rates"), problems)
    expand_data = problems.mapping(data.get("expand"), "expand")
    problems.unknown_keys(expand_data, {"environ"}, "expand")
    expand = ExpandOptions(environ=problems.typed(expand_data, "environ", bool, False, "expand"))

    signal = parse_actions(data.get("actions"), problems, "actions")

    problems.raise_if_any(source)
    return Config(listen=listen, hostname=hostname, reader=reader, log_level=log_level,
                  auth=auth, masker=masker, groups=groups, metrics=metrics, signal=signal,
                  rates=rates, expand=expand, source=source)


def _expected_groups(raw: Any, problems: Problems) -> list[str]:
    """`expected_groups:`, a list of group names exported from the first scrape."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add("expected_groups", f"must be a list of group names, got "
                     f"{type(raw).__name__}")
        return []
    names = []
    for i, name in enumerate(raw):
        if not isinstance(name, str) or not name or len(name) > GROUP_NAME_MAX:
            problems.add(f"expected_groups[{i}]", f"must be a group name of 1 to "
                         f"{GROUP_NAME_MAX} characters, got {name!r:.80}")
        else:
            names.append(name)
    return names


def _auth(data: Any, problems: Problems) -> AuthConfig:
    problems.unknown_keys(data, {"token_sha256", "protect_metrics"}, "auth")
    digest = problems.typed(data, "token_sha256", str, None, "auth")
    if digest is not None and not is_sha256_hex(digest):
        problems.add("auth.token_sha256", "must be 64 hexadecimal digits (sha256 of the token)")
        digest = None
    elif digest is not None:
        digest = digest.lower()
    protect = problems.typed(data, "protect_metrics", bool, True, "auth")
    return AuthConfig(token_sha256=digest, protect_metrics=protect)


def _masking(data: Any, problems: Problems) -> Masker:
    problems.unknown_keys(data, {"enabled", "patterns", "extra_patterns", "secret_flags"},
                          "masking")
    enabled = problems.typed(data, "enabled", bool, True, "masking")
    # `patterns` replaces the built-in rules, `secret_flags` the built-in flag rule.
    replaced = _regex_list(data, "patterns", problems, value_group=True)
    patterns = replaced + _regex_list(data, "extra_patterns", problems, value_group=True)
    flags = _regex_list(data, "secret_flags", problems, value_group=False)
    try:
        return Masker.build(patterns, flags if "secret_flags" in data else None, enabled,
                            builtin=not replaced)
    except re.error:
        return Masker.build()  # already reported by _regex_list


def _regex_list(data: Any, key: str, problems: Problems, *, value_group: bool) -> list[str]:
    items = problems.typed(data, key, list, [], "masking")
    good: list[str] = []
    for i, item in enumerate(items):
        where = f"masking.{key}[{i}]"
        if not isinstance(item, str):
            problems.add(where, f"must be a string, got {type(item).__name__}")
            continue
        if value_group:
            why = check_pattern(item)
        else:
            try:
                re.compile(item)
                why = backtracking_risk(item)
            except re.error as exc:
                why = f"invalid regex: {exc}"
        if why:
            problems.add(where, why)
        else:
            good.append(item)
    return good


__all__ = ["AuthConfig", "Config", "ConfigError", "DEFAULT_LISTEN", "ExpandOptions",
           "MAX_EXPECTED_GROUPS", "MAX_TOP_N", "MetricsOptions", "RatesOptions", "from_mapping",
           "interval_problem", "load", "parse_metrics_options", "valid_hostname"]
