"""Group matchers and name templates, against real child processes read from /proc."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import ProcessCollector
from exporter.config import MetricsOptions, from_mapping
from exporter.groups import (
    CMDLINE_SPAN,
    DEFAULT_GROUPS,
    KERNEL_THREADS_GROUP,
    GroupMatcher,
    name_process,
    parse_groups,
    regex_text,
)
from exporter.procs import ProcessError, UserNames, make_reader
from procfleet.configcheck import ConfigError, Problems
from procfleet.testing import NamedChildren, assert_prefixes

SLEEP = "/bin/sleep"
SHELL = "/bin/sh"


class Spawner(NamedChildren):
    def spawn(self, suffix: str, *args: str) -> subprocess.Popen[bytes]:
        """`sleep 60` by default; with args, a shell blocked reading stdin, args on argv."""
        if args:
            return self.start(suffix, SHELL, "-c", "read _", *args)
        return self.start(suffix, SLEEP, "60")


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.reap()


@pytest.fixture(scope="module")
def reader():
    return make_reader("procfs")


def groups_of(raw: object) -> tuple[GroupMatcher, ...]:
    problems = Problems()
    groups = parse_groups(raw, problems)
    assert problems.items == []
    return groups


def name_of(groups: tuple[GroupMatcher, ...], reader, pid: int) -> str | None:
    return name_process(groups, reader.sample(pid, cmdline=True), UserNames())


# -- configuration problems --------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("bash", ["groups: must be a list of group matchers, got str"]),
    ([], ["groups: must list at least one group (leave it out for the default"]),
    (["bash"], ["groups[0]: must be a mapping, got str"]),
    ([{"name": "x"}],
     ["groups[0]: needs at least one selector: comm, exe, cmdline or kernel_thread"]),
    ([{"name": "x", "kernel_thread": "yes"}],
     ["groups[0].kernel_thread: must be a boolean, got str"]),
    ([{"comm": ["a"], "expected": True}], ["groups[0].expected: needs a fixed `name:`"]),
    ([{"comm": ["a"], "name": "a-{{.Username}}", "expected": True}],
     ["groups[0].expected: needs a fixed `name:` without {{...}} fields"]),
    ([{"comm": ["a"], "name": "a", "expected": 1}],
     ["groups[0].expected: must be a boolean, got int"]),
    ([{"comm": "bash"}], ["groups[0].comm: must be a list of strings, got str"]),
    ([{"comm": []}], ["groups[0].comm: must list at least one value"]),
    ([{"exe": ["ok", 3]}], ["groups[0].exe[1]: must be a non-empty string, got int"]),
    ([{"exe": [""]}], ["groups[0].exe[0]: must be a non-empty string, got an empty string"]),
    ([{"comm": ["a"], "cmdlines": ["x"]}],
     ["groups[0].cmdlines: unknown key (expected one of: cmdline, comm, exe, expected, "
      "kernel_thread, name)"]),
    ([{"comm": ["a"], "name": 5}], ["groups[0].name: must be a string, got int"]),
    ([{"comm": ["a"], "name": "{{.Cwd}}"}], ["groups[0].name: unknown template field"]),
    ([{"comm": ["a"], "name": "{{if .Comm}}x{{end}}"}],
     ["groups[0].name: unsupported template action '{{if .Comm}}'"]),
    ([{"comm": ["a"], "name": "{{.Comm"}], ["groups[0].name: unbalanced"]),
    ([{"comm": ["a"]}, {"cmdline": ["ok", "(unclosed"]}],
     ["groups[1].cmdline[1]: invalid regex: missing ), unterminated subpattern"]),
    ({"process_names": [{"cmdline": ["*"]}]},
     ["groups.process_names[0].cmdline[0]: invalid regex: nothing to repeat"]),
    # Patterns that can take exponential time on a command line any local user writes.
    ([{"comm": ["a"]}, {"cmdline": ["ok", "(a+)+b"]}],
     ["groups[1].cmdline[1]: nested quantifiers such as (a+)+"]),
    ({"process_names": [{"cmdline": ["--x=(?:y|yy)+z"]}]},
     ["groups.process_names[0].cmdline[0]: a repeated group of alternatives that may start"]),
    ([{"cmdline": [r"(\w)\1"]}], ["groups[0].cmdline[0]: backreferences are not allowed"]),
    ([{"comm": 1}, {"comm": ["ok"]}, {"cmdline": ["["], "bogus": True}],
     ["groups[0].comm: must be a list of strings, got int",
      "groups[2].bogus: unknown key",
      "groups[2].cmdline[0]: invalid regex: unterminated character set"]),
])
def test_problems_are_named_by_key_path(raw: object, expected: list[str]) -> None:
    problems = Problems()
    parse_groups(raw, problems)
    assert_prefixes(problems.items, expected)


def test_a_hostile_cmdline_regex_is_a_config_error_naming_its_key() -> None:
    raw = {"groups": [{"comm": ["sshd"]}, {"name": "x", "cmdline": [r"-jar\s+(\S+\s?)+$"]}]}
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw)
    assert "groups[1].cmdline[0]: nested quantifiers" in str(caught.value)


def test_custom_path_prefixes_problems() -> None:
    problems = Problems()
    parse_groups([{"comm": "x"}], problems, "exporter.groups")
    assert problems.items == ["exporter.groups[0].comm: must be a list of strings, got str"]


def test_absent_groups_mean_one_group_per_comm() -> None:
    assert parse_groups(None, Problems()) == DEFAULT_GROUPS


def test_a_process_exporter_config_can_be_pasted_in() -> None:
    groups = groups_of({"process_names": [{"name": "{{.Comm}}", "cmdline": [".+"]}]})
    assert len(groups) == 1 and groups[0].name == "{{.Comm}}"


def test_go_style_named_groups_are_accepted() -> None:
    (matcher,) = groups_of([{"cmdline": [r"--port=(?<port>\d+)"], "name": "{{.Matches.port}}"}])
    assert matcher.cmdline is not None
    assert matcher.cmdline[0].groupindex == {"port": 1}


def test_regexes_see_a_bounded_text_with_the_end_of_a_long_command_line() -> None:
    argv = ["java", "-cp", "x" * 200_000, "-jar", "app.jar", *(["-Dk=v"] * 5000)]
    text = regex_text(argv)
    assert len(text) == CMDLINE_SPAN
    assert text.startswith("java -cp xxx") and " -jar app.jar -Dk=v" in text


# -- matching real processes -------------------------------------------------------------

def test_comm_selector_and_default_exebase_name(spawner: Spawner, reader) -> None:
    child = spawner.spawn("comm")
    comm = f"{spawner.tag}-comm"
    groups = groups_of([{"comm": ["bash", comm]}])
    assert name_of(groups, reader, child.pid) == comm  # {{.ExeBase}} of argv[0]
    assert name_of(groups_of([{"comm": ["bash"]}]), reader, child.pid) is None


def test_exe_selector_by_basename_or_exact_path(spawner: Spawner, reader) -> None:
    child = spawner.spawn("exe")
    argv0 = str(spawner.tmp / f"{spawner.tag}-exe")
    base = os.path.basename(argv0)
    assert name_of(groups_of([{"exe": [base]}]), reader, child.pid) == base
    assert name_of(groups_of([{"exe": [argv0], "name": "{{.ExeFull}}"}]),
                   reader, child.pid) == argv0
    assert name_of(groups_of([{"exe": [f"/elsewhere/{base}"]}]), reader, child.pid) is None
    # Two paths with one basename: either may match (process-exporter keeps only the last).
    assert name_of(groups_of([{"exe": [argv0, f"/elsewhere/{base}"]}]),
                   reader, child.pid) == base


def test_cmdline_regexes_must_all_match_and_capture(spawner: Spawner, reader) -> None:
    child = spawner.spawn("cmd", "--procfleet-role=web", "--procfleet-zone=eu")
    groups = groups_of([{
        "cmdline": [r"--procfleet-role=(?P<role>\w+)", r"--procfleet-zone=(?P<zone>\w+)"],
        "name": "svc:{{.Matches.role}}@{{ .Matches.zone }}/{{.Matches.missing}}",
    }])
    assert name_of(groups, reader, child.pid) == "svc:web@eu/<no value>"
    both = groups_of([{"cmdline": ["--procfleet-role=web", "--procfleet-zone=us"]}])
    assert name_of(both, reader, child.pid) is None


def test_selectors_in_one_item_must_all_match(spawner: Spawner, reader) -> None:
    child = spawner.spawn("and", "--flag")
    comm = f"{spawner.tag}-and"
    assert name_of(groups_of([{"comm": [comm], "cmdline": ["--flag"]}]),
                   reader, child.pid) == comm
    assert name_of(groups_of([{"comm": [comm], "cmdline": ["--other"]}]),
                   reader, child.pid) is None


def test_every_template_field(spawner: Spawner, reader) -> None:
    child = spawner.spawn("tpl")
    comm = f"{spawner.tag}-tpl"
    groups = groups_of([{
        "comm": [comm],
        "name": "{{.Comm}}|{{.ExeBase}}|{{.ExeFull}}|{{.Username}}|{{.PID}}|{{.StartTime}}",
    }])
    parts = name_of(groups, reader, child.pid).split("|")
    assert parts[:5] == [comm, comm, str(spawner.tmp / comm),
                         pwd.getpwuid(os.getuid()).pw_name, str(child.pid)]
    # Go's time.Time.String(): "2006-01-02 15:04:05.999999999 -0700 MST", local time.
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? [+-]\d{4} \S+", parts[5])


def test_first_match_wins(spawner: Spawner, reader) -> None:
    child = spawner.spawn("first", "--procfleet-first")
    comm = f"{spawner.tag}-first"
    groups = groups_of([
        {"comm": ["no-such-comm"], "name": "zero"},
        {"cmdline": ["--procfleet-first"], "name": "one"},
        {"comm": [comm], "name": "two"},
    ])
    assert name_of(groups, reader, child.pid) == "one"


def test_default_groups_name_user_processes_by_comm_and_kernel_threads_as_one(
        spawner: Spawner, reader) -> None:
    child = spawner.spawn("dflt")
    assert name_of(DEFAULT_GROUPS, reader, child.pid) == f"{spawner.tag}-dflt"
    # Kernel threads told apart independently of the reader's flag: kthreadd's children.
    kernel = {p.pid for p in psutil.process_iter(["ppid"]) if p.pid == 2 or p.info["ppid"] == 2}
    named = kernel_named = 0
    for pid in reader.pids():
        try:
            sample = reader.sample(pid, cmdline=True)
        except ProcessError:
            continue
        want = KERNEL_THREADS_GROUP if pid in kernel else sample.comm
        assert name_process(DEFAULT_GROUPS, sample) == want, (pid, sample.comm)
        named += 1
        kernel_named += pid in kernel
    assert named > kernel_named > 1


def test_kernel_threads_have_no_exe_but_a_comm(reader) -> None:
    # pid 2 is kthreadd on Linux hosts and VMs (the exporter runs in the host pid namespace).
    kthreadd = reader.sample(2, cmdline=True)
    assert kthreadd.comm == "kthreadd" and kthreadd.cmdline == [] and kthreadd.kernel_thread
    assert name_process(DEFAULT_GROUPS, kthreadd) == KERNEL_THREADS_GROUP
    assert name_process(groups_of([{"cmdline": [".+"]}]), kthreadd) is None
    assert name_process(groups_of([{"exe": [kthreadd.comm]}]), kthreadd) is None
    by_comm = groups_of([{"name": "{{.Comm}}", "kernel_thread": True}])
    assert name_process(by_comm, kthreadd) == "kthreadd"
    assert name_process(groups_of([{"comm": ["kthreadd"], "kernel_thread": False}]),
                        kthreadd) is None
    assert not reader.sample(os.getpid(), cmdline=True).kernel_thread


def test_the_example_config_is_valid() -> None:
    from exporter.config import load

    example = Path(__file__).resolve().parents[2] / "config" / "exporter-groups.example.yml"
    config = load(example)
    assert len(config.groups) == 5
    assert config.groups[2].name == "java:{{.Matches.jar}}@{{.Username}}"
    assert config.metrics.per_process_top_n == 5


# -- bounded cost on hostile command lines (issue 8, the masking item's risk in groups) ---

def test_a_scrape_of_128_kib_arguments_with_an_ordinary_matcher_is_quick(
        spawner: Spawner) -> None:
    big = 128 * 1024 - 1
    jar = f"{spawner.tag}-app.jar"
    # Each "java " starts a search whose .* runs to the end of the text and back: over the
    # whole 1 MiB that is ~200K x 1M steps (~1.5 min); over the bounded text, milliseconds.
    spawner.spawn("hostile", *[("java " * big)[:big]] * 8)
    # A long classpath before `-jar` does not hide the jar: each argument is cut, not the end.
    legit = spawner.spawn("legit", "java", "-cp", "x" * big, "-jar", jar)
    groups = groups_of([{"name": "jar:{{.Matches.jar}}",
                         "cmdline": [r"java .*-jar\s+(?P<jar>\S+)"]}])
    registry = CollectorRegistry()
    registry.register(ProcessCollector(make_reader("procfs"), groups, MetricsOptions(),
                                       version="test", user_name=UserNames()))
    started = time.perf_counter()
    text = generate_latest(registry).decode()
    # Generous: the point is minutes before the bound; the scrape bench measures speed.
    assert time.perf_counter() - started < 10.0
    procs = {s.labels["groupname"]: s.value for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == "namedprocess_namegroup_num_procs"}
    assert procs.get(f"jar:{jar}") == 1, (legit.pid, procs)
