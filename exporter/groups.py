"""Process groups: which group a process belongs to, in process-exporter's `process_names` format.

Each item of the exporter config's `groups:` list is a recipe, exactly as in
ncabatoff/process-exporter, so an existing `process_names:` list can be pasted in unchanged:

    groups:
      - comm: [bash, sshd]                 # any of these comm values (/proc/PID/stat, 15 chars)
      - exe: [postgres, /usr/bin/node]     # argv[0]: by basename, or the exact path if it has a /
      - name: "java:{{.Matches.app}}"      # cmdline regexes: all must match; named captures
        cmdline: ['-jar\\s+(?P<app>[^/ ]+)\\.jar']

Selectors within one item must all match; the first item that matches a process names it.
`name` is a template (default `{{.ExeBase}}`) over `{{.Comm}}`, `{{.ExeBase}}`,
`{{.ExeFull}}`, `{{.Username}}`, `{{.Matches.NAME}}`, `{{.PID}}` and `{{.StartTime}}`.

Two keys go beyond process-exporter's format: `kernel_thread: true|false` selects kernel
threads (PF_KTHREAD) or user processes only, and `expected: true` (with a fixed `name`) makes
the group exported from the first scrape even before any process of it runs.

Without a `groups:` key (`DEFAULT_GROUPS`) every user process is grouped by its comm and
all kernel threads form the one group `kernel_threads`: kworker/0:1-events and its kind
rename themselves as they work, so a group per kernel-thread comm would churn without end.

A process's group is decided once per incarnation (pid, start time), on first sight.

Unlike Go's regexp, which process-exporter uses, Python's regexes backtrack, and any local
user chooses the command line they are run on. So `cmdline` regexes get two limits: the
config is refused (naming the key, e.g. `groups[2].cmdline[0]`) for a pattern that may take
exponential time (`masking.backtracking_risk`: nested quantifiers such as `(a+)+`,
alternatives that start alike inside a repeat such as `(a|aa)+`, backreferences); and a
regex sees only the first `CMDLINE_ARG_SPAN` (1,024) characters of each argument and the
first `CMDLINE_SPAN` (4,096) characters of the joined command line. Polynomial patterns
(`.*a.*b`) remain costly on hostile text within those limits: prefer `\\S+`, `[^ ]+` and
literal prefixes to several `.*`.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter.masking import DEFAULT_MASKER, Masker, apply_spans, backtracking_risk
from exporter.procs import Sample
from procfleet.configcheck import Problems

DEFAULT_NAME = "{{.ExeBase}}"
_ITEM_KEYS = {"name", "comm", "exe", "cmdline", "kernel_thread", "expected"}
KERNEL_THREADS_GROUP = "kernel_threads"
_FIELDS = ("Comm", "ExeBase", "ExeFull", "Username", "PID", "StartTime")
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_FIELD_REF = re.compile(r"\.(\w+)(?:\.(\w+))?")
# Go 1.22 also accepts (?<name>...); Python spells it (?P<name>...).
_GO_NAMED_GROUP = re.compile(r"(?<!\\)\(\?<(?=[A-Za-z_])")
_NO_VALUE = "<no value>"  # what Go's text/template prints for a missing map key
# What a cmdline regex sees (module docstring): bounds what a polynomial pattern may cost on
# a 128 KiB argument, while `-jar x.jar` after a long classpath still shows.
CMDLINE_ARG_SPAN = 1024
CMDLINE_SPAN = 4096
# A group name is a label value on every series of its group, and the collector keeps it
# per process: `{{.ExeFull}}` of a 128 KiB argv[0] is cut to this many characters.
GROUP_NAME_MAX = 1024


@dataclass(frozen=True)
class _Template:
    """A Go text/template restricted to field references: literal and field parts."""

    source: str
    # (literal, None), (field, "") or ("Matches", map key, "" for the whole map)
    parts: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(text for text, key in self.parts if key is not None)

    def render(self, values: Mapping[str, Any], matches: Mapping[str, str]) -> str:
        out = []
        for text, key in self.parts:
            if key is None:
                out.append(text)
            elif text == "Matches":
                out.append(matches.get(key, _NO_VALUE) if key else _go_map(matches))
            else:
                out.append(str(values[text]))
        return "".join(out)


def _go_map(matches: Mapping[str, str]) -> str:
    return "map[" + " ".join(f"{k}:{v}" for k, v in sorted(matches.items())) + "]"


def _parse_template(source: str) -> tuple[_Template | None, str | None]:
    """(template, None), or (None, why) when it uses more than plain field references."""
    parts: list[tuple[str, str | None]] = []
    at = 0
    for action in _ACTION.finditer(source):
        if action.start() > at:
            parts.append((source[at:action.start()], None))
        ref = _FIELD_REF.fullmatch(action.group(1))
        if ref is None:
            return None, (f"unsupported template action {action.group(0)!r}: only field "
                          f"references like {{{{.Comm}}}} or {{{{.Matches.NAME}}}} are supported")
        name, key = ref.group(1), ref.group(2)
        if name == "Matches":
            parts.append(("Matches", key or ""))
        elif name in _FIELDS and key is None:
            parts.append((name, ""))
        else:
            known = ", ".join(f".{f}" for f in (*_FIELDS, "Matches.NAME"))
            return None, f"unknown template field {action.group(0)!r} (known: {known})"
        at = action.end()
    rest = source[at:]
    if "{{" in rest or "}}" in rest:
        return None, "unbalanced '{{' or '}}' in template"
    if rest:
        parts.append((rest, None))
    return _Template(source, tuple(parts)), None


@dataclass(frozen=True)
class GroupMatcher:
    """One `groups:` item: selectors that must all match, and a name template.

    `comm` is a set of exact comm values; `exe` pairs an argv[0] basename with the full path
    argv[0] must equal ("" when the basename alone is enough); `cmdline` regexes are searched
    in argv joined by spaces, within the limits of `regex_text`; `kernel_thread` True or
    False takes only kernel threads or only user processes. A matcher with no selector at
    all matches every process. `expected` asks for the group (`name` is then a fixed name)
    to be exported before any of its processes runs.
    """

    name: str = DEFAULT_NAME
    comm: frozenset[str] | None = None
    exe: tuple[tuple[str, str], ...] | None = None
    cmdline: tuple[re.Pattern[str], ...] | None = None
    kernel_thread: bool | None = None
    expected: bool = False
    # Parsed from `name` when not given; config loading passes the one it parsed to report
    # problems, so a template is parsed once.
    template: _Template | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A bad `name` fails here, at construction, not at the first scrape.
        _ = self._template, self._exes

    # Derived once from the fields. cached_property stores into the instance's __dict__, so it
    # needs no assignment through the frozen dataclass's __setattr__.
    @functools.cached_property
    def _template(self) -> _Template:
        if self.template is not None:
            return self.template
        template, why = _parse_template(self.name)
        if template is None:
            raise ValueError(why)
        return template

    @functools.cached_property
    def _exes(self) -> dict[str, set[str] | None]:
        """basename -> the full paths argv[0] may be, or None when any path will do."""
        exes: dict[str, set[str] | None] = {}
        for base, full in self.exe or ():
            paths = exes.setdefault(base, set())
            if paths is not None:
                if full:
                    paths.add(full)
                else:
                    exes[base] = None
        return exes

    @property
    def needs_username(self) -> bool:
        return "Username" in self._template.fields

    def match(self, sample: Sample, username: str | Callable[[], str] = "",
              masker: Masker = DEFAULT_MASKER) -> str | None:
        """The group name for this process, or None when the selectors do not all match.

        `sample.cmdline` must have been read. `username` may be a callable so that the
        passwd lookup happens only when the template needs it. Selectors see the real argv;
        the name, a label value anyone who scrapes can read, gets argv text masked by
        `masker` (`{{.ExeFull}}`, `{{.ExeBase}}`, `{{.Matches.NAME}}`).
        """
        argv = sample.cmdline or []
        if self.kernel_thread is not None and sample.kernel_thread != self.kernel_thread:
            return None
        if self.comm is not None and sample.comm not in self.comm:
            return None
        if self.exe is not None:
            if not argv:
                return None
            base = _go_base(argv[0])
            exes = self._exes
            if base not in exes:
                return None
            paths = exes[base]
            if paths is not None and argv[0] not in paths:
                return None
        captured: dict[str, tuple[int, int]] = {}
        joined = ""
        if self.cmdline is not None:
            joined = regex_text(argv)
            for regex in self.cmdline:
                found = regex.search(joined)
                if found is None:
                    return None
                captured.update({k: found.span(k) for k in found.groupdict()})
        matches = _masked_captures(joined, captured, argv, masker) if captured else {}
        return self._name(sample, argv, username, matches, masker)

    def _name(self, sample: Sample, argv: Sequence[str], username: str | Callable[[], str],
              matches: Mapping[str, str], masker: Masker) -> str:
        fields = self._template.fields
        values: dict[str, Any] = {}
        if "Comm" in fields:
            values["Comm"] = sample.comm
        if "ExeBase" in fields or "ExeFull" in fields:
            # argv[0] is the process's own text (`exec -a 'app --password=x'`).
            full = masker.mask_text(argv[0]) if argv else sample.comm
            values["ExeFull"] = full
            values["ExeBase"] = _go_base(full) if argv else sample.comm
        if "Username" in fields:
            values["Username"] = username() if callable(username) else username
        if "PID" in fields:
            values["PID"] = sample.pid
        if "StartTime" in fields:
            values["StartTime"] = _go_time(sample.create_time)
        return self._template.render(values, matches)


def regex_text(argv: Sequence[str]) -> str:
    """What cmdline regexes search: argv joined by spaces, within the limits above."""
    heads = []
    size = 0
    for arg in argv:
        if size >= CMDLINE_SPAN:
            break
        heads.append(arg[:CMDLINE_ARG_SPAN])
        size += len(heads[-1]) + 1
    return " ".join(heads)[:CMDLINE_SPAN]


def _masked_captures(joined: str, captured: Mapping[str, tuple[int, int]],
                     argv: Sequence[str], masker: Masker) -> dict[str, str]:
    """Each capture's text from `joined` (`regex_text(argv)`), with masked parts as ***."""
    spans: list[tuple[int, int]] = []
    offset = 0
    for arg, arg_spans in zip(argv, masker.spans(argv), strict=True):
        if offset >= len(joined):
            break
        head = min(len(arg), CMDLINE_ARG_SPAN)  # the spans of the full argument, cut to it
        spans.extend((offset + s, offset + min(e, head)) for s, e in arg_spans if s < head)
        offset += head + 1
    out: dict[str, str] = {}
    for key, (start, end) in captured.items():
        if start < 0:
            out[key] = ""
            continue
        inside = [(max(s, start) - start, min(e, end) - start) for s, e in spans
                  if s < end and e > start]
        out[key] = apply_spans(joined[start:end], inside)
    return out


def _go_base(path: str) -> str:
    """Go's filepath.Base: trailing slashes dropped, "" becomes ".", all slashes "/"."""
    if not path:
        return "."
    stripped = path.rstrip("/")
    if not stripped:
        return "/"
    return stripped.rsplit("/", 1)[-1]


def _go_time(epoch: float) -> str:
    """Go's time.Time.String() in local time, e.g. `2026-01-15 10:30:00.25 +0000 UTC`."""
    when = dt.datetime.fromtimestamp(epoch).astimezone()
    text = when.strftime("%Y-%m-%d %H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return f"{text} {when.strftime('%z')} {when.tzname()}"


# Kernel threads in one group, every user process grouped by its comm (module docstring).
DEFAULT_GROUPS: tuple[GroupMatcher, ...] = (
    GroupMatcher(name=KERNEL_THREADS_GROUP, kernel_thread=True),
    GroupMatcher(name="{{.Comm}}"),
)


def name_process(groups: Sequence[GroupMatcher], sample: Sample,
                 user_name: Callable[[int], str] | None = None,
                 masker: Masker = DEFAULT_MASKER) -> str | None:
    """First match wins: the group name of this process, or None when no group wants it.

    `masker` masks the argv text a name may carry; pass the configured one. Names are cut
    to `GROUP_NAME_MAX` characters (after masking).
    """
    cached: list[str] = []

    def username() -> str:
        if not cached:
            uid = sample.uid
            cached.append("" if uid is None or user_name is None else user_name(uid))
        return cached[0]

    for matcher in groups:
        name = matcher.match(sample, username, masker)
        if name is not None:
            return name[:GROUP_NAME_MAX]
    return None


def parse_groups(raw: Any, problems: Problems, path: str = "groups") -> tuple[GroupMatcher, ...]:
    """Validate the `groups:` list; every problem is added to `problems` by key path.

    A mapping holding only `process_names:` (a whole process-exporter config) is accepted
    too. None means the default (`DEFAULT_GROUPS`).
    """
    if raw is None:
        return DEFAULT_GROUPS
    if isinstance(raw, Mapping) and set(raw) == {"process_names"}:
        raw, path = raw["process_names"], f"{path}.process_names"
    if not isinstance(raw, list):
        problems.add(path, f"must be a list of group matchers, got {type(raw).__name__}")
        return DEFAULT_GROUPS
    if not raw:
        problems.add(path, "must list at least one group (leave it out for the default: "
                     "user processes by comm, kernel threads in one group)")
        return DEFAULT_GROUPS
    matchers = []
    for i, item in enumerate(raw):
        matcher = _parse_item(item, problems, f"{path}[{i}]")
        if matcher is not None:
            matchers.append(matcher)
    return tuple(matchers)


def _parse_item(item: Any, problems: Problems, where: str) -> GroupMatcher | None:
    if not isinstance(item, Mapping):
        problems.add(where, f"must be a mapping, got {type(item).__name__}")
        return None
    before = len(problems.items)
    problems.unknown_keys(item, _ITEM_KEYS, where)
    name = item.get("name")
    template = None
    if name is None or name == "":
        name = DEFAULT_NAME
    elif not isinstance(name, str):
        problems.add(f"{where}.name", f"must be a string, got {type(name).__name__}")
    else:
        template, why = _parse_template(name)
        if template is None:
            problems.add(f"{where}.name", why or "invalid template")
    comm = _strings(item, "comm", problems, where)
    exe = _strings(item, "exe", problems, where)
    cmdline = _strings(item, "cmdline", problems, where)
    kernel = problems.typed(item, "kernel_thread", bool, None, where)
    if not any(k in item for k in ("comm", "exe", "cmdline", "kernel_thread")):
        problems.add(where, "needs at least one selector: comm, exe, cmdline or kernel_thread")
    expected = problems.typed(item, "expected", bool, False, where)
    if expected and template is not None and template.fields:
        problems.add(f"{where}.expected", "needs a fixed `name:` without {{...}} fields: "
                     "the name of a group that may not exist yet cannot come from a process")
    elif expected and "name" not in item:
        problems.add(f"{where}.expected", "needs a fixed `name:` (the default name "
                     "{{.ExeBase}} comes from a process)")
    regexes = []
    for j, pattern in enumerate(cmdline or ()):
        source = _GO_NAMED_GROUP.sub("(?P<", pattern)
        try:
            compiled = re.compile(source)
        except re.error as exc:
            problems.add(f"{where}.cmdline[{j}]", f"invalid regex: {exc}")
            continue
        why = backtracking_risk(source)
        if why:
            problems.add(f"{where}.cmdline[{j}]", why)
        else:
            regexes.append(compiled)
    if len(problems.items) > before:
        return None
    exe_rules = None
    if exe is not None:
        exe_rules = tuple((_go_base(e), e) if "/" in e else (e, "") for e in exe)
    return GroupMatcher(
        name=name,
        template=template,
        comm=frozenset(comm) if comm is not None else None,
        exe=exe_rules,
        cmdline=tuple(regexes) if cmdline is not None else None,
        kernel_thread=kernel,
        expected=expected,
    )


def _strings(item: Mapping[str, Any], key: str, problems: Problems,
             where: str) -> list[str] | None:
    """A selector: a non-empty list of non-empty strings, or None when absent."""
    if key not in item:
        return None
    value = item[key]
    if not isinstance(value, list):
        problems.add(f"{where}.{key}", f"must be a list of strings, got {type(value).__name__}")
        return None
    if not value:
        problems.add(f"{where}.{key}", "must list at least one value")
        return None
    good = []
    for j, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            what = "an empty string" if entry == "" else type(entry).__name__
            problems.add(f"{where}.{key}[{j}]", f"must be a non-empty string, got {what}")
        else:
            good.append(entry)
    return good if len(good) == len(value) else None


def expected_names(groups: Sequence[GroupMatcher]) -> list[str]:
    """The names of the groups declared `expected: true`, in config order."""
    return [m.name[:GROUP_NAME_MAX] for m in groups if m.expected]


__all__ = ["CMDLINE_ARG_SPAN", "CMDLINE_SPAN", "DEFAULT_GROUPS", "DEFAULT_NAME", "GROUP_NAME_MAX",
           "KERNEL_THREADS_GROUP", "GroupMatcher", "expected_names", "name_process",
           "parse_groups", "regex_text"]
