"""process-exporter's command line, so its systemd units and scripts start procfleet unchanged.

ncabatoff/process-exporter uses Go's `flag` package: `-name` or `--name`, `-name=value`, and
for a flag that is not boolean also `-name value`; a boolean is set by `-name` alone or
`-name=false` (never `-name false`). `translate` turns those spellings into procfleet's own
flags and settings, or refuses a flag, saying why, when procfleet cannot do what it asks:

    -config.path FILE             --config FILE (a file with `process_names:` works as is)
    -web.listen-address ADDR      --listen ADDR (Go's ":9256", every address, is 0.0.0.0:9256)
    -web.config.file FILE         --web.config.file FILE, where this build has it
    -procfs /proc                 accepted; another path is refused
    -children[=BOOL]              metrics.children
    -gather-smaps[=BOOL]          metrics.smaps
    -remove-empty-groups[=BOOL]   metrics.drop_empty_groups
    -threads=false                accepted (procfleet has no per-thread series); true refused
    -recheck=false                accepted (a process is named once); true refused
    -debug                        --log-level debug
    -version                      --version

`--threads N` stays procfleet's request-thread count: a number (`--threads 8`,
`--threads=8`) is procfleet's flag, a bare `-threads` or a boolean value is
process-exporter's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

# Go's strconv.ParseBool.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# process-exporter flag -> the MetricsOptions field it sets.
_METRIC_FLAGS = {
    "children": "children",
    "gather-smaps": "smaps",
    "remove-empty-groups": "drop_empty_groups",
}
# Boolean flags accepted only with the value procfleet always behaves as.
_FIXED_FLAGS = {
    "threads": (False, "per-thread series (namedprocess_namegroup_thread_*) are not "
                       "implemented; pass -threads=false (per-group wchan counts are "
                       "metrics.threads_wchan in the config file)"),
    "recheck": (False, "procfleet names a process once, when first seen (per pid and start "
                       "time), as process-exporter does without -recheck; pass "
                       "-recheck=false or leave it out"),
}
_STRING_FLAGS = {"config.path", "web.listen-address", "web.config.file", "procfs",
                 "web.telemetry-path", "procnames", "namemapping", "once-to-stdout-delay",
                 "recheck-with-time-limit"}
_BOOL_FLAGS = {*_METRIC_FLAGS, *_FIXED_FLAGS, "debug", "version", "man"}
_REFUSED = {
    "procnames": "use a config file with `process_names:` (or `groups:`) instead",
    "namemapping": "use a config file with `process_names:` cmdline regexes and a `name:` "
                   "template instead",
    "once-to-stdout-delay": "procfleet always serves; scrape it with curl instead",
    "recheck-with-time-limit": "procfleet names a process once, when first seen",
    "man": "see `procfleet-exporter --help` and README.md",
}
PROC_ROOTS = ("/proc", "/proc/")


class CompatError(ValueError):
    """A process-exporter flag procfleet refuses; the message says why."""


@dataclass
class Translated:
    """`argv` in procfleet's spelling, plus the settings the flags changed."""

    argv: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # MetricsOptions field -> value
    notes: list[str] = field(default_factory=list)  # "-children=false: metrics.children ..."


def _split(arg: str) -> tuple[str, str | None] | None:
    """(flag name, value after '=' or None) for a Go-style flag of process-exporter's."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    body = arg[2:] if arg.startswith("--") else arg[1:]
    name, eq, value = body.partition("=")
    if name not in _STRING_FLAGS and name not in _BOOL_FLAGS:
        return None
    return name, (value if eq else None)


def _boolean(spelled: str, name: str, value: str | None) -> bool:
    if value is None or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CompatError(f"{spelled}: -{name} takes true or false, got {value!r}")


def _listen(address: str) -> str:
    """Go's net.Listen address: an empty host means every address."""
    return f"0.0.0.0{address}" if address.startswith(":") else address


def translate(argv: Sequence[str], known: Collection[str] = ()) -> Translated:
    """Rewrite process-exporter's flags in `argv`; `known` are procfleet's option strings.

    Raises CompatError for a flag procfleet cannot honour. Everything else passes through
    unchanged, for argparse to judge.
    """
    out = Translated()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        split = _split(arg)
        if arg == "--":
            out.argv += args[i - 1:]
            break
        if split is None:
            out.argv.append(arg)
            continue
        name, value = split
        if name == "threads" and arg.startswith("--") and (
                (value is not None and value.isdigit())
                or (value is None and i < len(args) and args[i].isdigit())):
            out.argv.append(arg)  # procfleet's --threads N (request threads)
            continue
        if name in _STRING_FLAGS and value is None:
            if i >= len(args):
                raise CompatError(f"{arg}: needs a value")
            value = args[i]
            i += 1
        _one(out, arg, name, value, known)
    return out


def _one(out: Translated, arg: str, name: str, value: str | None,
         known: Collection[str]) -> None:
    spelled = arg if value is None or "=" in arg else f"{arg} {value}"
    if name in _REFUSED:
        raise CompatError(f"{spelled}: process-exporter's -{name} is not supported: "
                          f"{_REFUSED[name]}")
    if name in _STRING_FLAGS:
        assert value is not None
        if name == "config.path":
            out.argv += ["--config", value]
        elif name == "web.listen-address":
            out.argv += ["--listen", _listen(value)]
        elif name == "web.config.file":
            if "--web.config.file" not in known:
                raise CompatError(f"{spelled}: this build of procfleet-exporter has no "
                                  "--web.config.file (TLS and basic auth); use "
                                  "auth.token_sha256 in the config file")
            out.argv += ["--web.config.file", value]
        elif name == "procfs":
            if value not in PROC_ROOTS:
                raise CompatError(
                    f"{spelled}: procfleet reads this host's /proc only: its JSON lookups "
                    "and signal action act on the processes it reports, so they must be "
                    "the ones it runs among. In a container, share the host's pid "
                    "namespace (docker run --pid=host) instead of mounting /proc elsewhere")
        elif name == "web.telemetry-path":
            if value != "/metrics":
                raise CompatError(f"{spelled}: procfleet serves metrics at /metrics only")
        out.notes.append(f"{spelled}: accepted as {' '.join(out.argv[-2:])}"
                         if name in ("config.path", "web.listen-address", "web.config.file")
                         else f"{spelled}: accepted (procfleet's default)")
        return
    on = _boolean(spelled, name, value)
    if name in _METRIC_FLAGS:
        out.metrics[_METRIC_FLAGS[name]] = on
        out.notes.append(f"{spelled}: metrics.{_METRIC_FLAGS[name]} {str(on).lower()}")
    elif name in _FIXED_FLAGS:
        fixed, why = _FIXED_FLAGS[name]
        if on != fixed:
            raise CompatError(f"{spelled}: {why}")
        out.notes.append(f"{spelled}: accepted (procfleet's behaviour)")
    elif name == "debug":
        if on:
            out.argv += ["--log-level", "debug"]
    elif name == "version":
        if on:
            out.argv.append("--version")


__all__ = ["CompatError", "PROC_ROOTS", "Translated", "translate"]
